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
and the iterator state (`get_state`) is enough to resume exactly."""
from __future__ import annotations

import logging
import math
import sys

import cv2
import grain
import numpy as np
from absl import flags

from affect_jax import errors
from affect_jax.data.augment import AugmentConfig, augment_image
from affect_jax.data.records import decode_record_image, record_to_example
from affect_jax.vocabulary import IMAGE_SIZE, NUM_AUS

# Decoding and augmentation run in grain's worker processes, one image at a time: a
# thread pool per process would only oversubscribe the cores.
cv2.setNumThreads(1)


log = logging.getLogger(__name__)


# ImageNet statistics: the convention of the pretrained ResNet-18 weights users import.
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255


STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255


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
    raise errors.InputError("config.input.task_balanced: no record of the training "
                            "split carries any label, nothing to balance")
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
    raise errors.InputError(f"config.input.batch_size {global_batch_size} is not "
                            f"divisible by the {process_count} processes")
  if len(source) < global_batch_size:
    raise errors.InputError(f"the training split has {len(source)} records, fewer than "
                            f"one batch of config.input.batch_size {global_batch_size}")
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


