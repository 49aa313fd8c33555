"""grain input pipeline: TFDS `affwild2` data source -> shuffled, sharded, decoded,
augmented uint8 batches for the devices of this process.

Images leave the host as uint8 (a quarter of float32's bytes); `normalize_images` turns
them into float on the device, inside the jitted step. The record order is one global
stream (a seeded shuffle per epoch) of which each process reads its rows of every global
batch, and each augmentation is seeded by (config seed, global stream position): a
batch depends neither on the number of worker processes nor on the number of JAX
processes, and the iterator state (`get_state`) is enough to resume exactly.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Iterator

import cv2
import grain
import numpy as np

# Decoding and augmentation run in grain's worker processes, one image at a time: a
# thread pool per process would only oversubscribe the cores.
cv2.setNumThreads(1)

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
  pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
  if pixels is None:
    raise ValueError("not a decodable image")
  return pixels


def _affine_for_crop(rng: np.random.Generator, size: int, cfg: AugmentConfig):
  """2x3 output->input map (OpenCV pixel-centre coordinates) for crop+rotation+flip."""
  area = size * size * rng.uniform(*cfg.crop_scale)
  log_ratio = rng.uniform(np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1]))
  ratio = math.exp(log_ratio)
  crop_w = min(size, math.sqrt(area * ratio))
  crop_h = min(size, math.sqrt(area / ratio))
  centre_x = rng.uniform(crop_w / 2, size - crop_w / 2)
  centre_y = rng.uniform(crop_h / 2, size - crop_h / 2)
  angle = math.radians(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
  flip = -1.0 if cfg.flip and rng.uniform() < 0.5 else 1.0
  scale_x, scale_y = crop_w / size * flip, crop_h / size
  cos, sin = math.cos(angle), math.sin(angle)
  # In continuous coordinates (pixel i spans [i, i+1)):
  #   input = centre + R(angle) @ diag(scale) @ (output - size/2).
  # OpenCV puts pixel i's centre at i, not i + 0.5: shift both sides by half a pixel,
  # which makes a flip map pixel i exactly onto pixel size-1-i.
  linear = np.array([[cos * scale_x, -sin * scale_y], [sin * scale_x, cos * scale_y]])
  offset = np.array([centre_x, centre_y]) - linear @ np.array([size / 2, size / 2])
  offset += linear @ np.array([0.5, 0.5]) - 0.5
  return np.hstack([linear, offset[:, None]]).astype(np.float64)


def _jitter_colours(pixels: np.ndarray, rng: np.random.Generator,
                    cfg: AugmentConfig) -> np.ndarray:
  """Brightness, contrast, saturation as saturating uint8 blends (OpenCV), ~10x
  cheaper than the same arithmetic in float NumPy."""
  if cfg.brightness:
    factor = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    pixels = cv2.addWeighted(pixels, factor, pixels, 0.0, 0.0)
  if cfg.contrast:
    factor = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    mean = float(np.mean(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)))
    pixels = cv2.addWeighted(pixels, factor, pixels, 0.0, (1 - factor) * mean)
  if cfg.saturation:
    factor = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    grey = cv2.cvtColor(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    pixels = cv2.addWeighted(pixels, factor, grey, 1 - factor, 0.0)
  return pixels


def _shear(pixels, amount, axis):
  size = pixels.shape[0]
  matrix = np.array([[1, amount, -amount * size / 2], [0, 1, 0]], np.float64)
  if axis == 1:
    matrix = np.array([[1, 0, 0], [amount, 1, -amount * size / 2]], np.float64)
  return cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT_101)


def _translate(pixels, fraction, axis):
  size = pixels.shape[0]
  shift = [0.0, 0.0]
  shift[axis] = fraction * size
  matrix = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float64)
  return cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT_101)


def _autocontrast(pixels, magnitude):
  del magnitude
  low = pixels.min(axis=(0, 1), keepdims=True).astype(np.float32)
  high = pixels.max(axis=(0, 1), keepdims=True).astype(np.float32)
  scaled = (pixels - low) * (255.0 / np.maximum(high - low, 1.0))
  return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _sharpness(pixels, magnitude):
  blurred = cv2.GaussianBlur(pixels, (3, 3), 0)
  return cv2.addWeighted(pixels, 1 + 2 * magnitude, blurred, -2 * magnitude, 0.0)


# op name -> f(pixels, signed magnitude in [-1, 1]): the photometric and geometric
# operations of RandAugment (Cubuk et al. 2020) that keep a face's labels.
RANDAUGMENT_OPS = {
    "shear_x": lambda p, m: _shear(p, 0.3 * m, 0),
    "shear_y": lambda p, m: _shear(p, 0.3 * m, 1),
    "translate_x": lambda p, m: _translate(p, 0.2 * m, 0),
    "translate_y": lambda p, m: _translate(p, 0.2 * m, 1),
    "autocontrast": _autocontrast,
    "equalize": lambda p, m: cv2.merge([cv2.equalizeHist(c) for c in cv2.split(p)]),
    "posterize": lambda p, m: p & np.uint8((0xFF << int(round(4 * abs(m)))) & 0xFF),
    "solarize": lambda p, m: np.where(p < 256 - 128 * abs(m), p, 255 - p).astype(
        np.uint8),
    "sharpness": lambda p, m: _sharpness(p, abs(m)),
}


def _randaugment(pixels, rng, cfg: AugmentConfig):
  names = sorted(RANDAUGMENT_OPS)
  for index in rng.choice(len(names), cfg.randaugment_ops, replace=False):
    sign = 1.0 if rng.uniform() < 0.5 else -1.0
    pixels = RANDAUGMENT_OPS[names[index]](pixels, sign * cfg.randaugment_magnitude)
  return pixels


def augment_image(pixels: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                  size: int = IMAGE_SIZE) -> np.ndarray:
  """One resampling for crop, rotation and flip, then colour jitter; uint8 [H, W, 3]."""
  if pixels.shape[:2] != (size, size):
    pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
  geometric = cfg.flip or cfg.rotation_degrees or cfg.crop_scale != (1.0, 1.0)
  if geometric:
    pixels = cv2.warpAffine(pixels, _affine_for_crop(rng, size, cfg), (size, size),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT_101)
  if cfg.brightness or cfg.contrast or cfg.saturation:
    pixels = _jitter_colours(pixels, rng, cfg)
  if cfg.randaugment_ops:
    pixels = _randaugment(pixels, rng, cfg)
  return np.ascontiguousarray(pixels, np.uint8)


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
  example["image"] = augment_image(decode_jpeg(record["image"]), rng, augment, image_size)
  return example


class LoadForTraining(grain.transforms.Map):
  """(global stream position, record index) -> augmented example.

  The augmentation's generator is seeded by (seed, global position), not by anything
  local to a process, so the same global batch comes out whatever the process count.
  """

  def __init__(self, source, augment: AugmentConfig, seed: int,
               image_size: int = IMAGE_SIZE):
    self._source = source
    self._augment = augment
    self._seed = seed
    self._image_size = image_size

  def map(self, element):
    position, index = element
    rng = np.random.default_rng([self._seed, position])
    return load_example(self._source[index], index, self._augment, rng,
                        self._image_size)


class LoadForEval(grain.transforms.Map):
  """record index -> un-augmented example; index -1 -> a padding example."""

  def __init__(self, source, image_size: int = IMAGE_SIZE):
    self._source = source
    self._image_size = image_size

  def map(self, index):
    if index < 0:
      return empty_example(self._image_size)
    return load_example(self._source[index], index, AugmentConfig(), None,
                        self._image_size)


def empty_example(image_size: int = IMAGE_SIZE) -> dict:
  """A padding example: every mask 0, so it enters no loss and no metric."""
  return {
      "expression": np.int32(0), "expression_mask": np.float32(0),
      "au": np.zeros(NUM_AUS, np.float32), "au_mask": np.zeros(NUM_AUS, np.float32),
      "valence_arousal": np.zeros(2, np.float32), "va_mask": np.float32(0),
      "record_index": np.int32(-1),
      "image": np.zeros((image_size, image_size, 3), np.uint8),
  }


def open_data_source(name: str, split: str, data_dir: str | None):
  """The TFDS ArrayRecord source of a split, images left as JPEG bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tfds_affwild2  # pylint: disable=g-import-not-at-top,unused-import  # registers
  builder = tfds.builder(name, data_dir=data_dir)
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


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
  ds = ds.map(LoadForTraining(source, augment, seed, image_size))
  return ds.batch(local_batch_size, drop_remainder=True)


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
  return ds.map(LoadForEval(source, image_size)).batch(local_batch_size,
                                                       drop_remainder=True)


def as_iterator(ds: grain.MapDataset, worker_count: int = 0,
                worker_buffer_size: int = 2):
  """A checkpointable iterator; worker processes decode in parallel when asked."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return iter(it_ds)


def normalize_images(images, dtype=np.float32):
  """uint8 NHWC -> normalised float (works on NumPy and JAX arrays, used on device)."""
  return ((images.astype(np.float32) - MEAN_RGB) / STDDEV_RGB).astype(dtype)
