"""Procedural 112x112 faces whose 12 action units are drawn as the movements they name.

Everything is drawn in a face-centred frame whose unit is half the face width (x right,
y down; eyes near y = -0.12, mouth near y = +0.58, chin near y = +1.3), then mapped to
the canvas by the head pose. Drawing at twice the output size and box-downsampling gives
antialiased edges; a face with its JPEG costs about 1.4 ms of one CPU core.
A full-intensity AU moves its feature by 0.1-0.3 units, i.e. 3-10 output pixels, so a
small CNN at 112x112 can learn every AU from the pixels alone.
"""
import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tfds_affwild2 import annotations

AU_NAMES = annotations.AU_NAMES
IMAGE_SIZE = annotations.IMAGE_SIZE
_SUPERSAMPLE = 2
_CANVAS = IMAGE_SIZE * _SUPERSAMPLE
_NOISE_TILE = IMAGE_SIZE + 48          # sensor-noise texture; frames take shifted crops
_S = np.linspace(-1.0, 1.0, 13)        # parameter along eyelids, brows and lips
_BUMP = 1.0 - _S ** 2                  # 0 at the corners, 1 in the middle
_RING = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
_CIRCLE = np.stack([np.cos(_RING), np.sin(_RING)], axis=1)
_CROWN = np.linspace(np.pi * 0.95, np.pi * 2.05, 16)
_FOREHEAD_X = np.linspace(-0.3, 0.3, 7)
_TEMPLE_X = np.linspace(0.35, 0.75, 6)
_CHIN_X = np.linspace(-0.15, 0.15, 5)


@dataclasses.dataclass(frozen=True, eq=False)
class Identity:
    """What stays constant within one video: the person, the camera and the room."""
    face_half_width: float          # output pixels
    aspect: float                   # face half-height / half-width
    jaw_taper: float
    skin: tuple
    hair: tuple
    hairline: float | None          # y of the hairline; None for a bald head
    hair_length: float              # how far down the sides the hair falls
    lip: tuple
    iris: tuple
    shirt: tuple
    eye_spacing: float
    eye_half_width: float
    eye_open: float
    brow_y: float
    brow_thickness: float
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_half_width: float
    lip_upper: float
    lip_lower: float
    fold_depth: float               # resting depth of the nasolabial folds (age)
    palette: dict                   # colours derived from skin, hair and lips, mixed once
    background: Image.Image         # canvas-sized RGB
    light_gain: np.ndarray          # (112, 112, 3) float32 multiplier: lighting and white balance
    noise: np.ndarray               # (_NOISE_TILE, _NOISE_TILE, 3) float32 sensor noise


@dataclasses.dataclass(frozen=True)
class Pose:
    """Per-frame head pose. Yaw is faked by shifting features by their depth."""
    roll: float = 0.0      # radians, in-plane
    yaw: float = 0.0       # about -0.3..0.3; positive turns the face to the image right
    dx: float = 0.0        # output pixels
    dy: float = 0.0
    scale: float = 1.0
    gaze_x: float = 0.0    # iris offset in eye half-widths
    gaze_y: float = 0.0


def _rgb(values):
    return tuple(int(round(min(255.0, max(0.0, v)))) for v in values)


def _mix(a, b, t):
    return _rgb(np.asarray(a, float) * (1.0 - t) + np.asarray(b, float) * t)


