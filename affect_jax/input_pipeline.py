"""grain input pipeline: TFDS `affwild2` data source -> shuffled, sharded, decoded,
augmented uint8 batches for the devices of this process.

Records are read by `RawExampleSource` (the tf.train.Example parsed by protobuf, without
TFDS's per-record feature decoding); each batch is one grain element (read, decode,
augment, written into the batch's arrays); augmentation is OpenCV on uint8: a warp only
when there is rotation or a RandAugment shear / translate (composed into the same warp),
else an integer crop + resize + flip, and the colour jitter as one colour matrix. Images
leave the host as uint8 (a quarter of float32's bytes); `normalize_images` turns them
into float on the device, inside the jitted step. The record order is one global stream
(a seeded shuffle per epoch) of which each process reads its rows of every global batch,
and each augmentation is seeded by (config seed, global stream position): a batch
depends neither on the number of worker processes nor on the number of JAX processes,
and the iterator state (`get_state`) is enough to resume exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys

import cv2
import grain
from absl import flags
import numpy as np

# Decoding and augmentation run in grain's worker processes, one image at a time: a
# thread pool per process would only oversubscribe the cores.
cv2.setNumThreads(1)
log = logging.getLogger(__name__)

IMAGE_SIZE = 112
NUM_AUS = 12
# ImageNet statistics: the convention of the pretrained ResNet-18 weights users import.
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
LABEL_KEYS = ("expression", "expression_mask", "au", "au_mask", "valence_arousal",
              "va_mask")


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


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG (or PNG) bytes -> uint8 RGB [H, W, 3]; OpenCV decodes 112x112 JPEG ~1.7x
  faster than PIL here. Undecodable bytes are a ValueError."""
  try:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
  except cv2.error:  # empty bytes
    pixels = None
  if pixels is None:
    raise ValueError(f"not a decodable image ({len(data)} bytes)")
  return pixels


# Augmentation. One image's random parameters are all drawn first, from its own
# generator, in this order (which, with the seed, defines the image's augmentation):
#   1. the crop (`_crop_draws`), when the config crops, flips or rotates;
#   2. the colour factors (`_colour_draws`), those whose strength is not 0;
#   3. the RandAugment ops and their signs (`_randaugment_draws`), when there are any.
# Then the pixels are transformed: one geometric warp (or a crop + resize + flip), the
# colour matrix, the photometric RandAugment ops in their drawn order.
#
# A value "uniform in [low, high)" is low + (high - low) * u with u from one vectorised
# Generator.random call: what Generator.uniform(low, high) computes from the same u
# (numpy's random_uniform), so the values are those of the scalar uniform calls that
# defined these draws before, at a tenth of the cost (tests compare both; a NumPy built
# to fuse that multiply-add into one FMA would differ in the last bit).


def _uniform(low: float, high: float, u: float) -> float:
  return low + (high - low) * u


def _crop_draws(rng: np.random.Generator, size: int, cfg: AugmentConfig):
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
  """The map of `_crop_draws`' crop+rotation+flip."""
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


def _crop_map(draws, size: int) -> np.ndarray:
  return np.array(_crop_rows(draws, size), np.float64)


def _then(first, second):
  """The map of warping by `first`, then warping the result by `second`:
  input = first(second(output))."""
  (a, b, c), (d, e, f) = first
  (p, q, r), (s, t, u) = second
  return ((a * p + b * s, a * q + b * t, a * r + b * u + c),
          (d * p + e * s, d * q + e * t, d * r + e * u + f))


