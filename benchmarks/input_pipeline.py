"""Input pipeline throughput: images/s on one core for JPEG decode + augment + batch,
per augmentation policy, from a built `affwild2` TFDS dataset (in-process, no workers,
so the figure is per core), and where the time goes.

  taskset -c 0 python benchmarks/input_pipeline.py --data_dir runs/demo/tfds \
      --batches 30 --out benchmarks/results/input_pipeline.jsonl

For each policy, interleaved in rounds: the pipeline as it is (affect_jax.input_pipeline)
and a prototype (`prototype_*`) that changes two things: JPEG decode by simplejpeg
(libjpeg-turbo, falling back to cv2 when not installed) and the brightness / contrast /
saturation jitter as one 3x4 colour matrix applied by a single cv2.transform (uint8 in,
saturated uint8 out) instead of three cv2.addWeighted passes and three cv2.cvtColor.
Then a per-stage breakdown in microseconds per image, and how far the prototype's
images are from the pipeline's for the same random draws. simplejpeg is not a
dependency of the project: `pip install simplejpeg` to run that part of the prototype.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax import input_pipeline as ip  # noqa: E402

import cv2  # noqa: E402

cv2.setNumThreads(1)  # per-core figures; grain parallelises over worker processes
try:
  import simplejpeg
except ImportError:
  simplejpeg = None

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------------
# The prototype: same policies, same random draws, OpenCV kernels on uint8.
# ----------------------------------------------------------------------------------


def fast_decode(data: bytes) -> np.ndarray:
  """JPEG bytes -> uint8 RGB [H, W, 3] (libjpeg-turbo through simplejpeg, else cv2)."""
  if simplejpeg is not None:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def colour_matrix(rng: np.random.Generator, cfg: ip.AugmentConfig,
                  pixels: np.ndarray) -> np.ndarray | None:
  """Brightness, contrast and saturation jitter as one affine colour map [3, 4].

  The three are affine in RGB: brightness x -> b x; contrast x -> c x + (1 - c) m with
  m the mean grey level after brightness; saturation x -> s x + (1 - s) g(x) with g the
  grey value w . x (w sums to 1). Composed: x -> b c (s I + (1 - s) 1 w^T) x + (1 - c) m,
  with the same draws in the same order as input_pipeline._jitter_colours (which
  saturates to uint8 after each of the three steps; this saturates once at the end).
  """
  if not (cfg.brightness or cfg.contrast or cfg.saturation):
    return None
  b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness) if cfg.brightness else 1.0
  c, offset = 1.0, 0.0
  if cfg.contrast:
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    offset = (1 - c) * b * float(np.dot(cv2.mean(pixels)[:3], GREY_WEIGHTS))
  s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) if cfg.saturation else 1.0
  matrix = np.empty((3, 4), np.float32)
  matrix[:, :3] = b * c * (s * np.eye(3, dtype=np.float32)
                           + (1 - s) * np.outer(np.ones(3, np.float32), GREY_WEIGHTS))
  matrix[:, 3] = offset
  return matrix


def fast_augment(pixels: np.ndarray, rng: np.random.Generator, cfg: ip.AugmentConfig,
                 size: int = ip.IMAGE_SIZE) -> np.ndarray:
  """The pipeline's resize + warp, then the jitter as one colour matrix."""
  geometry_only = dataclasses.replace(cfg, brightness=0.0, contrast=0.0, saturation=0.0)
  pixels = ip.augment_image(pixels, rng, geometry_only, size)
  matrix = colour_matrix(rng, cfg, pixels)
  return pixels if matrix is None else cv2.transform(pixels, matrix)


class RawExampleSource:
  """The TFDS ArrayRecord source without TFDS's per-record feature decoding: the
  serialized tf.train.Example parsed by protobuf (upb) directly, fields read by name.
  TFDS's `deserialize_example_np` costs ~130 us of the ~165 us of `source[i]` here."""

  def __init__(self, tfds_source):
    from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
    self._records = tfds_source.data_source  # array_record's ArrayRecordDataSource
    self._example = example_parser.tf_example_pb2.Example

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    feature = self._example.FromString(self._records[index]).features.feature
    return {
        "image": feature["image"].bytes_list.value[0],
        "expression": feature["expression"].int64_list.value[0],
        "expression_mask": feature["expression_mask"].int64_list.value[0],
        "au": np.asarray(feature["au"].int64_list.value, np.int8),
        "au_mask": np.asarray(feature["au_mask"].int64_list.value, bool),
        "valence_arousal": np.asarray(feature["valence_arousal"].float_list.value,
                                      np.float32),
        "va_mask": feature["va_mask"].int64_list.value[0],
        "video": feature["video"].bytes_list.value[0],
        "frame": feature["frame"].int64_list.value[0],
    }


