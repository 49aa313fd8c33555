"""Input pipeline throughput: images/s on one core for read + JPEG decode + augment +
batch, per augmentation policy, from a built `affwild2` TFDS dataset (in-process, no
workers, so the figure is per core), and where the time goes.

  taskset -c 0 python benchmarks/input_pipeline.py --data_dir runs/demo/tfds \
      --batches 20 --rounds 3 --out benchmarks/results/input_pipeline.jsonl

For each policy, interleaved in rounds (the order alternating): the library pipeline
(affect_jax.input_pipeline: `open_data_source` + `train_dataset`) against the previous
formulation, kept here as the peer ("before", commit 3de3617's pipeline): records
through TFDS's data source and its per-record feature decoding, one grain element per
image (map, then grain's batch), one bilinear warpAffine for any crop or flip, and the
colour jitter as three cv2.addWeighted + cv2.cvtColor (a saturation to uint8 after each
step). The library reads the tf.train.Example with protobuf directly
(`RawExampleSource`), maps one grain element per batch, crops + resizes + flips when
there is no rotation and applies the colour jitter as one 3x4 colour matrix. Then a
per-stage breakdown in microseconds per image, and how far the library's images are
from before's for the same seeds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax import input_pipeline as ip  # noqa: E402

import cv2  # noqa: E402

cv2.setNumThreads(1)  # per-core figures; grain parallelises over worker processes
POLICIES = ("none", "basic", "strong", "randaugment")


# ----------------------------------------------------------------------------------
# Before: the previous formulation of the pipeline (the peer).
# ----------------------------------------------------------------------------------


def before_jitter_colours(pixels, rng, cfg):
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


def before_augment_image(pixels, rng, cfg, size=ip.IMAGE_SIZE):
  if pixels.shape[:2] != (size, size):
    pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
  if cfg.flip or cfg.rotation_degrees or cfg.crop_scale != (1.0, 1.0):
    pixels = cv2.warpAffine(pixels, ip._affine_for_crop(rng, size, cfg), (size, size),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT_101)
  if cfg.brightness or cfg.contrast or cfg.saturation:
    pixels = before_jitter_colours(pixels, rng, cfg)
  if cfg.randaugment_ops:
    pixels = ip._randaugment(pixels, rng, cfg)  # pylint: disable=protected-access
  return np.ascontiguousarray(pixels, np.uint8)


def before_load_example(record, index, augment, rng, image_size=ip.IMAGE_SIZE):
  example = ip.record_to_example(record, index)
  example["image"] = before_augment_image(ip.decode_jpeg(record["image"]), rng, augment,
                                          image_size)
  return example


class BeforeLoadForTraining(ip.grain.transforms.Map):
  """(global stream position, record index) -> augmented example: one per element."""

  def __init__(self, source, augment, seed, image_size=ip.IMAGE_SIZE):
    self._source, self._augment, self._seed = source, augment, seed
    self._image_size = image_size

  def map(self, element):
    position, index = element
    rng = np.random.default_rng([self._seed, position])
    return before_load_example(self._source[index], index, self._augment, rng,
                               self._image_size)


def before_train_dataset(tfds_source, *, global_batch_size, seed, augment):
  """The previous train_dataset (one process): map per image, then grain's batch."""
  order = ip.grain.MapDataset.range(len(tfds_source)).seed(seed).shuffle().repeat(None)
  ds = ip.ProcessShareOfGlobalBatches(order, global_batch_size, global_batch_size, 0)
  ds = ds.map(BeforeLoadForTraining(tfds_source, augment, seed))
  return ds.batch(global_batch_size, drop_remainder=True)


# ----------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------


def pipeline_rate(sources, policy: str, batch_size: int, batches: int,
                  variant: str) -> float:
  augment = ip.AugmentConfig.from_policy(policy)
  if variant == "before":
    ds = before_train_dataset(sources["before"], global_batch_size=batch_size, seed=0,
                              augment=augment)
  else:
    ds = ip.train_dataset(sources["library"], global_batch_size=batch_size, seed=0,
                          augment=augment)
  iterator = ip.as_iterator(ds)
  next(iterator)  # opens files, warms caches
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batch_size * batches / (time.perf_counter() - start)


