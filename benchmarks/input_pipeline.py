"""Input pipeline throughput: images/s on one core for read + JPEG decode + augment +
batch, per augmentation policy, from a built `affwild2` TFDS dataset (in-process, no
workers, so the figure is per core), and where the time goes.

  taskset -c 0 python benchmarks/input_pipeline.py --data_dir runs/demo/tfds \
      --batches 20 --rounds 3 --out benchmarks/results/input_pipeline.jsonl

For each policy, interleaved in rounds (the order alternating): the library pipeline
(affect_jax.data: `records.open_data_source` + `pipeline.train_dataset`) against the
same modules (records, augment, pipeline) at git revision `--before_rev` (default HEAD:
the working tree against the last commit), loaded with `git show` (from
affect_jax/input_pipeline.py at revisions before the package split), each reading the
split through its own `open_data_source`. Then a per-stage breakdown in microseconds
per image (the randaugment policy's draws, warp and each op included), and how far the
library's images are from the before revision's for the same seeds (0 where a policy
did not change), and from the same draws applied one op at a time ("unfolded": each
RandAugment shear / translate its own warp after the colour jitter, as before the
geometric ops were composed into the crop warp).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax.data import augment, pipeline, records  # noqa: E402
from affect_jax.vocabulary import IMAGE_SIZE  # noqa: E402

import cv2  # noqa: E402

cv2.setNumThreads(1)  # per-core figures; grain parallelises over worker processes
POLICIES = ("none", "basic", "strong", "randaugment")
# The modules the before/after compares, in today's layout.
PIPELINE_FILES = ("affect_jax/data/records.py", "affect_jax/data/augment.py",
                  "affect_jax/data/pipeline.py")


# ----------------------------------------------------------------------------------
# Reference formulations, for the stage breakdown and the tests.
# ----------------------------------------------------------------------------------


def before_jitter_colours(pixels, rng, cfg):
  """The colour jitter of 3de3617: three blends, a saturation to uint8 after each."""
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


def warp_crop(pixels, rng, cfg, size=IMAGE_SIZE):
  """The crop of 3de3617: one 3-channel bilinear warp for any crop or flip."""
  return cv2.warpAffine(pixels, augment.geometry_map(augment.crop_draws(rng, size, cfg), (), size),
                        (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REFLECT_101)


def unfolded_augment(pixels, rng, cfg, size=IMAGE_SIZE):
  """The library's draws for one image (same generator, same order) applied one step at
  a time: the crop warp, the colour matrix, then every RandAugment op in its drawn order,
  a shear or translate as a warp of its own. For a policy with crop, rotation and
  colour ("strong", "randaugment")."""
  crop = augment.crop_draws(rng, size, cfg)
  colour = augment.colour_draws(rng, cfg)
  ops = augment.randaugment_draws(rng, cfg) if cfg.randaugment_ops else []
  pixels = augment.warp(pixels, augment.geometry_map(crop, (), size))
  pixels = cv2.transform(pixels, augment.colour_matrix(colour, pixels))
  for name, magnitude in ops:
    pixels = augment.RANDAUGMENT_OPS[name](pixels, magnitude)
  return pixels


# ----------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------


def pipeline_rate(sources, modules, policy: str, batch_size: int, batches: int,
                  variant: str) -> float:
  module = modules[variant]
  ds = module.train_dataset(sources[variant], global_batch_size=batch_size, seed=0,
                            augment=module.AugmentConfig.from_policy(policy))
  iterator = module.as_iterator(ds)
  next(iterator)  # opens files, warms caches
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batch_size * batches / (time.perf_counter() - start)


def stage_breakdown(sources, modules, tfds_source, count: int) -> dict:
  """Microseconds per image for each stage, over `count` records. Stages named
  augment_* include the generator's seeding (rng_seeding); before_* run the before
  revision's code."""
  raw, before = sources["library"], modules["before"]
  indices = [int(i) for i in np.random.default_rng(0).permutation(len(raw))[:count]]
  raw_records = [raw[i] for i in indices]
  arrays = [records.decode_jpeg(r["image"]) for r in raw_records]
  cfg = {policy: augment.AugmentConfig.from_policy(policy) for policy in POLICIES}
  randaugment = cfg["randaugment"]
  colour = augment.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3)
  rngs = lambda: (np.random.default_rng([0, k]) for k in range(count))  # noqa: E731
  each_image = lambda fn, c: lambda: [fn(a, g, c)  # noqa: E731
                                      for a, g in zip(arrays, rngs())]
  seeded = list(rngs())
  drawn = [augment.randaugment_draws(g, randaugment) for g in rngs()]
  crops = [augment.crop_draws(g, IMAGE_SIZE, randaugment) for g in rngs()]
  stages = {
      "read_record_tfds": lambda: [tfds_source[i] for i in indices],
      "read_record_raw_protobuf": lambda: [raw[i] for i in indices],
      "decode_cv2": lambda: [records.decode_jpeg(r["image"]) for r in raw_records],
      "rng_seeding": lambda: list(rngs()),
      "warp_basic_before": each_image(warp_crop, cfg["basic"]),
      "crop_resize_flip_basic": each_image(augment.augment_image, cfg["basic"]),
      "warp_strong_geometry": each_image(augment.augment_image, augment.AugmentConfig(
          flip=True, crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25), rotation_degrees=15)),
      "colour_jitter_3_blends_before": each_image(before_jitter_colours, colour),
      "colour_jitter_1_matrix": each_image(augment.augment_image, colour),
      "augment_strong": each_image(augment.augment_image, cfg["strong"]),
      "augment_randaugment": each_image(augment.augment_image, randaugment),
      "before_augment_randaugment": each_image(
          before.augment_image, before.AugmentConfig.from_policy("randaugment")),
      # The parts of augment_randaugment beyond augment_strong:
      "randaugment_draws": lambda: [augment.randaugment_draws(g, randaugment)
                                    for g in seeded],
      "randaugment_geometry_map": lambda: [augment.geometry_map(c, o, IMAGE_SIZE)
                                           for c, o in zip(crops, drawn)],
  }
  for name, op in augment.RANDAUGMENT_OPS.items():
    stages[f"op_{name}"] = lambda op=op: [op(a, 0.5) for a in arrays]
  for policy in POLICIES:
    # The whole per-batch load (read, decode, augment, write), without grain.
    for prefix, variant in (("", "library"), ("before_", "before")):
      module, source = modules[variant], sources[variant]
      c = module.AugmentConfig.from_policy(policy)
      stages[f"{prefix}load_batch_{policy}"] = (
          lambda m=module, s=source, c=c: [
              m.load_batch(s, indices[k:k + 64], c, seed=0, positions=range(k, k + 64))
              for k in range(0, count - 63, 64)])
  result = {}
  for name, fn in stages.items():
    fn()
    seconds = min(bench_common.timed(fn) for _ in range(3))
    images = (count // 64) * 64 if "load_batch" in name else count
    result[f"{name}_us"] = round(seconds / max(images, 1) * 1e6, 1)
  return result


def _diff_stats(pairs) -> tuple[float, float]:
  diffs = np.stack([np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in pairs])
  return round(float(diffs.mean()), 2), float(np.percentile(diffs, 99))


def agreement(sources, modules, count: int = 64) -> dict:
  """How far the library's images are, for the same records and seeds, from the before
  revision's (policy_*: 0 / 0 where the policy is unchanged) and, for "randaugment",
  from the same draws applied one op at a time (randaugment_unfolded_*)."""
  before, out = modules["before"], {}
  raw_records = [sources["library"][i] for i in range(count)]
  for policy in POLICIES:
    cfg = augment.AugmentConfig.from_policy(policy)
    before_cfg = before.AugmentConfig.from_policy(policy)
    out[f"{policy}_mean_abs_diff"], out[f"{policy}_p99_abs_diff"] = _diff_stats(
        (pipeline.load_example(r, i, cfg, np.random.default_rng([0, i]))["image"],
         before.load_example(r, i, before_cfg, np.random.default_rng([0, i]))["image"])
        for i, r in enumerate(raw_records))
  cfg = augment.AugmentConfig.from_policy("randaugment")
  arrays = [records.decode_jpeg(r["image"]) for r in raw_records]
  out["randaugment_unfolded_mean_abs_diff"], out["randaugment_unfolded_p99_abs_diff"] = \
      _diff_stats((augment.augment_image(a, np.random.default_rng([0, i]), cfg),
                   unfolded_augment(a, np.random.default_rng([0, i]), cfg))
                  for i, a in enumerate(arrays))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="affwild2/union")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--before_rev", default="HEAD",
                      help="git revision whose input pipeline is the peer; "
                           "'none': the library alone (a copy of the tree without .git)")
  parser.add_argument("--no_stages", action="store_true",
                      help="skip the per-stage breakdown and the agreement row")
  parser.add_argument("--out", default=None)
  args = bench_common.parse_args(parser)
  modules = {"library": bench_common.merged(records, augment, pipeline)}
  commit = None
  if args.before_rev.lower() != "none":
    try:
      modules["before"], commit = bench_common.modules_at(PIPELINE_FILES,
                                                          args.before_rev)
    except (OSError, subprocess.CalledProcessError) as e:
      raise SystemExit(f"cannot load the input pipeline at {args.before_rev!r} with git "
                       f"({e}); pass --before_rev none to time the library alone")
  sources = {variant: module.open_data_source(args.dataset, "train", args.data_dir)
             for variant, module in modules.items()}
  assert isinstance(sources["library"], records.RawExampleSource)
  base = bench_common.machine()
  base.update({"benchmark": "input_pipeline", "dataset": args.dataset,
               "records": len(sources["library"]), "batch_size": args.batch_size,
               "batches": args.batches, "rounds": args.rounds,
               "image_size": IMAGE_SIZE, "opencv": cv2.__version__,
               "before": (f"the input pipeline at {commit} "
                          f"(--before_rev {args.before_rev})" if commit else None)})
  variants = list(modules)
  for policy in args.policies.split(","):
    load_before = bench_common.load()
    rates = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
      for variant in (variants if round_index % 2 == 0 else variants[::-1]):
        rates[variant].append(pipeline_rate(sources, modules, policy, args.batch_size,
                                            args.batches, variant))
    row = dict(base, policy=policy, load_before=load_before)
    row["images_per_s_per_core"] = round(bench_common.median(rates["library"]))
    if "before" in rates:
      row["before_images_per_s_per_core"] = round(bench_common.median(rates["before"]))
      row["speedup"] = round(bench_common.median(
          [f / s for f, s in zip(rates["library"], rates["before"])]), 2)
    row["rounds_images_per_s"] = {k: [round(r) for r in v] for k, v in rates.items()}
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)
  if args.no_stages or "before" not in modules:
    return
  row = dict(base, policy="stages", load_before=bench_common.load())
  tfds_source = records.open_data_source(args.dataset, "train", args.data_dir, raw=False)
  row.update(stage_breakdown(sources, modules, tfds_source,
                             min(512, len(sources["library"]))))
  row.update(agreement(sources, modules))
  row["load_after"] = bench_common.load()
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