def _warp(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
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


def _crop_resize_flip(pixels: np.ndarray, draws, size: int) -> np.ndarray:
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


def _colour_draws(rng: np.random.Generator, cfg: AugmentConfig):
  """(brightness, contrast, saturation) factors, each uniform in [1 - strength,
  1 + strength), drawn in that order for the strengths that are not 0 (else 1.0)."""
  strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
  u = iter(rng.random(sum(1 for s in strengths if s)).tolist())
  return tuple(_uniform(1 - s, 1 + s, next(u)) if s else 1.0 for s in strengths)


def _colour_matrix(factors, pixels: np.ndarray) -> np.ndarray:
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


def _jitter_colours(pixels: np.ndarray, factors) -> np.ndarray:
  """Brightness, contrast, saturation (`_colour_draws`' factors): one cv2.transform with
  `_colour_matrix` (uint8 in, rounded and saturated uint8 out: one saturation at the
  end, not one per step)."""
  return cv2.transform(pixels, _colour_matrix(factors, pixels))


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
    **{name: (lambda p, m, op=op: _warp(p, np.array(op(m, p.shape[0]))))
       for name, op in GEOMETRIC_OPS.items()},
    **PHOTOMETRIC_OPS,
}
_RANDAUGMENT_NAMES = tuple(sorted(RANDAUGMENT_OPS))


def _randaugment_draws(rng: np.random.Generator, cfg: AugmentConfig):
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


def _geometry_map(crop, ops, size: int) -> np.ndarray:
  """One 2x3 map for the crop (`_crop_draws`' tuple, or None: the identity) followed by
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
  the mirrored border is the source image's. This deliberately redefines the
  "randaugment" policy, which used to warp once more per geometric op after the colour
  jitter and the ops drawn before it: the geometric ops now come first, then the colour
  matrix, then the photometric ops in their drawn order.
  """
  if pixels.shape[:2] != (size, size):
    pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
  crops = cfg.rotation_degrees or cfg.flip or cfg.crop_scale != (1.0, 1.0)
  crop = _crop_draws(rng, size, cfg) if crops else None
  colour = (_colour_draws(rng, cfg) if cfg.brightness or cfg.contrast or cfg.saturation
            else None)
  ops = _randaugment_draws(rng, cfg) if cfg.randaugment_ops else ()
  if cfg.rotation_degrees or any(name in GEOMETRIC_OPS for name, _ in ops):
    pixels = _warp(pixels, _geometry_map(crop, ops, size))
  elif crop:
    pixels = _crop_resize_flip(pixels, crop, size)
  if colour:
    pixels = _jitter_colours(pixels, colour)
  for name, magnitude in ops:
    if name in PHOTOMETRIC_OPS:
      pixels = PHOTOMETRIC_OPS[name](pixels, magnitude)
  return np.ascontiguousarray(pixels, np.uint8)


def _describe_record(record, index: int) -> str:
  described = f"record {index}"
  video, frame = record.get("video"), record.get("frame")
  if video is not None:
    video = video.decode(errors="replace") if isinstance(video, bytes) else str(video)
    described += f" (video {video!r}, frame {frame})"
  return described


def decode_record_image(record, index: int) -> np.ndarray:
  """The record's image as uint8 RGB; an undecodable one is a ValueError naming the
  record (index, video, frame)."""
  try:
    return decode_jpeg(record["image"])
  except ValueError as e:
    raise ValueError(f"{_describe_record(record, index)}: {e}") from None


def record_to_example(record: dict, index: int) -> dict:
  """Labels in the training convention: float masks, 0 fillers under masks."""
  return {
      "expression": np.int32(max(int(record["expression"]), 0)),
      "expression_mask": np.float32(record["expression_mask"]),
      "au": np.asarray(record["au"], np.float32),
      "au_mask": np.asarray(record["au_mask"], np.float32),
      "valence_arousal": np.asarray(record["valence_arousal"], np.float32),
      "va_mask": np.float32(record["va_mask"]),
      "record_index": np.int32(index),
  }


def load_example(record: dict, index: int, augment: AugmentConfig,
                 rng: np.random.Generator | None, image_size: int = IMAGE_SIZE) -> dict:
  """record (JPEG bytes + labels) -> example with a uint8 image."""
  example = record_to_example(record, index)
  example["image"] = augment_image(decode_record_image(record, index), rng, augment,
                                   image_size)
  return example