def stage_breakdown(sources, count: int) -> dict:
  """Microseconds per image for each stage, over `count` records."""
  tfds_source, raw = sources["before"], sources["library"]
  indices = [int(i) for i in np.random.default_rng(0).permutation(len(raw))[:count]]
  records = [raw[i] for i in indices]
  arrays = [ip.decode_jpeg(r["image"]) for r in records]
  cfg = {policy: ip.AugmentConfig.from_policy(policy) for policy in POLICIES}
  colour = ip.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3)
  rngs = lambda: (np.random.default_rng([0, k]) for k in range(count))  # noqa: E731
  stages = {
      "read_record_tfds": lambda: [tfds_source[i] for i in indices],
      "read_record_raw_protobuf": lambda: [raw[i] for i in indices],
      "decode_cv2": lambda: [ip.decode_jpeg(r["image"]) for r in records],
      "rng_seeding": lambda: list(rngs()),
      "warp_basic_before": lambda: [before_augment_image(a, g, cfg["basic"])
                                    for a, g in zip(arrays, rngs())],
      "crop_resize_flip_basic": lambda: [ip.augment_image(a, g, cfg["basic"])
                                         for a, g in zip(arrays, rngs())],
      "warp_strong_geometry": lambda: [ip.augment_image(a, g, ip.AugmentConfig(
          flip=True, crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25), rotation_degrees=15))
          for a, g in zip(arrays, rngs())],
      "colour_jitter_3_blends_before": lambda: [before_jitter_colours(a, g, colour)
                                                for a, g in zip(arrays, rngs())],
      "colour_jitter_1_matrix": lambda: [ip.augment_image(a, g, colour)
                                         for a, g in zip(arrays, rngs())],
  }
  for policy in POLICIES:
    # The library's whole per-batch load (read, decode, augment, write), without grain.
    stages[f"load_batch_{policy}"] = (
        lambda c=cfg[policy]: [ip.load_batch(raw, indices[k:k + 64], c, seed=0,
                                             positions=range(k, k + 64))
                               for k in range(0, count - 63, 64)])
  result = {}
  for name, fn in stages.items():
    fn()
    seconds = min(bench_common.timed(fn) for _ in range(3))
    images = (count // 64) * 64 if name.startswith("load_batch") else count
    result[f"{name}_us"] = round(seconds / max(images, 1) * 1e6, 1)
  return result


def agreement(sources, count: int = 64) -> dict:
  """How far the library's images are from before's for the same seeds and records
  (the crop box is rounded to whole pixels; the colour saturates once)."""
  out = {}
  for policy in POLICIES:
    cfg = ip.AugmentConfig.from_policy(policy)
    diffs = []
    for i in range(count):
      record = sources["library"][i]
      previous = before_load_example(record, i, cfg, np.random.default_rng([0, i]))
      now = ip.load_example(record, i, cfg, np.random.default_rng([0, i]))
      diffs.append(np.abs(previous["image"].astype(np.int16)
                          - now["image"].astype(np.int16)))
    diffs = np.stack(diffs)
    out[f"{policy}_mean_abs_diff"] = round(float(diffs.mean()), 2)
    out[f"{policy}_p99_abs_diff"] = float(np.percentile(diffs, 99))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="affwild2/union")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--no_stages", action="store_true",
                      help="skip the per-stage breakdown and the agreement row")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  sources = {
      "library": ip.open_data_source(args.dataset, "train", args.data_dir),
      "before": ip.open_data_source(args.dataset, "train", args.data_dir, raw=False),
  }
  assert isinstance(sources["library"], ip.RawExampleSource)
  base = bench_common.machine()
  base.update({"benchmark": "input_pipeline", "dataset": args.dataset,
               "records": len(sources["library"]), "batch_size": args.batch_size,
               "batches": args.batches, "rounds": args.rounds,
               "image_size": ip.IMAGE_SIZE, "opencv": cv2.__version__,
               "before": "previous formulation (3de3617): TFDS decoding, per-image "
                         "grain map, warp, 3 colour blends"})
  variants = ["library", "before"]
  for policy in args.policies.split(","):
    load_before = bench_common.load()
    rates = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
      for variant in (variants if round_index % 2 == 0 else variants[::-1]):
        rates[variant].append(pipeline_rate(sources, policy, args.batch_size,
                                            args.batches, variant))
    row = dict(base, policy=policy, load_before=load_before)
    row["images_per_s_per_core"] = round(bench_common.median(rates["library"]))
    row["before_images_per_s_per_core"] = round(bench_common.median(rates["before"]))
    row["speedup"] = round(bench_common.median(
        [f / s for f, s in zip(rates["library"], rates["before"])]), 2)
    row["rounds_images_per_s"] = {k: [round(r) for r in v] for k, v in rates.items()}
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)
  if args.no_stages:
    return
  row = dict(base, policy="stages", load_before=bench_common.load())
  row.update(stage_breakdown(sources, 512))
  row.update(agreement(sources))
  row["load_after"] = bench_common.load()
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
