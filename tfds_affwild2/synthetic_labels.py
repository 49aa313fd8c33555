"""What each synthetic video lives through, frame by frame: expression segments drive
the action units by their FACS/EMFACS prototypes, independent AU events add movements
the expression does not explain, and expression plus AUs decide valence and arousal
(so every label can be learned from the pixels); head poses drift smoothly."""
from __future__ import annotations

import numpy as np

from tfds_affwild2 import synthetic_faces

AU_THRESHOLD = 0.5          # an AU is labelled present when its drawn intensity exceeds this
EXPR_THRESHOLD = 0.3        # below this intensity an expression segment is labelled Neutral


# EMFACS prototypes: expression -> (AUs always shown, AUs shown in half of the segments).
PROTOTYPES = {
    1: (("AU4", "AU7", "AU23", "AU24"), ()),                     # Anger
    2: (("AU4", "AU10", "AU15"), ("AU7",)),                      # Disgust
    3: (("AU1", "AU2", "AU4", "AU7", "AU25"), ("AU26",)),        # Fear
    4: (("AU6", "AU12"), ("AU25",)),                             # Happiness
    5: (("AU1", "AU4", "AU15"), ()),                             # Sadness
    6: (("AU1", "AU2", "AU25", "AU26"), ()),                     # Surprise
}
# Each expression's place on the valence/arousal circumplex at full intensity.
CIRCUMPLEX = {0: (0.0, 0.0), 1: (-0.6, 0.7), 2: (-0.6, 0.3), 3: (-0.6, 0.8),
              4: (0.7, 0.4), 5: (-0.6, -0.4), 6: (0.2, 0.8)}
# How often each expression starts a segment, in Aff-Wild2's imbalance: Neutral and
# Other frequent, Happiness and Sadness medium, Fear and Disgust rare. Onset and offset
# frames are labelled Neutral as well, which makes Neutral more frequent still.
SEGMENT_PRIOR = np.array([0.17, 0.06, 0.03, 0.03, 0.17, 0.15, 0.06, 0.33])
# Independent AU activations per frame, so AUs are not a function of the expression:
# talking parts the lips often, brows flash, lids tighten; a chance smile (AU12) or
# frown (AU15) would contradict the expression label, so those stay rare.
AU_EVENT_RATE = np.array([0.003, 0.002, 0.004, 0.002, 0.012, 0.012,
                          0.001, 0.001, 0.001, 0.001, 0.035, 0.003])
# Movements that undo each other on the drawn face (corners up vs down, lips pressed vs
# parted): never shown together, so every AU label stays visible in the image.
ANTAGONISTS = (("AU12", "AU15"), ("AU24", "AU25"), ("AU24", "AU26"))
_ANTAGONIST_INDEX = [tuple(synthetic_faces.AU_NAMES.index(n) for n in pair) for pair in ANTAGONISTS]
# What each AU adds to (valence, arousal): smiles please, open jaws excite.
_VA_PER_AU = np.zeros((12, 2))
for _name, _effect in {"AU12": (0.3, 0.05), "AU6": (0.1, 0.0), "AU15": (-0.15, -0.05),
                       "AU4": (-0.1, 0.05), "AU7": (-0.05, 0.05), "AU1": (0.0, 0.05),
                       "AU2": (0.0, 0.05), "AU25": (0.0, 0.1), "AU26": (0.0, 0.2)}.items():
    _VA_PER_AU[synthetic_faces.AU_NAMES.index(_name)] = _effect