def _sample_background(rng: np.random.Generator) -> Image.Image:
    """Solid wall, colour gradient, blurred clutter or a wall with a window/door."""
    kind = int(rng.integers(4))
    base = rng.uniform(40, 220, size=3)
    other = rng.uniform(40, 220, size=3)
    if kind == 0:
        return Image.new("RGB", (_CANVAS, _CANVAS), _rgb(base))
    if kind == 1:
        t = np.linspace(0.0, 1.0, _CANVAS, dtype=np.float32)[:, None, None]
        ramp = base * (1.0 - t) + other * t
        img = np.broadcast_to(ramp, (_CANVAS, _CANVAS, 3)).astype(np.uint8)
        image = Image.fromarray(img)
        return image.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR, expand=False,
                            fillcolor=_rgb(base)) if rng.random() < 0.5 else image
    if kind == 2:
        coarse = rng.uniform(30, 230, size=(8, 8, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((_CANVAS, _CANVAS), Image.Resampling.BICUBIC).filter(
            ImageFilter.GaussianBlur(6))
    image = Image.new("RGB", (_CANVAS, _CANVAS), _rgb(base))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.uniform(-40, _CANVAS, size=2)
        w, h = rng.uniform(30, 140, size=2)
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_rgb(rng.uniform(30, 240, size=3)))
    return image


def _sample_lighting(rng: np.random.Generator) -> np.ndarray:
    """A brightness gradient from one side plus an overall level and white balance."""
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.0, 0.35)
    grid = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE - 0.5
    ramp = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]
    level = rng.uniform(0.75, 1.15)
    tint = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    return (level * (1.0 + 2.0 * strength * ramp))[:, :, None] * tint


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draws one person (face shape, colours, feature placement) and their setting."""
    skin_dark = rng.uniform(0.0, 1.0)
    skin = _mix((238, 205, 180), (95, 62, 45), skin_dark)
    skin = _rgb(np.asarray(skin) * rng.uniform(0.95, 1.05, size=3))
    hair = _rgb(rng.choice([(25, 20, 18), (60, 40, 25), (110, 75, 40), (170, 130, 80),
                            (120, 40, 20), (150, 150, 150)]) * rng.uniform(0.85, 1.15))
    bald = rng.random() < 0.1
    lip = _mix(skin, (170, 60, 70), rng.uniform(0.45, 0.8))
    palette = {"neck": _mix(skin, (0, 0, 0), 0.18), "ear": _mix(skin, (120, 40, 40), 0.08),
               "eye_white": _mix(skin, (250, 248, 245), 0.8), "shade": _mix(skin, (0, 0, 0), 0.35),
               "brow": _mix(hair, (0, 0, 0), 0.3), "wrinkle": _mix(skin, (40, 20, 10), 0.5),
               "lower_lip": _mix(lip, (255, 255, 255), 0.08), "blush": _mix(skin, (210, 80, 80), 0.5)}
    return Identity(
        face_half_width=float(rng.uniform(29, 34)),
        aspect=float(rng.uniform(1.22, 1.42)),
        jaw_taper=float(rng.uniform(0.15, 0.4)),
        skin=skin,
        hair=hair,
        hairline=None if bald else float(rng.uniform(-1.0, -0.86)),
        hair_length=float(rng.uniform(-0.2, 1.6)),
        lip=lip,
        iris=_rgb(rng.choice([(70, 45, 25), (40, 30, 20), (60, 100, 140), (80, 110, 70)])),
        shirt=_rgb(rng.uniform(20, 235, size=3)),
        eye_spacing=float(rng.uniform(0.38, 0.46)),
        eye_half_width=float(rng.uniform(0.16, 0.2)),
        eye_open=float(rng.uniform(0.075, 0.1)),
        brow_y=float(rng.uniform(-0.42, -0.36)),
        brow_thickness=float(rng.uniform(0.8, 1.3)),
        nose_length=float(rng.uniform(0.2, 0.28)),
        nose_width=float(rng.uniform(0.1, 0.14)),
        mouth_y=float(rng.uniform(0.55, 0.62)),
        mouth_half_width=float(rng.uniform(0.3, 0.37)),
        lip_upper=float(rng.uniform(0.08, 0.11)),
        lip_lower=float(rng.uniform(0.1, 0.14)),
        fold_depth=float(rng.uniform(0.0, 0.3)),
        palette=palette,
        background=_sample_background(rng),
        light_gain=_sample_lighting(rng).astype(np.float32),
        noise=rng.normal(0.0, rng.uniform(1.5, 4.0),
                         size=(_NOISE_TILE, _NOISE_TILE, 3)).astype(np.float32),
    )


class _Canvas:
    """Collects shapes in face coordinates, then maps them all to canvas pixels with one
    matrix product and draws them in order (one NumPy pass instead of one per shape)."""

    def __init__(self, identity: Identity, pose: Pose):
        self.identity = identity
        self.pose = pose
        self.shapes = []                   # (points (n, 2), depth, fill, line width or None)

    def polygon(self, xy, fill, depth=0.2):
        self.shapes.append((np.asarray(xy, dtype=float), depth, fill, None))

    def line(self, xy, fill, width, depth=0.2):
        if len(fill) == 4 and fill[3] < 4:    # an AU at rest draws nothing: skip the work
            return
        self.shapes.append((np.asarray(xy, dtype=float), depth, fill, width))

    def ellipse(self, cx, cy, rx, ry, fill, depth=0.2):
        self.shapes.append((_CIRCLE * (rx, ry) + (cx, cy), depth, fill, None))

    def render(self) -> Image.Image:
        pose = self.pose
        unit = self.identity.face_half_width * _SUPERSAMPLE * pose.scale
        c, s = np.cos(pose.roll), np.sin(pose.roll)
        matrix = unit * np.array([[c, -s], [s, c]])
        offset = np.array([_CANVAS / 2 + pose.dx * _SUPERSAMPLE,
                           _CANVAS * 0.54 + pose.dy * _SUPERSAMPLE])
        sizes = [len(shape[0]) for shape in self.shapes]
        xy = np.concatenate([shape[0] for shape in self.shapes])
        # Yaw: points that stand out of the face (nose tip) shift more than the outline.
        xy[:, 0] += pose.yaw * np.repeat([shape[1] for shape in self.shapes], sizes)
        flat = (xy @ matrix.T + offset).ravel().tolist()
        image = self.identity.background.copy()
        opaque = ImageDraw.Draw(image)
        blend = ImageDraw.Draw(image, "RGBA")      # blending costs 3x: only for translucent fills
        px = unit / 30.0                   # line widths are given for a 30-pixel unit
        start = 0
        for (_, _, fill, width), size in zip(self.shapes, sizes):
            coords = flat[start:start + 2 * size]
            start += 2 * size
            draw = blend if len(fill) == 4 else opaque
            if width is None:
                draw.polygon(coords, fill=fill)
            else:
                draw.line(coords, fill=fill, width=max(1, int(round(width * px))))
        return image


def _curve(x, y):
    return np.stack([x, y], axis=1)


def _draw_head(cv: _Canvas, idt: Identity, au26: float):
    """Shoulders, hair, ears and the face outline; AU26 lowers the chin."""
    cv.polygon([(-2.6, 3.2), (-2.2, 1.85), (-0.5, 1.55), (0.5, 1.55), (2.2, 1.85), (2.6, 3.2)],
               idt.shirt, depth=0.0)
    cv.polygon([(-0.48, 0.6), (0.48, 0.6), (0.52, 1.75), (-0.52, 1.75)],
               idt.palette["neck"], depth=0.0)
    if idt.hairline is not None:
        crown = _curve(1.14 * np.cos(_CROWN), -0.25 + (idt.aspect * 1.02) * np.sin(_CROWN))
        bottom = max(-0.2, idt.hair_length)
        sides = [(1.16, bottom), (0.95, bottom + 0.1), (-0.95, bottom + 0.1), (-1.16, bottom)]
        cv.polygon(np.concatenate([crown, sides]), idt.hair, depth=-0.1)
    for side in (-1.0, 1.0):
        cv.ellipse(side * 0.97, -0.05, 0.14, 0.24, idt.palette["ear"], depth=-0.3)
    x, y = np.cos(_RING), np.sin(_RING)
    lower = np.clip(y, 0.0, None)
    x = x * (1.0 - idt.jaw_taper * lower ** 3)
    y = idt.aspect * y + 0.22 * au26 * lower ** 2
    cv.polygon(_curve(x, y), idt.skin, depth=0.0)
    if idt.hairline is not None:
        top = _RING[20:]                             # upper half of the outline, left to right
        cap = _curve(1.03 * np.cos(top), 1.03 * idt.aspect * np.sin(top))
        cap = cap[cap[:, 1] < idt.hairline + 0.25]
        fringe = _curve(np.array([0.92, 0.4, -0.1, -0.6, -0.92]),
                        idt.hairline + np.array([0.25, 0.04, 0.0, 0.06, 0.25]))
        cv.polygon(np.concatenate([cap, fringe]), idt.hair, depth=0.0)


def _draw_eye(cv: _Canvas, idt: Identity, side: float, au: dict, pose: Pose):
    """Eye with lids: AU7 narrows the aperture, AU6 pushes the lower lid up."""
    cx, cy = side * idt.eye_spacing, -0.12
    half_w = idt.eye_half_width * (1.0 - 0.25 * pose.yaw * side)
    up = idt.eye_open * (1.0 - 0.65 * au["AU7"] - 0.2 * au["AU6"] + 0.15 * au["AU2"])
    down = 0.7 * idt.eye_open * (1.0 - 0.75 * au["AU6"] - 0.45 * au["AU7"])
    x = cx + _S * half_w
    upper = _curve(x, cy - up * _BUMP ** 0.6 - 0.01 * side * _S)
    lower = _curve(x, cy + down * _BUMP ** 0.8)
    cv.polygon(np.concatenate([upper, lower[::-1]]), idt.palette["eye_white"])
    gx = cx + pose.gaze_x * half_w * 0.45
    gy = cy + pose.gaze_y * idt.eye_open * 0.5
    cv.ellipse(gx, gy, 0.085, 0.085, idt.iris, depth=0.25)
    cv.ellipse(gx, gy, 0.04, 0.04, (15, 10, 10), depth=0.25)
    cv.ellipse(gx + 0.025, gy - 0.03, 0.015, 0.015, (250, 250, 250), depth=0.25)
    # Skin-coloured lids drawn over the iris clip it to the eye opening.
    edge = np.array([[cx + 1.2 * half_w, cy], [cx + 1.2 * half_w, cy - 0.2],
                     [cx - 1.2 * half_w, cy - 0.2], [cx - 1.2 * half_w, cy]])
    cv.polygon(np.concatenate([upper, edge]), idt.skin)
    cv.polygon(np.concatenate([lower, edge * [1, -1] + [0, 2 * cy]]), idt.skin)
    lid = idt.palette["shade"]
    cv.line(upper - [0, 0.05 + 0.5 * (idt.eye_open - up)], lid + (140,), 0.8)
    cv.line(upper, (25, 15, 15), 2.2)
    cv.line(lower, lid + (200,), 1.0)
    crease = 0.06 + 0.04 * au["AU6"]                 # the cheek bulge under the eye
    cv.line(lower + [0, crease], lid + (int(50 + 170 * au["AU6"]),), 1.2)
    corner_x = side * (idt.eye_spacing + half_w + 0.04)
    for angle in (-0.5, 0.0, 0.5):                   # crow's feet
        dx, dy = 0.14 * side * np.cos(angle), 0.14 * np.sin(angle)
        cv.line([(corner_x, cy), (corner_x + dx, cy + dy)], lid + (int(220 * au["AU6"]),), 1.3)


def _draw_brow(cv: _Canvas, idt: Identity, side: float, au: dict):
    """AU1 lifts the inner end, AU2 the outer end, AU4 lowers and draws the brows together."""
    inner = np.array([side * (0.13 - 0.08 * au["AU4"]),
                      idt.brow_y - 0.2 * au["AU1"] + 0.15 * au["AU4"]])
    outer = np.array([side * (idt.eye_spacing + idt.eye_half_width + 0.07),
                      idt.brow_y + 0.06 - 0.22 * au["AU2"] + 0.08 * au["AU4"]])
    arch = (inner + outer) / 2 - [0, 0.09 + 0.04 * au["AU2"] - 0.04 * au["AU4"]]
    t = (_S[:, None] + 1.0) / 2.0
    centre = (1 - t) ** 2 * inner + 2 * (1 - t) * t * arch + t ** 2 * outer
    half = idt.brow_thickness * (0.04 - 0.018 * t)
    brow = np.concatenate([centre - half * [0, 1], (centre + half * [0, 1])[::-1]])
    cv.polygon(brow, idt.palette["brow"], depth=0.15)


def _draw_wrinkles(cv: _Canvas, idt: Identity, au: dict):
    """Forehead lines (AU1 centre, AU2 sides) and the vertical furrows of AU4."""
    line = idt.palette["wrinkle"]
    for row in (0.2, 0.32):
        y = idt.brow_y - row - 0.1 * au["AU1"]
        cv.line(_curve(_FOREHEAD_X, y + 0.04 * (_FOREHEAD_X / 0.3) ** 2),
                line + (int(190 * au["AU1"]),), 1.1)
        for side in (-1.0, 1.0):
            xs = side * _TEMPLE_X
            cv.line(_curve(xs, y + 0.06 - 0.12 * au["AU2"] + 0.6 * (xs - side * 0.55) ** 2),
                    line + (int(190 * au["AU2"]),), 1.1)
    y0 = idt.brow_y + 0.14 * au["AU4"]
    for x in (-0.06, 0.06):
        cv.line([(x, y0 - 0.02), (x * 0.7, y0 + 0.17)], line + (int(230 * au["AU4"]),), 1.5)


def _draw_nose(cv: _Canvas, idt: Identity, au10: float):
    """Nose; AU10 lifts the wings together with the upper lip."""
    shade = idt.palette["shade"]
    tip, wing = idt.nose_length, idt.nose_width
    lift = 0.05 * au10
    cv.line([(0.09, -0.06), (0.1, tip - 0.08)], shade + (90,), 1.0, depth=0.3)
    cv.line([(-wing, tip - 0.04 - lift), (-0.5 * wing, tip + 0.03 - lift), (0.0, tip + 0.04),
             (0.5 * wing, tip + 0.03 - lift), (wing, tip - 0.04 - lift)], shade + (200,), 1.4,
            depth=0.4)
    for side in (-1.0, 1.0):
        cv.ellipse(side * 0.05, tip + 0.01 - lift, 0.035, 0.018, shade + (230,), depth=0.4)


def _mouth_shape(idt: Identity, au: dict):
    """Lip curves (x, upper outer, upper inner, lower inner, lower outer) of the mouth."""
    half_w = idt.mouth_half_width * (1.0 + 0.24 * au["AU12"] - 0.3 * au["AU23"]
                                     - 0.1 * au["AU24"] - 0.12 * au["AU26"])
    corner = (-0.2 * au["AU12"] + 0.2 * au["AU15"]) * (1.0 - 0.6 * au["AU24"])
    thin = np.clip(1.0 - 0.45 * au["AU23"] - 0.75 * au["AU24"], 0.15, 1.0)
    y_mid = idt.mouth_y + 0.03 * au["AU15"]
    line = y_mid + corner * (0.35 * _S ** 2 + 0.65 * _S ** 4)
    opening = _BUMP ** 0.7
    inner_up = line - (0.03 * au["AU25"] + 0.05 * au["AU26"] + 0.1 * au["AU10"]) * opening
    inner_lo = line + (0.06 * au["AU25"] + 0.3 * au["AU26"]) * opening
    bow = 1.0 - 0.35 * np.exp(-(_S / 0.15) ** 2)    # cupid's bow
    outer_up = inner_up - (idt.lip_upper * thin + 0.03 * au["AU10"]) * _BUMP ** 0.5 * bow
    outer_lo = inner_lo + idt.lip_lower * thin * _BUMP ** 0.5
    return _S * half_w, outer_up, inner_up, inner_lo, outer_lo


def _draw_mouth(cv: _Canvas, idt: Identity, au: dict):
    """Lips, the opening with teeth, and the folds that AU10/AU12/AU24 deepen."""
    x, outer_up, inner_up, inner_lo, outer_lo = _mouth_shape(idt, au)
    fold = idt.palette["wrinkle"]
    depth = idt.fold_depth + 0.7 * max(au["AU12"], au["AU10"], 0.6 * au["AU6"])
    for side in (-1.0, 1.0):                        # nasolabial folds follow the corners
        corner = np.array([x[-1] * side, inner_up[-1]])
        start = np.array([side * (idt.nose_width + 0.05), idt.nose_length - 0.04])
        mid = (start + corner) / 2 + [side * 0.08, 0.0]
        cv.line([start, mid, corner + [side * 0.07, 0.03]], fold + (int(230 * min(1.0, depth)),), 1.4)
    if np.max(inner_lo - inner_up) > 0.006:
        cv.polygon(np.concatenate([_curve(x, inner_up), _curve(x, inner_lo)[::-1]]), (70, 20, 28))
        teeth = np.minimum(inner_up + 0.07 * _BUMP ** 0.5, inner_lo)
        keep = np.abs(_S) < 0.8
        cv.polygon(np.concatenate([_curve(x[keep], inner_up[keep]), _curve(x[keep], teeth[keep])[::-1]]),
                   (238, 234, 222))
    cv.polygon(np.concatenate([_curve(x, outer_up), _curve(x, inner_up)[::-1]]), idt.lip)
    cv.polygon(np.concatenate([_curve(x, inner_lo), _curve(x, outer_lo)[::-1]]),
               idt.palette["lower_lip"])
    cv.line(_curve(x, (inner_up + inner_lo) / 2), (60, 25, 25) + (int(200 + 55 * au["AU24"]),),
            1.4 + 0.6 * au["AU24"])
    bulge = fold + (int(200 * au["AU24"]),)        # pressed lips push the skin out around them
    keep = np.abs(_S) < 0.7
    cv.line(_curve(x[keep], outer_up[keep] - 0.05), bulge, 1.1)
    cv.line(_curve(x[keep], outer_lo[keep] + 0.05), bulge, 1.1)
    chin_y = outer_lo.max() + 0.17 + 0.04 * (_CHIN_X / 0.15) ** 2     # follows the jaw (AU26)
    cv.line(_curve(_CHIN_X, chin_y), fold + (70,), 1.0)


def _draw_cheeks(cv: _Canvas, idt: Identity, au6: float):
    """AU6 raises and rounds the cheeks."""
    blush = idt.palette["blush"]
    for side in (-1.0, 1.0):
        cv.ellipse(side * 0.56, 0.24 - 0.16 * au6, 0.17 * (1 + 0.2 * au6), 0.11 * (1 + 0.3 * au6),
                   blush + (int(40 + 90 * au6),))


def au_dict(intensities) -> dict:
    """Maps a length-12 sequence of intensities in [0, 1] to AU names."""
    values = np.clip(np.asarray(intensities, dtype=float), 0.0, 1.0)
    if values.shape != (len(AU_NAMES),):
        raise ValueError(f"expected {len(AU_NAMES)} AU intensities, got shape {values.shape}")
    return dict(zip(AU_NAMES, values.tolist()))


def render_face(identity: Identity, au_intensities, pose: Pose = Pose(),
                noise_offset=None) -> np.ndarray:
    """One 112x112x3 uint8 face. `noise_offset` (two ints) picks the sensor-noise crop;
    None renders without noise, so two renders differ only where the face differs."""
    au = au_dict(au_intensities)
    cv = _Canvas(identity, pose)
    _draw_head(cv, identity, au["AU26"])
    for side in (-1.0, 1.0):
        _draw_eye(cv, identity, side, au, pose)
    _draw_cheeks(cv, identity, au["AU6"])
    _draw_wrinkles(cv, identity, au)
    for side in (-1.0, 1.0):
        _draw_brow(cv, identity, side, au)
    _draw_nose(cv, identity, au["AU10"])
    _draw_mouth(cv, identity, au)
    image = cv.render().reduce(_SUPERSAMPLE)
    pixels = np.asarray(image, dtype=np.float32) * identity.light_gain
    if noise_offset is not None:
        oy, ox = (int(v) % (_NOISE_TILE - IMAGE_SIZE) for v in noise_offset)
        pixels += identity.noise[oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE]
    return np.clip(pixels, 0.0, 255.0).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()
