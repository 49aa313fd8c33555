"""Writes a synthetic Aff-Wild2 release in the real ABAW on-disk layout.

    python -m tfds_affwild2.synthetic --out DIR --seed 0 --generation abaw6 \\
        --mtl-format abaw4 --num-videos 12 --frames-per-video 60

Each video is one procedural person (synthetic_faces) living through a sequence of
expression segments; the expression drives the action units by their FACS/EMFACS
prototypes, the drawn AUs decide the AU labels, and expression plus AUs decide valence
and arousal, so every label can be learned from the pixels. The release carries the
quirks of the real data: videos annotated for only some tasks, invalid lines (-1, -5,
-5.0), frames without a face image, annotation files longer than the video, two-person
videos split into _left/_right, and (ABAW6) two image roots. ground_truth.json states
what a correct reader must count; its schema is documented on `generate_release`.
"""
import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from tfds_affwild2 import synthetic_faces

EXPR_NAMES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
TASKS = ("va", "expr", "au")
SPLITS = ("train", "validation")
AU_THRESHOLD = 0.5          # an AU is labelled present when its drawn intensity exceeds this
EXPR_THRESHOLD = 0.3        # below this intensity an expression segment is labelled Neutral


@dataclasses.dataclass(frozen=True)
class Layout:
    task_roots: dict          # task -> folder at the release root
    split_dirs: dict          # "train"/"validation" -> folder inside each task root
    num_expr_classes: int
    image_roots: tuple


_ABAW3_ROOTS = {"va": "VA_Estimation_Challenge", "expr": "EXPR_Classification_Challenge",
                "au": "AU_Detection_Challenge"}
LAYOUTS = {
    "abaw1": Layout({"va": "VA_Set", "expr": "EXPR_Set", "au": "AU_Set"},
                    {"train": "Training_Set", "validation": "Validation_Set"}, 7,
                    ("cropped_aligned",)),
    "abaw2": Layout({"va": "VA_Set", "expr": "EXPR_Set", "au": "AU_Set"},
                    {"train": "Train_Set", "validation": "Validation_Set"}, 7,
                    ("cropped_aligned",)),
    "abaw3": Layout(_ABAW3_ROOTS, {"train": "Train_Set", "validation": "Validation_Set"}, 8,
                    ("cropped_aligned",)),
    "abaw6": Layout({**_ABAW3_ROOTS, "expr": "EXPR_Recognition_Challenge"},
                    {"train": "Train_Set", "validation": "Validation_Set"}, 8,
                    ("cropped_aligned", "cropped_aligned_new_50_vids")),
}
MTL_FILES = {"abaw3": {"train": "train_set.txt", "validation": "validation_set.txt"},
             "abaw4": {"train": "training_set_annotations.txt",
                       "validation": "validation_set_annotations.txt"}}
MTL_HEADER = "image,valence,arousal,expression,aus"
TEST_LIST = "test_set_release.txt"
GROUND_TRUTH = "ground_truth.json"
_PROGRESS_EVERY = 500


def task_header(task: str, num_expr_classes: int) -> str:
    if task == "va":
        return "valence,arousal"
    if task == "expr":
        return ",".join(EXPR_NAMES[:num_expr_classes])
    return ",".join(synthetic_faces.AU_NAMES)


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    name: str
    split: str                # "train", "validation" or "test"
    num_frames: int
    tasks: tuple              # annotated tasks; empty for test videos
    image_root: str
    seed: np.random.SeedSequence


def _video_names(rng, num_units, num_pairs):
    """Aff-Wild2-like names; a pair is one two-person video, as `_left`/`_right` or as
    the irregular `name` + `name_right` / `name_left` the real release also has."""
    numbers = rng.choice(np.arange(1, 1000), size=num_units, replace=False)
    units = []
    for i, number in enumerate(numbers.tolist()):
        if rng.random() < 0.5:
            base = f"video{number}"
        else:
            width, height = [(640, 360), (640, 480), (1280, 720), (1920, 1080)][rng.integers(4)]
            base = f"{number}-{[24, 25, 30, 60][rng.integers(4)]}-{width}x{height}"
        if i >= num_pairs:
            units.append((base,))
        elif rng.random() < 0.7:
            units.append((f"{base}_left", f"{base}_right"))
        else:
            units.append((base, f"{base}{['_left', '_right'][rng.integers(2)]}"))
    return [units[i] for i in rng.permutation(num_units)]


def _unit_splits(unit_sizes, num_videos):
    """About 10% test and 20% validation folders (at least one each when there are three
    or more), the rest train; both sides of a two-person video share a split."""
    targets = [("test", max(1, round(0.1 * num_videos)) if num_videos >= 3 else 0),
               ("validation", max(1, round(0.2 * num_videos)) if num_videos >= 2 else 0)]
    splits, i = ["train"] * len(unit_sizes), 0
    for split, target in targets:
        taken = 0
        while taken < target and i < len(unit_sizes) - 1:   # the last unit stays in train
            splits[i], taken, i = split, taken + unit_sizes[i], i + 1
    return splits


