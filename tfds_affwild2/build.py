"""Builds the `affwild2` TFDS dataset from a release folder (TFDS's `tfds build` needs
apache_beam; this command does not).

  affect-jax build --manual_dir RELEASE --data_dir DATA --config union
  (or python -m tfds_affwild2.build ...)

A dataset already built in DATA is reused only if it was built from this release as it
is now (the same source fingerprint: annotation files' contents, image names and
sizes); otherwise the build stops and says so, and --overwrite rebuilds it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from typing import Sequence

import tensorflow_datasets as tfds
from absl import flags
from tensorflow_datasets.core import shuffle as tfds_shuffle

from tfds_affwild2 import affwild2, tfds_without_tf
from tfds_affwild2.affwild2 import Affwild2
from tfds_affwild2.errors import MissingReleasePartError, ReleaseError

FILE_FORMAT = "array_record"  # random access for grain


DEFAULT_MEMORY_BUFFER_MB = 256


@contextlib.contextmanager
def write_buffer_limit(megabytes: int):
  """TFDS holds serialized examples in memory up to a module constant (1 GB) before it
  spills them to hashed on-disk buckets; a smaller limit bounds the build's memory
  whatever the size of the release (the buckets are then read back one at a time)."""
  previous = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = megabytes << 20
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = previous


def generate_mode(builder: Affwild2, manual_dir: str, overwrite: bool):
  """How TFDS is to treat a dataset already in data_dir: reused if it was built from
  this release as it is now; else rebuilt with `overwrite`, refused without."""
  if not builder.data_path.exists():
    return tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  stored, current = builder.stored_fingerprint(), builder.release_fingerprint(manual_dir)
  if stored == current:
    return tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    logging.warning("%s was built from another release or an earlier state of it: "
                    "rebuilding it", builder.data_dir)
    return tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # deletes, then builds
  was = (f"source fingerprint {stored[:12]}" if stored else
         "no source fingerprint: built before the build recorded one")
  raise ReleaseError(
      f"{builder.data_dir} was built from another release, or from {manual_dir} before "
      f"it changed ({was}; {manual_dir} now {current[:12]}): rebuild it with "
      "--overwrite, or build into another --data_dir")


def build_dataset(manual_dir: str, data_dir: str, config: str = "union", *,
                  layout_overrides: dict | None = None,
                  fix_mismatched_images: bool = False,
                  memory_buffer_mb: int = DEFAULT_MEMORY_BUFFER_MB,
                  overwrite: bool = False) -> Affwild2:
  """Builds `affwild2/<config>` under data_dir, or finds it built from this release as
  it is now (see the module docstring)."""
  if not os.path.isdir(manual_dir):
    raise MissingReleasePartError(f"--manual_dir {manual_dir}: no such folder (the "
                                  "unpacked ABAW release)")
  builder = Affwild2(config=config, data_dir=data_dir, layout_overrides=layout_overrides,
                     fix_mismatched_images=fix_mismatched_images,
                     file_format=FILE_FORMAT)
  mode = generate_mode(builder, manual_dir, overwrite)
  tfds_without_tf.install()
  with write_buffer_limit(memory_buffer_mb):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode))
  return builder


def format_overlaps(overlaps: list) -> str:
  """The videos in both the train and validation splits, as a warning to print."""
  if not overlaps:
    return ""
  names = ", ".join(o["video"] for o in overlaps[:20])
  more = f" and {len(overlaps) - 20} more" if len(overlaps) > 20 else ""
  return (f"warning: {len(overlaps)} videos are annotated in the train split of some "
          f"tasks and the validation split of others (validation scores include frames "
          f"of videos trained on; the dataset's metadata lists them): {names}{more}")


def format_summary(summary: dict) -> str:
  """The per-split counts as an aligned text table."""
  rows = [f"{'split':<11}{'videos':>7}{'frames':>9}{'expr':>8}{'au':>8}{'va':>8}"
          f"{'no image':>10}{'no label':>10}"]
  for split, s in sorted(summary.items()):
    labelled = s["labelled"]
    rows.append(f"{split:<11}{s['videos']:>7}{s['frames']:>9}{labelled['expr']:>8}"
                f"{labelled['au']:>8}{labelled['va']:>8}"
                f"{s['skipped']['image_absent']:>10}{s['skipped']['no_valid_label']:>10}")
  return "\n".join(rows)


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("manual_dir", None, "The unpacked ABAW release.",
                      flag_values=flag_values)
  flags.DEFINE_string("data_dir", None, "Where TFDS datasets live.",
                      flag_values=flag_values)
  flags.DEFINE_enum("config", "union", [c.name for c in affwild2.BUILDER_CONFIGS],
                    "The dataset's builder config.", flag_values=flag_values)
  flags.DEFINE_string("layout", None, "JSON overriding detected parts of the release "
                      'layout, e.g. \'{"image_roots": ["faces"]}\' (paths relative to '
                      "manual_dir).", flag_values=flag_values)
  flags.DEFINE_bool("fix_mismatched_images", False, "Convert images that are not "
                    "112x112 RGB JPEG instead of stopping with an error.",
                    flag_values=flag_values)
  flags.DEFINE_integer("memory_buffer_mb", DEFAULT_MEMORY_BUFFER_MB, "Examples held in "
                       "memory before spilling to disk: bounds the build's memory "
                       "whatever the release's size.", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Rebuild a dataset in data_dir that was built "
                    "from another release or an earlier state of this one (without it, "
                    "the build stops).", flag_values=flag_values)
  flags.mark_flags_as_required(["manual_dir", "data_dir"], flag_values=flag_values)


def parse_layout_flag(text: str | None) -> dict | None:
  if not text:
    return None
  try:
    overrides = json.loads(text)
  except json.JSONDecodeError as error:
    raise ReleaseError(f"--layout is not JSON ({error}): {text[:200]!r}") from None
  if not isinstance(overrides, dict):
    raise ReleaseError(f"--layout must be a JSON object, got {text[:200]!r}")
  return overrides


def run_build(args) -> int:
  """The build the parsed flags ask for; prints the summary."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  start = time.perf_counter()
  builder = build_dataset(args.manual_dir, args.data_dir, args.config,
                          layout_overrides=parse_layout_flag(args.layout),
                          fix_mismatched_images=args.fix_mismatched_images,
                          memory_buffer_mb=args.memory_buffer_mb,
                          overwrite=args.overwrite)
  seconds = time.perf_counter() - start
  frames = sum(split.num_examples for split in builder.info.splits.values())
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(format_summary(dict(builder.info.metadata.get("summary", {}))))
  print(f"built {builder.info.full_name} in {builder.data_dir}: {frames} frames in "
        f"{seconds:.1f} s ({frames / max(seconds, 1e-9):.0f} frames/s), "
        f"peak memory {peak_mb:.0f} MB")
  warning = format_overlaps(
      list(builder.info.metadata.get("videos_in_train_and_validation", [])))
  if warning:
    print(warning)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`affect-jax build`: an expected error (bad data, a missing folder) propagates to
  the dispatcher, which prints it as one `error:` line (with its traceback under
  `--verbose`); `python -m tfds_affwild2.build` reports it the same way."""
  # The project's one command line (absl flags, no JAX); the builder itself imports
  # nothing from affect_jax.
  from affect_jax import cli  # pylint: disable=g-import-not-at-top
  args, _ = cli.parse_flags(argv, define_flags, __doc__)
  return run_build(args)


if __name__ == "__main__":
  # The dispatcher's error reporting; tfds_affwild2 otherwise imports nothing from
  # affect_jax.
  from affect_jax import cli  # pylint: disable=g-import-not-at-top
  sys.exit(cli.run_as_script(main))