def crop_resize_augment(pixels: np.ndarray, rng: np.random.Generator,
                        cfg: ip.AugmentConfig, size: int = ip.IMAGE_SIZE) -> np.ndarray:
  """Without rotation, crop + flip is an axis-aligned box: integer crop, cv2.resize
  and cv2.flip (72 us) instead of a bilinear warpAffine of the whole image (120 us).
  The same draws as the warp; the box is rounded to whole pixels (as torchvision's
  RandomResizedCrop)."""
  if cfg.rotation_degrees:
    return fast_augment(pixels, rng, cfg, size)
  if pixels.shape[:2] != (size, size):
    pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
  if cfg.flip or cfg.crop_scale != (1.0, 1.0):
    (a, _, c), (_, e, f) = ip._affine_for_crop(rng, size, cfg)  # pylint: disable=protected-access
    x0, x1 = sorted((c - 0.5 * a + 0.5, c + (size - 0.5) * a + 0.5))
    y0, y1 = f - 0.5 * e + 0.5, f + (size - 0.5) * e + 0.5
    x0, y0 = max(0, round(x0)), max(0, round(y0))
    x1, y1 = min(size, max(x0 + 1, round(x1))), min(size, max(y0 + 1, round(y1)))
    pixels = cv2.resize(pixels[y0:y1, x0:x1], (size, size),
                        interpolation=cv2.INTER_LINEAR)
    if a < 0:
      pixels = cv2.flip(pixels, 1)
  matrix = colour_matrix(rng, cfg, pixels)
  return pixels if matrix is None else cv2.transform(pixels, matrix)


def crop_resize_load_example(record, index, augment, rng, image_size=ip.IMAGE_SIZE):
  example = ip.record_to_example(record, index)
  example["image"] = crop_resize_augment(fast_decode(record["image"]), rng, augment,
                                         image_size)
  return example


def fast_load_example(record, index, augment, rng, image_size=ip.IMAGE_SIZE):
  example = ip.record_to_example(record, index)
  example["image"] = fast_augment(fast_decode(record["image"]), rng, augment, image_size)
  return example


@contextlib.contextmanager
def patched_loader(load_example):
  original = ip.load_example
  ip.load_example = load_example
  try:
    yield
  finally:
    ip.load_example = original