def empty_example(image_size: int = IMAGE_SIZE) -> dict:
  """A padding example: every mask 0, so it enters no loss and no metric."""
  return {
      "expression": np.int32(0), "expression_mask": np.float32(0),
      "au": np.zeros(NUM_AUS, np.float32), "au_mask": np.zeros(NUM_AUS, np.float32),
      "valence_arousal": np.zeros(2, np.float32), "va_mask": np.float32(0),
      "record_index": np.int32(-1),
      "image": np.zeros((image_size, image_size, 3), np.uint8),
  }


def load_batch(source, indices, augment: AugmentConfig, image_size: int = IMAGE_SIZE, *,
               seed: int | None = None, positions=None) -> dict:
  """Record indices -> one batch of examples (`record_to_example`'s keys and dtypes
  plus a uint8 image, stacked); index -1 is a padding example (`empty_example`).

  Image k is augmented with a generator seeded by (seed, positions[k]) when augment
  is not "none". Written straight into the batch's arrays: one grain element per
  batch, not one per image (grain's per-element map and batch cost ~100 us an image).
  """
  indices = [int(i) for i in indices]
  n = len(indices)
  batch = {key: np.repeat(np.asarray(value)[None], n, axis=0)
           for key, value in empty_example(image_size).items()}
  augmenting = augment != AugmentConfig()
  if augmenting and (seed is None or positions is None or len(positions) != n):
    raise ValueError("an augmenting batch needs the seed and one position per image")
  for row, index in enumerate(indices):
    if index < 0:
      continue
    # One read at a time: array_record's batched __getitems__ starts a thread pool per
    # call, 2x slower per record on one core.
    record = source[index]
    # record_to_example's conversion, written straight into the rows: 1.8 against 5.5 us
    # a record through its dict (4% of the "none" policy's time); a test compares both.
    batch["expression"][row] = max(int(record["expression"]), 0)
    batch["expression_mask"][row] = record["expression_mask"]
    batch["au"][row] = record["au"]
    batch["au_mask"][row] = record["au_mask"]
    batch["valence_arousal"][row] = record["valence_arousal"]
    batch["va_mask"][row] = record["va_mask"]
    batch["record_index"][row] = index
    rng = (np.random.default_rng([seed, int(positions[row])]) if augmenting else None)
    batch["image"][row] = augment_image(decode_record_image(record, index), rng, augment,
                                        image_size)
  return batch


class LoadBatchForTraining(grain.transforms.Map):
  """(global stream positions, record indices) of a batch -> augmented batch.

  Each image's generator is seeded by (seed, its global position), not by anything
  local to a process or a batch, so the same global batch comes out whatever the
  process count.
  """

  def __init__(self, source, augment: AugmentConfig, seed: int,
               image_size: int = IMAGE_SIZE):
    self._source = source
    self._augment = augment
    self._seed = seed
    self._image_size = image_size

  def map(self, element):
    positions, indices = element
    return load_batch(self._source, indices, self._augment, self._image_size,
                      seed=self._seed, positions=positions)


class LoadBatchForEval(grain.transforms.Map):
  """Record indices of a batch -> un-augmented batch; index -1 -> a padding example."""

  def __init__(self, source, image_size: int = IMAGE_SIZE):
    self._source = source
    self._image_size = image_size

  def map(self, indices):
    return load_batch(self._source, indices, AugmentConfig(), self._image_size)


class UnsupportedFeatureSpec(ValueError):
  """A dataset `RawExampleSource` cannot read: not ArrayRecord files of tf.train.Example,
  or features that are not flat fixed-shape tensors."""


def _example_class():
  # TFDS's own compiled tf.train.Example (tensorflow_datasets/proto, in the wheel since
  # 4.9.x; protobuf is a dependency of tensorflow-datasets): no TensorFlow needed.
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  return tf_example_pb2.Example