def _envelope(rng, length):
    """Onset, apex and offset of one expression or AU event, smooth at both ends."""
    onset, offset = (max(4, round(length * rng.uniform(0.15, 0.35))) for _ in range(2))
    t = np.arange(length, dtype=float)
    x = np.clip(np.minimum((t + 1) / (onset + 1), (length - t) / (offset + 1)), 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _smooth_noise(rng, num_frames, columns, width=7):
    """Unit-scale noise that wanders over about `width` frames."""
    walk = np.cumsum(rng.normal(size=(num_frames + width, columns)), axis=0)
    return (walk[width:] - walk[:-width]) / np.sqrt(width)


def _segment_aus(rng, expression):
    """AU amplitudes of one expression segment; Other is a sparse mix of 2-3 AUs that
    contains no prototype."""
    if expression in PROTOTYPES:
        core, optional = PROTOTYPES[expression]
    else:
        while True:
            core = set(rng.choice(synthetic_faces.AU_NAMES, size=rng.integers(2, 4),
                                  replace=False).tolist())
            if not any(set(p) <= core for p, _ in PROTOTYPES.values()) and not any(
                    set(pair) <= core for pair in ANTAGONISTS):
                break
        core, optional = sorted(core), ()
    amplitudes = {name: rng.uniform(0.8, 1.0) for name in core}
    amplitudes.update({name: rng.uniform(0.6, 1.0) for name in optional if rng.random() < 0.5})
    return {synthetic_faces.AU_NAMES.index(name): a for name, a in amplitudes.items()}


def _au_events(rng, num_frames, driven):
    """AU activations independent of the expression; an event is dropped where the
    expression drives its antagonist, so the expression wins and nothing jumps."""
    events = np.zeros((num_frames, 12))
    for au, rate in enumerate(AU_EVENT_RATE):
        antagonists = [b if a == au else a for a, b in _ANTAGONIST_INDEX if au in (a, b)]
        for _ in range(rng.poisson(rate * num_frames)):
            length = int(rng.integers(8, 31))
            start = int(rng.integers(-length // 2, num_frames))
            bump = rng.uniform(0.55, 1.0) * _envelope(rng, length)
            lo, hi = max(0, start), min(num_frames, start + length)
            if driven[lo:hi, antagonists].max(initial=0.0) > 0.1:
                continue
            events[lo:hi, au] = np.maximum(events[lo:hi, au], bump[lo - start:hi - start])
    return events


def simulate_labels(rng, num_frames, num_classes):
    """One person's behaviour over a video: expression per frame (int), AU intensities
    in [0, 1] (num_frames, 12) and valence/arousal in [-1, 1] (num_frames, 2)."""
    prior = SEGMENT_PRIOR[:num_classes] * rng.gamma(4.0, 0.25, size=num_classes)  # per-person mood
    prior /= prior.sum()
    expr = np.zeros(num_frames, np.int64)
    driven = np.zeros((num_frames, 12))
    centre = np.zeros((num_frames, 2))
    start = 0
    while start < num_frames:
        length = int(rng.integers(12, 41))
        stop = min(num_frames, start + length)
        expression = int(rng.choice(num_classes, p=prior))
        intensity = (rng.uniform(0.55, 1.0) * _envelope(rng, length))[:stop - start]
        if expression != 0:
            expr[start:stop] = np.where(intensity >= EXPR_THRESHOLD, expression, 0)
            for au, amplitude in _segment_aus(rng, expression).items():
                driven[start:stop, au] = amplitude * intensity
            place = CIRCUMPLEX.get(expression) or (rng.uniform(-0.3, 0.3), rng.uniform(-0.1, 0.5))
            centre[start:stop] = np.outer(intensity, place)
        start = stop
    aus = np.clip(np.maximum(driven, _au_events(rng, num_frames, driven))
                  + 0.04 * _smooth_noise(rng, num_frames, 12), 0.0, 1.0)
    va = (centre + aus @ _VA_PER_AU + rng.uniform(-0.1, 0.1, size=2)
          + 0.05 * _smooth_noise(rng, num_frames, 2) + rng.normal(0.0, 0.01, (num_frames, 2)))
    return expr, aus, np.clip(va, -1.0, 1.0)


def simulate_poses(rng, num_frames):
    """Head pose and gaze drifting slowly around a per-video base."""
    t = np.arange(num_frames)

    def drift(base, amplitude):
        period, phase = rng.uniform(40, 160), rng.uniform(0, 2 * np.pi)
        return (base + amplitude * np.sin(2 * np.pi * t / period + phase)).tolist()

    tracks = zip(drift(rng.uniform(-0.08, 0.08), 0.05), drift(rng.uniform(-0.15, 0.15), 0.12),
                 drift(rng.uniform(-3, 3), 2.0), drift(rng.uniform(-3, 3), 2.0),
                 drift(rng.uniform(0.93, 1.07), 0.03), drift(0.0, 0.7), drift(0.0, 0.3))
    return [synthetic_faces.Pose(*values) for values in tracks]