class LoadBatchForTraining(ip.grain.transforms.Map):
  """A batch of (global position, record index) pairs -> a batch of examples: one grain
  element per batch instead of one per image (grain's per-element map and batch cost
  ~100 us per image here)."""

  def __init__(self, source, augment, seed, load_example, image_size=ip.IMAGE_SIZE):
    self._source, self._augment, self._seed = source, augment, seed
    self._load_example, self._image_size = load_example, image_size

  def map(self, element):
    positions, indices = element
    examples = [self._load_example(self._source[int(i)], int(i), self._augment,
                                   np.random.default_rng([self._seed, int(p)]),
                                   self._image_size)
                for p, i in zip(positions, indices)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def batched_train_dataset(source, *, global_batch_size, seed, augment, load_example):
  """ip.train_dataset with batch-then-map (one process)."""
  order = ip.grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
  ds = ip.ProcessShareOfGlobalBatches(order, global_batch_size, global_batch_size, 0)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  return ds.map(LoadBatchForTraining(source, augment, seed, load_example))


# name -> (raw source?, load_example, batch-then-map?)
VARIANTS = {
    "current": (False, None, False),
    "raw_source": (True, None, False),
    "raw_source+crop_resize+colour_matrix": (True, crop_resize_load_example, False),
    "all+batched_map": (True, crop_resize_load_example, True),
}


# ----------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------


def pipeline_rate(tfds_source, policy: str, batch_size: int, batches: int,
                  variant: str) -> float:
  raw, load_example, batched = VARIANTS[variant]
  source = RawExampleSource(tfds_source) if raw else tfds_source
  augment = ip.AugmentConfig.from_policy(policy)
  with patched_loader(load_example) if load_example else contextlib.nullcontext():
    if batched:
      ds = batched_train_dataset(source, global_batch_size=batch_size, seed=0,
                                 augment=augment, load_example=load_example)
    else:
      ds = ip.train_dataset(source, global_batch_size=batch_size, seed=0,
                            augment=augment)
    iterator = ip.as_iterator(ds)
    next(iterator)  # opens files, warms caches
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return batch_size * batches / (time.perf_counter() - start)


def stage_breakdown(source, count: int) -> dict:
  """Microseconds per image for each stage of the pipeline, over `count` records."""
  indices = np.random.default_rng(0).permutation(len(source))[:count]
  records = [source[int(i)] for i in indices]
  strong = ip.AugmentConfig.from_policy("strong")
  basic = ip.AugmentConfig.from_policy("basic")
  arrays = [ip.decode_jpeg(r["image"]) for r in records]
  raw = RawExampleSource(source)
  stages = {
      "read_record": lambda: [source[int(i)] for i in indices],
      "read_record_raw_protobuf": lambda: [raw[int(i)] for i in indices],
      "crop_resize_flip_basic": lambda: [
          crop_resize_augment(a, np.random.default_rng(k), basic)
          for k, a in enumerate(arrays)],
      "labels": lambda: [ip.record_to_example(r, 0) for r in records],
      "decode_cv2": lambda: [ip.decode_jpeg(r["image"]) for r in records],
      "warp_basic": lambda: [ip.augment_image(a, np.random.default_rng(k), basic)
                             for k, a in enumerate(arrays)],
      "colour_jitter_3_blends": lambda: [
          ip._jitter_colours(a, np.random.default_rng(k), strong)  # pylint: disable=protected-access
          for k, a in enumerate(arrays)],
      "colour_jitter_1_matrix": lambda: [
          cv2.transform(a, colour_matrix(np.random.default_rng(k), strong, a))
          for k, a in enumerate(arrays)],
      "rng_seeding": lambda: [np.random.default_rng([0, k]) for k in range(count)],
      "batch_stack_64": lambda: [np.stack(arrays[k:k + 64])
                                 for k in range(0, len(arrays) - 63, 64)],
  }
  if simplejpeg is not None:
    stages["decode_simplejpeg"] = lambda: [simplejpeg.decode_jpeg(r["image"],
                                                                  colorspace="RGB")
                                           for r in records]
  result = {}
  for name, fn in stages.items():
    fn()
    seconds = min(bench_common.timed(fn) for _ in range(3))
    images = count if not name.startswith("batch") else (count // 64) * 64
    result[f"{name}_us"] = round(seconds / max(images, 1) * 1e6, 1)
  return result


def agreement(source, count: int = 64) -> dict:
  """How far the crop-resize prototype's images are from the pipeline's (same draws;
  the crop box is rounded to whole pixels, so basic differs by interpolation)."""
  out = {}
  for policy in ("none", "basic", "strong"):
    cfg = ip.AugmentConfig.from_policy(policy)
    diffs = []
    for i in range(count):
      record = source[i]
      slow = ip.load_example(record, i, cfg, np.random.default_rng([0, i]))["image"]
      fast = crop_resize_load_example(record, i, cfg,
                                      np.random.default_rng([0, i]))["image"]
      diffs.append(np.abs(slow.astype(np.int16) - fast.astype(np.int16)))
    diffs = np.stack(diffs)
    out[f"{policy}_mean_abs_diff"] = round(float(diffs.mean()), 2)
    out[f"{policy}_p99_abs_diff"] = float(np.percentile(diffs, 99))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="affwild2/union")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  source = ip.open_data_source(args.dataset, "train", args.data_dir)
  base = bench_common.machine()
  base.update({"benchmark": "input_pipeline", "dataset": args.dataset,
               "records": len(source), "batch_size": args.batch_size,
               "image_size": ip.IMAGE_SIZE,
               "prototype_decoder": "simplejpeg" if simplejpeg else "cv2",
               "opencv": cv2.__version__})
  variants = list(VARIANTS)
  for policy in ("none", "basic", "strong"):
    load_before = bench_common.load()
    rates = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
      for variant in (variants if round_index % 2 == 0 else variants[::-1]):
        rates[variant].append(pipeline_rate(source, policy, args.batch_size,
                                            args.batches, variant))
    row = dict(base, policy=policy, load_before=load_before)
    row["images_per_s_per_core"] = round(bench_common.median(rates["current"]))
    for variant in variants[1:]:
      row[f"{variant}_images_per_s_per_core"] = round(bench_common.median(rates[variant]))
      row[f"{variant}_speedup"] = round(bench_common.median(
          [f / s for s, f in zip(rates["current"], rates[variant])]), 2)
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)
  row = dict(base, policy="stages", load_before=bench_common.load())
  row.update(stage_breakdown(source, 512))
  row.update(agreement(source))
  row["load_after"] = bench_common.load()
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