def _raw_fields(serialized_info) -> tuple:
  """(name, proto list kind, converter) of each feature, from the builder's serialized
  feature spec: scalars -> Python int / bool / float / bytes, tensors -> NumPy arrays
  of the spec's dtype and shape, as TFDS's `ExampleParserNp` makes them.
  UnsupportedFeatureSpec for anything but flat, fixed-shape int/bool/float/bytes."""
  fields = []
  for name, info in serialized_info.items():
    shape = getattr(info, "shape", None)
    dtype = getattr(info, "np_dtype", None)
    if not isinstance(shape, tuple) or dtype is None:
      raise UnsupportedFeatureSpec(f"feature {name!r} is not a single tensor: {info!r}")
    if any(d is None or d < 0 for d in shape) or getattr(info, "sequence_rank", 0):
      raise UnsupportedFeatureSpec(f"feature {name!r} has a variable shape {shape}")
    dtype = np.dtype(dtype)
    kind = {"b": "int64_list", "i": "int64_list", "u": "int64_list", "f": "float_list",
            "O": "bytes_list", "S": "bytes_list"}.get(dtype.kind)
    if kind is None:
      raise UnsupportedFeatureSpec(f"feature {name!r} has dtype {dtype}")
    fields.append((name, kind, _Converter(dtype, shape)))
  return tuple(fields)


class _Converter:
  """values (a protobuf repeated field) -> the feature's value; ValueError when the
  number of values does not fit the shape. (A class, not a closure: picklable into
  grain's worker processes.)"""

  def __init__(self, dtype: np.dtype, shape: tuple):
    self.dtype, self.shape, self.size = dtype, shape, math.prod(shape)
    if shape:
      self.form = "vector" if len(shape) == 1 and dtype.kind != "O" else "array"
    elif dtype.kind in "OS":
      self.form = "bytes"
    elif dtype.kind == "b":
      self.form = "bool"
    elif dtype.kind == "f" and dtype.itemsize <= 4:  # a float_list holds float32
      self.form = "float"
    else:
      self.form = "scalar"

  def __call__(self, values):
    if len(values) != self.size:
      raise ValueError(f"{len(values)} values, expected {self.size} (shape {self.shape}, "
                       f"dtype {self.dtype})")
    form = self.form
    if form == "vector":
      return np.fromiter(values, self.dtype, self.size)
    if form == "bytes":
      return values[0]
    if form == "bool":
      return bool(values[0])
    if form == "float":
      return float(values[0])
    if form == "array":
      return np.array(values, self.dtype).reshape(self.shape)
    return self.dtype.type(values[0]).item()