def _annotated_tasks(rng, splits):
    """Each video carries each task with probability 0.65 and at least one task; every
    task then gets at least one video per annotated split, so each split can train and
    evaluate every head."""
    tasks = []
    for split in splits:
        chosen = {t for t in TASKS if rng.random() < 0.65} if split != "test" else set()
        if split != "test" and not chosen:
            chosen.add(TASKS[rng.integers(len(TASKS))])
        tasks.append(chosen)
    for split in SPLITS:
        members = [i for i, s in enumerate(splits) if s == split]
        for task in TASKS:
            if members and not any(task in tasks[i] for i in members):
                tasks[members[rng.integers(len(members))]].add(task)
    return [tuple(t for t in TASKS if t in chosen) for chosen in tasks]


def plan_release(seed: int, generation: str, num_videos: int, frames_per_video: int) -> list:
    """Names, splits, lengths, annotated tasks and image roots of every video folder."""
    plan_seq, video_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.Generator(np.random.PCG64(plan_seq))
    num_pairs = min(rng.binomial(num_videos // 2, 0.2), max(0, num_videos - 3))
    if num_videos >= 5:
        num_pairs = max(1, num_pairs)
    units = _video_names(rng, num_videos - num_pairs, num_pairs)
    unit_splits = _unit_splits([len(u) for u in units], num_videos)
    lengths = [max(5, round(frames_per_video * rng.uniform(0.7, 1.3))) for _ in units]
    roots = LAYOUTS[generation].image_roots
    # ABAW6 added its last videos in a second image root.
    num_late = num_videos // 4 if len(roots) > 1 else 0
    folders = [(name, split, length) for unit, split, length in zip(units, unit_splits, lengths)
               for name in unit]
    unit_root, late = [], 0
    for unit in reversed(units):
        unit_root.append(roots[-1] if late < num_late else roots[0])
        late += len(unit)
    folder_roots = [root for unit, root in zip(units, reversed(unit_root)) for _ in unit]
    tasks = _annotated_tasks(rng, [split for _, split, _ in folders])
    seeds = video_seq.spawn(len(folders))
    return [VideoPlan(name, split, length, task, root, s) for (name, split, length), task, root, s
            in zip(folders, tasks, folder_roots, seeds)]


def _format_va(values, valid, style):
    if valid:
        return f"{values[0]:.3f},{values[1]:.3f}"
    marker = "-5" if style == 0 else "-5.0"
    if style == 2:                              # only one of the two is marked invalid
        return f"{marker},{values[1]:.3f}"
    return f"{marker},{marker}"


def _annotation_lines(task, labels, valid, va_style):
    """Lines 2.. of one task file: frame k's label, or the task's invalid marker."""
    expr, aus, va = labels
    lines = []
    for k in range(len(expr)):
        if task == "expr":
            lines.append(str(int(expr[k])) if valid[k] else "-1")
        elif task == "au":
            lines.append(",".join(map(str, aus[k].tolist())) if valid[k] else
                         ",".join(["-1"] * len(synthetic_faces.AU_NAMES)))
        else:
            lines.append(_format_va(va[k], valid[k], va_style[k]))
    return lines


def _new_split_counts(num_classes):
    return {"videos": 0, "images": 0, "frames": 0, "labelled": {t: 0 for t in ("expr", "au", "va")},
            "expr_class_counts": [0] * num_classes, "au_positive_counts": [0] * 12,
            "skipped": {"image_absent": 0, "no_valid_label": 0}}


def _count_video(counts, present, valid, labels, extra_lines):
    """Adds one annotated video to its split's ground truth (see generate_release)."""
    expr, aus, _ = labels
    any_valid = np.logical_or.reduce([valid[t] for t in TASKS])
    counts["videos"] += 1
    counts["images"] += int(present.sum())
    counts["frames"] += int((present & any_valid).sum())
    for task in TASKS:
        counts["labelled"][task] += int((present & valid[task]).sum())
    expr_frames = present & valid["expr"]
    classes = np.bincount(expr[expr_frames], minlength=len(counts["expr_class_counts"]))
    counts["expr_class_counts"] = [a + int(b) for a, b in zip(counts["expr_class_counts"], classes)]
    positives = aus[present & valid["au"]].sum(axis=0)
    counts["au_positive_counts"] = [a + int(b) for a, b in zip(counts["au_positive_counts"], positives)]
    counts["skipped"]["image_absent"] += int((~present).sum()) + max(extra_lines.values())
    counts["skipped"]["no_valid_label"] += int((present & ~any_valid).sum())


def _mtl_lines(name, present, valid, labels, va_style):
    """s-Aff-Wild2 rows: every frame with an image, invalid markers where a task is not
    annotated for the video or its line is invalid."""
    expr, aus, va = labels
    rows = []
    for k in np.flatnonzero(present).tolist():
        fields = [f"{name}/{k + 1:05d}.jpg", _format_va(va[k], valid["va"][k], va_style[k]),
                  str(int(expr[k])) if valid["expr"][k] else "-1",
                  ",".join(map(str, aus[k].tolist())) if valid["au"][k] else ",".join(["-1"] * 12)]
        rows.append(",".join(fields))
    return rows
