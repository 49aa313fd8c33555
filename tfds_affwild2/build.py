"""Builds the `affwild2` TFDS dataset from a release folder (TFDS's `tfds build` needs
apache_beam; this command does not).

  affect-jax build --manual_dir RELEASE --data_dir DATA --config union
  (or python -m tfds_affwild2.build ...)
"""
from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import time
from typing import Sequence

import tensorflow_datasets as tfds
from absl import flags
from tensorflow_datasets.core import shuffle as tfds_shuffle

from tfds_affwild2 import affwild2, tfds_without_tf
from tfds_affwild2.affwild2 import Affwild2

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


def build_dataset(manual_dir: str, data_dir: str, config: str = "union", *,
                  layout_overrides: dict | None = None,
                  fix_mismatched_images: bool = False,
                  memory_buffer_mb: int = DEFAULT_MEMORY_BUFFER_MB) -> Affwild2:
  """Builds (or finds already built) `affwild2/<config>` under data_dir."""
  builder = Affwild2(config=config, data_dir=data_dir, layout_overrides=layout_overrides,
                     fix_mismatched_images=fix_mismatched_images,
                     file_format=FILE_FORMAT)
  tfds_without_tf.install()
  with write_buffer_limit(memory_buffer_mb):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


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
  flags.mark_flags_as_required(["manual_dir", "data_dir"], flag_values=flag_values)


def main(argv: Sequence[str] | None = None) -> int:
  # The project's one command line (absl flags, no JAX); the builder itself imports
  # nothing from affect_jax.
  from affect_jax import cli  # pylint: disable=g-import-not-at-top
  args, _ = cli.parse_flags(argv, define_flags, __doc__)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  start = time.perf_counter()
  builder = build_dataset(args.manual_dir, args.data_dir, args.config,
                          layout_overrides=json.loads(args.layout) if args.layout else None,
                          fix_mismatched_images=args.fix_mismatched_images,
                          memory_buffer_mb=args.memory_buffer_mb)
  seconds = time.perf_counter() - start
  frames = sum(split.num_examples for split in builder.info.splits.values())
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(format_summary(dict(builder.info.metadata.get("summary", {}))))
  print(f"built {builder.info.full_name} in {builder.data_dir}: {frames} frames in "
        f"{seconds:.1f} s ({frames / max(seconds, 1e-9):.0f} frames/s), "
        f"peak memory {peak_mb:.0f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