class RawExampleSource:
  """A TFDS ArrayRecord split read without TFDS's per-record feature decoding.

  Each record's serialized tf.train.Example is parsed by protobuf (upb) and its fields
  picked by the builder's serialized feature spec: scalars as Python int / bool / float
  / bytes, tensors as NumPy arrays of the spec's dtype and shape -- what TFDS's source
  returns with the image left as bytes, at ~45 instead of ~165 us a record (TFDS's
  `deserialize_example_np` is ~130 of them). `check_against_tfds` compares both
  readings of a few records, field by field, and raises on any difference.
  """

  def __init__(self, tfds_source):
    file_format = getattr(tfds_source.dataset_info.file_format, "value",
                          tfds_source.dataset_info.file_format)
    if file_format != "array_record":
      raise UnsupportedFeatureSpec(f"records stored as {file_format!r}, not "
                                   "serialized tf.train.Example in ArrayRecord")
    self.tfds_source = tfds_source
    self._records = tfds_source.data_source  # array_record's ArrayRecordDataSource
    self._fields = _raw_fields(tfds_source.dataset_info.features.get_serialized_info())
    self._parse = _example_class().FromString

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_parse"]  # a protobuf class's method: rebuilt where unpickled
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._parse = _example_class().FromString

  @property
  def dataset_info(self):
    return self.tfds_source.dataset_info

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return f"RawExampleSource({self.tfds_source!r})"

  def _decode(self, data: bytes, index: int) -> dict:
    feature = self._parse(data).features.feature
    record = {}
    for name, kind, convert in self._fields:
      try:
        record[name] = convert(getattr(feature[name], kind).value)
      except ValueError as e:
        raise ValueError(f"record {index}: feature {name!r} in its {kind}: {e}") from None
    return record

  def __getitem__(self, index):
    index = index.__index__()
    return self._decode(self._records[index], index)

  def __getitems__(self, indices):
    return [self[i] for i in indices]

  def __iter__(self):
    for index in range(len(self)):
      yield self[index]

  def check_against_tfds(self, indices=None) -> None:
    """ValueError naming the first field where the raw parse of a record differs from
    TFDS's decoding of it (value, dtype, shape or Python type). Defaults: the first
    and the last record."""
    if indices is None:
      indices = sorted({0, len(self) - 1}) if len(self) else []
    for index in indices:
      raw, tfds_record = self[index], self.tfds_source[index]
      if set(raw) != set(tfds_record):
        raise ValueError(f"record {index}: the raw parse has the fields {sorted(raw)}, "
                         f"TFDS's decoding {sorted(tfds_record)}")
      for name, value in tfds_record.items():
        if not _same_value(raw[name], value):
          raise ValueError(
              f"record {index}, feature {name!r}: the raw tf.train.Example parse gives "
              f"{raw[name]!r}, TFDS's decoding {value!r}; this dataset's features are "
              "not read correctly by RawExampleSource: open it with "
              "open_data_source(..., raw=False)")


def _same_value(a, b) -> bool:
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))
  return type(a) is type(b) and a == b


