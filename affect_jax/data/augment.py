"""Host-side augmentation of uint8 face crops (OpenCV), seeded per image.

An image's random parameters are all drawn first; crop + flip without rotation is an
integer crop and a resize, otherwise one warp (in RGBA, OpenCV's SIMD path) whose map
also holds RandAugment's shear and translate; the colour jitter is one 3x4 colour
matrix. Policies: none, basic, strong, randaugment (`AugmentConfig.from_policy`)."""
from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np

from affect_jax.vocabulary import IMAGE_SIZE


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Host-side augmentation; all off is the eval policy."""
  flip: bool = False
  crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction of random resized crop
  crop_ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio range of the crop
  rotation_degrees: float = 0.0
  brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
  contrast: float = 0.0
  saturation: float = 0.0
  randaugment_ops: int = 0  # RandAugment-like: this many ops drawn from RANDAUGMENT_OPS
  randaugment_magnitude: float = 0.0  # in [0, 1]

  @classmethod
  def from_policy(cls, policy: str) -> "AugmentConfig":
    """Named policies of the study: none, basic (flip + crop), strong (+ rotation,
    colour), randaugment (strong + 2 RandAugment-like ops at magnitude 0.5)."""
    if policy == "none":
      return cls()
    if policy == "basic":
      return cls(flip=True, crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1))
    if policy == "strong":
      return cls(flip=True, crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25),
                 rotation_degrees=15.0, brightness=0.3, contrast=0.3, saturation=0.3)
    if policy == "randaugment":
      return cls(flip=True, crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25),
                 rotation_degrees=15.0, brightness=0.3, contrast=0.3, saturation=0.3,
                 randaugment_ops=2, randaugment_magnitude=0.5)
    raise ValueError(f"unknown augmentation policy {policy!r}; expected none, basic, "
                     "strong or randaugment")


def _uniform(low: float, high: float, u: float) -> float:
  return low + (high - low) * u


def crop_draws(rng: np.random.Generator, size: int, cfg: AugmentConfig):
  """(crop width, crop height, centre x, centre y, angle in radians, flip) of a random
  resized crop, in continuous coordinates (pixel i spans [i, i+1)), from 5 uniform
  draws in this order (area, log aspect ratio, centre x, centre y, angle), and a sixth,
  the flip coin, when cfg.flip."""
  u = rng.random(6 if cfg.flip else 5).tolist()
  area = size * size * _uniform(*cfg.crop_scale, u[0])
  log_ratio = _uniform(np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1]), u[1])
  ratio = math.exp(log_ratio)
  crop_w = min(size, math.sqrt(area * ratio))
  crop_h = min(size, math.sqrt(area / ratio))
  centre_x = _uniform(crop_w / 2, size - crop_w / 2, u[2])
  centre_y = _uniform(crop_h / 2, size - crop_h / 2, u[3])
  angle = math.radians(_uniform(-cfg.rotation_degrees, cfg.rotation_degrees, u[4]))
  flip = cfg.flip and u[5] < 0.5
  return crop_w, crop_h, centre_x, centre_y, angle, flip


# 2x3 affine maps are ((a, b, c), (d, e, f)) rows of Python floats (composed in Python:
# NumPy's per-call overhead is larger than the arithmetic), an np.ndarray only for
# OpenCV. All are output->input maps in OpenCV's pixel-centre coordinates.
_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def _crop_rows(draws, size: int):
  """The map of `crop_draws`' crop+rotation+flip."""
  crop_w, crop_h, centre_x, centre_y, angle, flip = draws
  scale_x, scale_y = crop_w / size * (-1.0 if flip else 1.0), crop_h / size
  cos, sin = math.cos(angle), math.sin(angle)
  # In continuous coordinates (pixel i spans [i, i+1)):
  #   input = centre + R(angle) @ diag(scale) @ (output - size/2).
  # OpenCV puts pixel i's centre at i, not i + 0.5: shift both sides by half a pixel,
  # which makes a flip map pixel i exactly onto pixel size-1-i.
  a, b = cos * scale_x, -sin * scale_y
  d, e = sin * scale_x, cos * scale_y
  half = (size - 1) / 2  # size/2 - 0.5
  return ((a, b, centre_x - (a + b) * half - 0.5),
          (d, e, centre_y - (d + e) * half - 0.5))