def open_data_source(name: str, split: str, data_dir: str | None, raw: bool = True):
  """A split of the TFDS ArrayRecord dataset, images left as JPEG bytes.

  raw (default): a `RawExampleSource` (the same records, ~3.5x cheaper to read),
  checked against TFDS's decoding on the split's first and last record (ValueError on
  any difference); for a feature spec it cannot read (not flat fixed-shape tensors),
  TFDS's own source, with a warning. raw=False: TFDS's source.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tfds_affwild2  # pylint: disable=g-import-not-at-top,unused-import  # registers
  builder = tfds.builder(name, data_dir=data_dir)
  tfds_source = builder.as_data_source(split,
                                       decoders={"image": tfds.decode.SkipDecoding()})
  if not raw:
    return tfds_source
  try:
    source = RawExampleSource(tfds_source)
  except UnsupportedFeatureSpec as e:
    log.warning("%s %s: reading through TFDS's feature decoding (slower): %s", name,
                split, e)
    return tfds_source
  source.check_against_tfds()
  return source


def _process_shard(num_records: int, process_index: int, process_count: int):
  """Record indices of this process: a strided slice, each record in one process."""
  return range(process_index, num_records, process_count)


def label_masks(source) -> np.ndarray:
  """[N, 3] bool: which of (expression, AU, VA) each record is labelled for.

  One pass over the records (their image bytes are read too): seconds for the demo,
  about a minute for s-Aff-Wild2's 142k frames.
  """
  return np.array([(bool(r["expression_mask"]), bool(np.any(r["au_mask"])),
                    bool(r["va_mask"])) for r in (source[i] for i in range(len(source)))],
                  dtype=bool).reshape(-1, 3)


def task_balanced_weights(masks: np.ndarray) -> np.ndarray:
  """Sampling weight per record: the sum, over the tasks it is labelled for, of
  1 / (fraction of records labelled for that task). Frames that carry the rarer
  task labels are drawn more often; every labelled frame keeps a chance."""
  fraction = masks.mean(axis=0)
  inverse = np.where(fraction > 0, 1.0 / np.maximum(fraction, 1e-12), 0.0)
  weights = masks.astype(np.float64) @ inverse
  if not np.any(weights > 0):
    raise ValueError("no record carries any label: nothing to balance")
  return weights / weights.sum()


class WeightedEpochs(grain.MapDataset):
  """Endless record indices, each epoch len(indices) draws with replacement by weight,
  from a generator seeded by (seed, epoch): deterministic and resumable by position."""

  def __init__(self, indices, weights: np.ndarray, seed: int):
    super().__init__()
    self._indices = np.asarray(indices)
    self._weights = np.asarray(weights, np.float64) / np.sum(weights)
    self._seed = seed
    self._epoch_draws = (None, None)

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, len(self._indices))
    if self._epoch_draws[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._epoch_draws = (epoch, rng.choice(len(self._indices), len(self._indices),
                                             p=self._weights))
    return int(self._indices[self._epoch_draws[1][position]])


class ProcessShareOfGlobalBatches(grain.MapDataset):
  """This process's rows of each global batch of a global record stream.

  Local element j is global position (j // local) * global + process * local + j % local;
  it yields (global position, record index). Every process walks the same global
  stream, so the global batches, and the training run, do not depend on how many
  processes read them.
  """

  def __init__(self, parent: grain.MapDataset, global_batch_size: int,
               local_batch_size: int, process_index: int):
    super().__init__(parent)
    self._global = global_batch_size
    self._local = local_batch_size
    self._offset = process_index * local_batch_size

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    position = batch * self._global + self._offset + row
    return position, self._parent[position]


def train_dataset(source, *, global_batch_size: int, seed: int, augment: AugmentConfig,
                  process_index: int = 0, process_count: int = 1,
                  image_size: int = IMAGE_SIZE, task_balanced: bool = False
                  ) -> grain.MapDataset:
  """Endless, reshuffled each epoch, augmented: a MapDataset of this process's batches.

  The record order is global (one seeded shuffle per epoch over the whole split, or
  with `task_balanced` draws by `task_balanced_weights`); each process reads its rows
  of every global batch.
  """
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  if len(source) < global_batch_size:
    raise ValueError(f"the training split has {len(source)} records, fewer than one "
                     f"batch of {global_batch_size}")
  if task_balanced:
    order = WeightedEpochs(range(len(source)), task_balanced_weights(label_masks(source)),
                           seed)
  else:
    order = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
  local_batch_size = global_batch_size // process_count
  ds = ProcessShareOfGlobalBatches(order, global_batch_size, local_batch_size,
                                   process_index)
  # Batch the (position, index) pairs, then load each batch as one element.
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.map(LoadBatchForTraining(source, augment, seed, image_size))


def eval_num_batches(num_records: int, local_batch_size: int, process_count: int) -> int:
  """Batches every process runs in one eval pass (the same number on all processes)."""
  per_process = math.ceil(num_records / process_count)
  return max(1, math.ceil(per_process / local_batch_size))


def eval_dataset(source, *, local_batch_size: int, process_index: int = 0,
                 process_count: int = 1, image_size: int = IMAGE_SIZE
                 ) -> grain.MapDataset:
  """One ordered pass, padded with fully masked examples to whole, equal batches."""
  indices = list(_process_shard(len(source), process_index, process_count))
  total = eval_num_batches(len(source), local_batch_size, process_count) * \
      local_batch_size
  ds = grain.MapDataset.source(indices + [-1] * (total - len(indices)))
  return ds.batch(local_batch_size, drop_remainder=True).map(
      LoadBatchForEval(source, image_size))


def as_iterator(ds: grain.MapDataset, worker_count: int = 0,
                worker_buffer_size: int = 2):
  """A checkpointable iterator; worker processes decode in parallel when asked."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count > 0:
    # grain reads its absl flags when it starts workers: a program that never parsed
    # absl flags (a notebook, an argparse script) would fail there; their defaults do.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return iter(it_ds)


def normalize_images(images, dtype=np.float32):
  """uint8 NHWC -> normalised float (works on NumPy and JAX arrays, used on device)."""
  return ((images.astype(np.float32) - MEAN_RGB) / STDDEV_RGB).astype(dtype)