def _then(first, second):
  """The map of warping by `first`, then warping the result by `second`:
  input = first(second(output))."""
  (a, b, c), (d, e, f) = first
  (p, q, r), (s, t, u) = second
  return ((a * p + b * s, a * q + b * t, a * r + b * u + c),
          (d * p + e * s, d * q + e * t, d * r + e * u + f))


def warp(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Bilinear warp of RGB uint8 by a 2x3 output->input map, mirrored borders, same size
  out. Warped as RGBA: OpenCV's bilinear remap has a SIMD path for 4 channels, not for
  3 (59 instead of 100 us at 112x112, the two conversions included), and each channel is
  interpolated on its own with the same fixed-point weights, so the RGB values are those
  of a 3-channel warp (tests/test_input_fast_path.py checks it bit for bit)."""
  size = pixels.shape[1], pixels.shape[0]
  warped = cv2.warpAffine(cv2.cvtColor(pixels, cv2.COLOR_RGB2RGBA), matrix, size,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)
  return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)


def crop_resize_flip(pixels: np.ndarray, draws, size: int) -> np.ndarray:
  """Without rotation a crop + flip is an axis-aligned box: an integer crop, cv2.resize
  (bilinear, the warp's interpolation) and cv2.flip, ~1.4x cheaper than warping the
  whole image. The draws are the warp's; the box is rounded to whole pixels (as
  torchvision's RandomResizedCrop), so a full-size box is the image itself, exactly."""
  crop_w, crop_h, centre_x, centre_y, _, flip = draws
  x0 = max(0, round(centre_x - crop_w / 2))
  y0 = max(0, round(centre_y - crop_h / 2))
  x1 = min(size, max(x0 + 1, round(centre_x + crop_w / 2)))
  y1 = min(size, max(y0 + 1, round(centre_y + crop_h / 2)))
  if (x0, y0, x1, y1) != (0, 0, size, size):
    pixels = cv2.resize(pixels[y0:y1, x0:x1], (size, size),
                        interpolation=cv2.INTER_LINEAR)
  return cv2.flip(pixels, 1) if flip else pixels


# ITU-R BT.601 luma weights, those of cv2.COLOR_RGB2GRAY.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def colour_draws(rng: np.random.Generator, cfg: AugmentConfig):
  """(brightness, contrast, saturation) factors, each uniform in [1 - strength,
  1 + strength), drawn in that order for the strengths that are not 0 (else 1.0)."""
  strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
  u = iter(rng.random(sum(1 for s in strengths if s)).tolist())
  return tuple(_uniform(1 - s, 1 + s, next(u)) if s else 1.0 for s in strengths)


def colour_matrix(factors, pixels: np.ndarray) -> np.ndarray:
  """Brightness, contrast and saturation jitter as one affine colour map [3, 4].

  Each is affine in RGB: brightness x -> b x; contrast x -> c x + (1 - c) m with m the
  mean grey level after brightness; saturation x -> s x + (1 - s) w.x with w the grey
  weights (which sum to 1). Composed: x -> b c (s I + (1 - s) 1 w^T) x + (1 - c) m.
  """
  b, c, s = factors
  offset = 0.0
  if c != 1.0:
    red, green, blue, _ = cv2.mean(pixels)
    grey = GREY_WEIGHTS[0] * red + GREY_WEIGHTS[1] * green + GREY_WEIGHTS[2] * blue
    offset = (1 - c) * b * grey
  keep, mix = b * c * s, b * c * (1 - s)
  red, green, blue = (mix * w for w in GREY_WEIGHTS)
  return np.array([[keep + red, green, blue, offset],
                   [red, keep + green, blue, offset],
                   [red, green, keep + blue, offset]], np.float64)


def jitter_colours(pixels: np.ndarray, factors) -> np.ndarray:
  """Brightness, contrast, saturation (`colour_draws`' factors): one cv2.transform with
  `colour_matrix` (uint8 in, rounded and saturated uint8 out: one saturation at the
  end, not one per step)."""
  return cv2.transform(pixels, colour_matrix(factors, pixels))


# RandAugment's geometric ops: f(signed magnitude in [-1, 1], size) -> the map, for an
# image of size x size. `augment_image` composes them into the crop warp. shear_x moves
# the content at (x, y) to x + a (y - centre), about the image's centre ((size - 1) / 2
# in OpenCV's coordinates; the shears warped on their own used size / 2, 0.075 px off at
# most); translate_x moves it to x + fraction * size. _y: the same along y.
def _shear_rows(amount: float, axis: int, size: int):
  centre = (size - 1) / 2
  if axis == 0:
    return (1.0, -amount, amount * centre), (0.0, 1.0, 0.0)
  return (1.0, 0.0, 0.0), (-amount, 1.0, amount * centre)


def _translate_rows(fraction: float, axis: int, size: int):
  shift = -fraction * size
  if axis == 0:
    return (1.0, 0.0, shift), (0.0, 1.0, 0.0)
  return (1.0, 0.0, 0.0), (0.0, 1.0, shift)


GEOMETRIC_OPS = {
    "shear_x": lambda m, size: _shear_rows(0.3 * m, 0, size),
    "shear_y": lambda m, size: _shear_rows(0.3 * m, 1, size),
    "translate_x": lambda m, size: _translate_rows(0.2 * m, 0, size),
    "translate_y": lambda m, size: _translate_rows(0.2 * m, 1, size),
}


_LEVELS = np.arange(256, dtype=np.uint8)


def _read_only(table: np.ndarray) -> np.ndarray:
  table.flags.writeable = False  # cached and shared by every call
  return table


@functools.lru_cache(maxsize=4096)
def _autocontrast_table(low: int, high: int) -> np.ndarray:
  """uint8 [256]: level x -> (x - low) * 255 / max(high - low, 1) rounded, in float32.
  Cached: most face crops span nearly the whole range, so few (low, high) pairs occur."""
  low32, high32 = np.float32(low), np.float32(high)
  scale = np.float32(255.0) / max(high32 - low32, np.float32(1.0))
  table = (_LEVELS.astype(np.float32) - low32) * scale + np.float32(0.5)
  return _read_only(np.clip(table, 0, 255).astype(np.uint8))


def _autocontrast(pixels, magnitude):
  """Each channel stretched to [0, 255] through its `_autocontrast_table`."""
  del magnitude
  # cv2.minMaxLoc per channel: NumPy's uint8 min over (0, 1) is ~20x slower here. Three
  # one-channel lookups and a merge are cheaper than one lookup with a 3-channel table.
  channels = cv2.split(pixels)
  return cv2.merge([cv2.LUT(c, _autocontrast_table(*map(int, cv2.minMaxLoc(c)[:2])))
                    for c in channels])


@functools.lru_cache(maxsize=64)
def _solarize_table(threshold: float) -> np.ndarray:
  table = np.where(_LEVELS < threshold, _LEVELS, 255 - _LEVELS)
  return _read_only(table.astype(np.uint8))


def _solarize(pixels, magnitude):
  """Levels at or above 256 - 128 |m| inverted (a lookup table, one per magnitude)."""
  return cv2.LUT(pixels, _solarize_table(256 - 128 * abs(magnitude)))


def _sharpness(pixels, magnitude):
  blurred = cv2.GaussianBlur(pixels, (3, 3), 0)
  return cv2.addWeighted(pixels, 1 + 2 * magnitude, blurred, -2 * magnitude, 0.0)


# op name -> f(pixels, signed magnitude in [-1, 1]): the photometric operations of
# RandAugment (Cubuk et al. 2020) that keep a face's labels.
PHOTOMETRIC_OPS = {
    "autocontrast": _autocontrast,
    "equalize": lambda p, m: cv2.merge([cv2.equalizeHist(c) for c in cv2.split(p)]),
    "posterize": lambda p, m: p & np.uint8((0xFF << int(round(4 * abs(m)))) & 0xFF),
    "solarize": _solarize,
    "sharpness": lambda p, m: _sharpness(p, abs(m)),
}


# Every op on its own, f(pixels, signed magnitude): a geometric op is then a warp of its
# own (inside `augment_image` it is composed into the crop warp instead).
RANDAUGMENT_OPS = {
    **{name: (lambda p, m, op=op: warp(p, np.array(op(m, p.shape[0]))))
       for name, op in GEOMETRIC_OPS.items()},
    **PHOTOMETRIC_OPS,
}


_RANDAUGMENT_NAMES = tuple(sorted(RANDAUGMENT_OPS))


def randaugment_draws(rng: np.random.Generator, cfg: AugmentConfig):
  """[(op name, signed magnitude)] of one image, in the order they apply: the first
  `randaugment_ops` of a permutation of the sorted op names (distinct ops, every
  ordered choice equally likely), then one sign each, + when rng.random() < 0.5. (A
  permutation of nine is ~4x cheaper than Generator.choice without replacement.)"""
  count, magnitude = cfg.randaugment_ops, cfg.randaugment_magnitude
  if count > len(_RANDAUGMENT_NAMES):
    raise ValueError(f"{count} RandAugment ops drawn from {len(_RANDAUGMENT_NAMES)}")
  picked = rng.permutation(len(_RANDAUGMENT_NAMES))[:count].tolist()
  signs = rng.random(count).tolist()
  return [(_RANDAUGMENT_NAMES[i], magnitude if u < 0.5 else -magnitude)
          for i, u in zip(picked, signs)]


def geometry_map(crop, ops, size: int) -> np.ndarray:
  """One 2x3 map for the crop (`crop_draws`' tuple, or None: the identity) followed by
  the geometric ops among `ops`, in their order."""
  rows = _crop_rows(crop, size) if crop else _IDENTITY
  for name, magnitude in ops:
    if name in GEOMETRIC_OPS:
      rows = _then(rows, GEOMETRIC_OPS[name](magnitude, size))
  return np.array(rows, np.float64)


def augment_image(pixels: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                  size: int = IMAGE_SIZE) -> np.ndarray:
  """Resize to size; crop + flip; colour jitter as one colour matrix; RandAugment ops.
  uint8 [H, W, 3] in and out.

  All random parameters are drawn first (the order is the comment above `_uniform`).
  The geometry is one warp, or, without rotation and without a geometric RandAugment op,
  an integer crop, a resize and a flip. RandAugment's geometric ops (shear, translate)
  are composed into the crop warp's map: one interpolation instead of two or three, and
  the mirrored border is the source image's. So in the "randaugment" policy the
  geometric ops come first, then the colour matrix, then the photometric ops in their
  drawn order.
  """
  if pixels.shape[:2] != (size, size):
    pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
  crops = cfg.rotation_degrees or cfg.flip or cfg.crop_scale != (1.0, 1.0)
  crop = crop_draws(rng, size, cfg) if crops else None
  colour = (colour_draws(rng, cfg) if cfg.brightness or cfg.contrast or cfg.saturation
            else None)
  ops = randaugment_draws(rng, cfg) if cfg.randaugment_ops else ()
  if cfg.rotation_degrees or any(name in GEOMETRIC_OPS for name, _ in ops):
    pixels = warp(pixels, geometry_map(crop, ops, size))
  elif crop:
    pixels = crop_resize_flip(pixels, crop, size)
  if colour:
    pixels = jitter_colours(pixels, colour)
  for name, magnitude in ops:
    if name in PHOTOMETRIC_OPS:
      pixels = PHOTOMETRIC_OPS[name](pixels, magnitude)
  return np.ascontiguousarray(pixels, np.uint8)


