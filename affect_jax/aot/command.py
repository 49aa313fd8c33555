"""`affect-jax compile`: the train and eval steps compiled for an accelerator this host
need not have, and what the compiler says about them (see COMMAND_DOC)."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import sys
from typing import Sequence

from absl import flags

from affect_jax import cli

COMMAND_DOC = """\
affect-jax compile: the train and eval steps, as the trainer builds them, compiled for a
topology from abstract inputs (nothing initialised, no accelerator needed). Reported per
chip: HBM used against the chip's, FLOPs and bytes accessed per image, the roofline
images/s on the chip's published peaks, the HLO size, the largest batch that fits, and
whether s-Aff-Wild2's training frames fit in HBM beside the step.

  affect-jax compile --config configs/default.py --topology v5e:2x2 --dtype bfloat16 \\
      --batch_size 128 --out v5e.json
  affect-jax compile --config configs/tiny.py --topology cpu:8 --no_search

Topologies: TPU ones as jax.experimental.topologies.get_topology_desc takes them
(v4:2x2x1, v5e:2x2, v5e:4x4 (4 hosts), v5p:2x2x1, v6e:2x4; needs libtpu: pip install
'jax[tpu]'), h100:<GPUs> or h100:<hosts>x<GPUs> (needs the jax CUDA plugin: pip install
'jax[cuda13]'), cpu:<N>. A step that does not fit exits with status 1 and says how much
HBM it needs against what the chip has.
"""

# s-Aff-Wild2 (ABAW MTL): training frames; an epoch at the roofline rate is reported.
S_AFFWILD2_TRAIN_FRAMES = 142_000
DOES_NOT_FIT = 1


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("topology", None, "v5e:2x2, v4:2x2x1, v5e:4x4, h100:8, cpu:8, "
                      "...", flag_values=flag_values)
  flags.DEFINE_integer("batch_size", None, "Train batch PER CHIP (default: the "
                       "config's global input.batch_size over the topology's chips).",
                       flag_values=flag_values)
  flags.DEFINE_integer("eval_batch_size", None, "Eval batch PER CHIP (default: the "
                       "config's global input.eval_batch_size over the chips).",
                       flag_values=flag_values)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Compute dtype (default: the config's model.dtype).",
                    flag_values=flag_values)
  flags.DEFINE_list("steps", ["train", "eval"], "Steps to compile: train, eval, and "
                    "resident (the device-resident program: draw + augment + train "
                    "step over s-Aff-Wild2's training frames sharded on the chips, "
                    "at the train batch).", flag_values=flag_values)
  flags.DEFINE_bool("no_search", False, "Compile the given batches only, without "
                    "searching the largest per-chip train batch that fits.",
                    flag_values=flag_values)
  flags.DEFINE_integer("search_compiles", 4, "At most this many extra train-step "
                       "compiles for the search.", flag_values=flag_values)
  flags.DEFINE_integer("granularity", 8, "The search's batch step.",
                       flag_values=flag_values)
  flags.DEFINE_string("out", None, "Write the report as JSON here.",
                      flag_values=flag_values)
  flags.mark_flag_as_required("topology", flag_values=flag_values)


def keep_jax_on_cpu() -> None:
  """Nothing runs on an accelerator here: TPU devices come from libtpu's topology
  description and GPU ones from a target description, not from a runtime. JAX on the
  CPU skips libtpu's seconds-long search for chips and its one-process lock, so
  several compiles (and other JAX programs) can run side by side."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")


def per_chip(global_batch: int, chips: int, what: str) -> int:
  if global_batch % chips:
    raise ValueError(f"the config's {what} ({global_batch}) is not a multiple of the "
                     f"{chips} chips; give a per-chip batch")
  return global_batch // chips


def epoch_seconds(images_per_s_per_chip: float | None, chips: int) -> float | None:
  if not images_per_s_per_chip:
    return None
  return S_AFFWILD2_TRAIN_FRAMES / (images_per_s_per_chip * chips)


def with_epoch_times(row: dict) -> dict:
  rate = row["roofline_images_per_s_per_chip"]
  return {**row, "epoch_seconds_1_chip": epoch_seconds(rate, 1),
          "epoch_seconds_8_chips": epoch_seconds(rate, 8)}


def on_paper(row: dict, compiled_chip) -> dict:
  """The compiled step's per-image FLOPs and bytes on the peaks of the table's chips
  of other platforms (none for a CPU compile: the CPU implementation's program is
  not the accelerators')."""
  from affect_jax.aot import analysis, chips  # pylint: disable=g-import-not-at-top
  if compiled_chip.platform == "cpu":
    return {}
  flops, nbytes = row["flops_per_image"], row["bytes_per_image"]
  return {chip.name: with_epoch_times({
              "chip": chip.name, "device_kind": chip.device_kind,
              "flops_per_image": flops, "bytes_per_image": nbytes,
              **analysis.roofline(chip, flops, nbytes)})
          for chip in chips.CHIPS.values()
          if chip.platform not in (compiled_chip.platform, "cpu")}


def resident_dataset(step_hbm_bytes: int, chip, topology_name: str, chips: int,
                     image_size: int) -> dict:
  """Would s-Aff-Wild2's training frames (uint8 images + labels, as the input
  pipeline gives them) fit in HBM beside the step: split over the data axis (as
  affect_jax.data.device_resident keeps them), or replicated on every chip? The
  "resident" step compiles that program itself."""
  from affect_jax.aot import analysis  # pylint: disable=g-import-not-at-top
  dataset = S_AFFWILD2_TRAIN_FRAMES * analysis.batch_bytes_per_image(image_size)
  slices = {topology_name: chips}
  if chip.platform != "cpu":  # and the chip's "-8" slice (v4-8: 4 chips)
    slices = {f"{chip.name}-8": chip.chips_in_8_slice,
              **({} if chip.chips_in_8_slice == chips else slices)}
  result = {"frames": S_AFFWILD2_TRAIN_FRAMES, "dataset_bytes": dataset,
            "step_hbm_bytes_per_chip": step_hbm_bytes,
            "hbm_bytes_usable": chip.usable_hbm_bytes, "slices": {}}
  for name, count in slices.items():
    sharded = math.ceil(dataset / count)
    result["slices"][name] = {
      "chips": count, "sharded_bytes_per_chip": sharded,
      "fits_sharded": step_hbm_bytes + sharded <= chip.usable_hbm_bytes,
      "free_bytes_sharded": chip.usable_hbm_bytes - step_hbm_bytes - sharded,
      "fits_replicated": step_hbm_bytes + dataset <= chip.usable_hbm_bytes,
      "free_bytes_replicated": chip.usable_hbm_bytes - step_hbm_bytes - dataset}
  return result


def search_train_batch(steps, topology, first_row: dict, image_size: int,
                       flag_values) -> dict:
  from affect_jax.aot import analysis, search  # pylint: disable=g-import-not-at-top
  analyses = {first_row["per_chip_batch"]: first_row}

  def measure(batch: int) -> search.Probe:
    try:
      row = analysis.compile_step(steps, "train", topology, batch, image_size)
    except analysis.DoesNotFit as error:
      return search.Probe(batch, False, error.needed_bytes)
    analyses[batch] = row
    return search.Probe(batch, True, row["hbm_bytes_used"])

  batch_bytes = first_row["per_chip_batch"] * analysis.batch_bytes_per_image(image_size)
  fixed = (first_row["hbm_bytes_arguments"] - batch_bytes + first_row["hbm_bytes_code"])
  first = search.Probe(first_row["per_chip_batch"], True, first_row["hbm_bytes_used"])
  result = search.search_largest_batch(
      measure, first, fixed, topology.chip.usable_hbm_bytes,
      granularity=flag_values.granularity, max_compiles=flag_values.search_compiles)
  best = analyses[result.largest_fitting]
  keys = ("hbm_bytes_used", "flops_per_image", "bytes_per_image",
          "roofline_images_per_s_per_chip", "bound")
  return {**result.as_json(),
          "at_largest_batch": {key: best[key] for key in keys}}


def compile_report(config, flag_values) -> dict:
  from affect_jax import config_checks  # pylint: disable=g-import-not-at-top
  from affect_jax.aot import analysis, topology  # pylint: disable=g-import-not-at-top
  if flag_values.dtype:
    config.model.dtype = flag_values.dtype
  config_checks.validate_config(config)
  unknown = set(flag_values.steps) - set(analysis.STEPS)
  if unknown:
    raise ValueError(f"--steps: {sorted(unknown)} not among {analysis.STEPS}")
  topo = topology.create_topology(flag_values.topology)
  steps = analysis.build_steps(config, topo)
  image_size = config.input.image_size
  batches = {
    "train": flag_values.batch_size or per_chip(config.input.batch_size, topo.chips,
                                                "input.batch_size"),
    "resident": flag_values.batch_size or per_chip(config.input.batch_size, topo.chips,
                                                   "input.batch_size"),
    "eval": flag_values.eval_batch_size or per_chip(
        config.input.eval_batch_size, topo.chips, "input.eval_batch_size")}
  report = {
    "topology": topo.name, "chip": topo.chip.name, "device_kind": topo.chip.device_kind,
    "chips": topo.chips, "hosts": topo.hosts, "dtype": config.model.dtype,
    "implementation": steps.implementation, "image_size": image_size,
    "date": datetime.date.today().isoformat(), "versions": versions(), "steps": {}}
  for name in [s for s in analysis.STEPS if s in flag_values.steps]:
    row = with_epoch_times(analysis.compile_step(
        steps, name, topo, batches[name], image_size,
        resident_frames=S_AFFWILD2_TRAIN_FRAMES))
    if name == "train":
      if not flag_values.no_search:
        row.update(search_train_batch(steps, topo, row, image_size, flag_values))
      report["s_affwild2_resident"] = resident_dataset(
          row["hbm_bytes_used"], topo.chip, topo.name, topo.chips, image_size)
    row["on_paper"] = on_paper(row, topo.chip)
    report["steps"][name] = row
  return report


def versions() -> dict:
  found = {}
  for package in ("jax", "jaxlib", "libtpu", "jax-cuda13-plugin", "flax"):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def _gib(value) -> str:
  return "-" if value is None else f"{value / 2**30:.2f}"


def _number(value, digits: int = 0) -> str:
  return "-" if value is None else f"{value:,.{digits}f}"


def format_table(report: dict) -> str:
  """One line per compiled step, then the on-paper rows and the resident dataset."""
  header = ("step", "chip", "chips", "hosts", "batch/chip", "HBM GiB used/usable",
            "GFLOP/img", "MB/img", "roofline img/s/chip", "bound", "HLO ops",
            "largest batch/chip")
  rows = []
  for name, row in report["steps"].items():
    largest = "-"
    if "largest_per_chip_batch" in row:
      failing = row["smallest_failing_per_chip_batch"]
      largest = (f"{row['largest_per_chip_batch']} ("
                 f"{'fails at ' + str(failing) if failing else 'no failure found'}; "
                 f"{row['search_compiles']} compiles)")
    rows.append((name, row["chip"], str(row["chips"]), str(row["hosts"]),
                 str(row["per_chip_batch"]),
                 f"{_gib(row['hbm_bytes_used'])}/{_gib(row['hbm_bytes_usable'])}",
                 f"{row['flops_per_image'] / 1e9:.3f}",
                 f"{row['bytes_per_image'] / 1e6:.1f}",
                 _number(row["roofline_images_per_s_per_chip"]), row["bound"] or "-",
                 f"{row['hlo_ops']:,}", largest))
    for chip, paper in row["on_paper"].items():
      rows.append((name, f"{chip} (on paper)", "", "", "", "",
                   f"{paper['flops_per_image'] / 1e9:.3f}",
                   f"{paper['bytes_per_image'] / 1e6:.1f}",
                   _number(paper["roofline_images_per_s_per_chip"]), paper["bound"],
                   "", ""))
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
           for line in (header, *rows)]
  resident = report.get("s_affwild2_resident")
  if resident:
    lines.append(f"s-Aff-Wild2 training frames ({resident['frames']:,}, "
                 f"{resident['dataset_bytes'] / 1e9:.2f} GB) in HBM beside the train "
                 f"step ({_gib(resident['step_hbm_bytes_per_chip'])} GiB per chip):")
    for name, fit in resident["slices"].items():
      lines.append(f"  {name} ({fit['chips']} chips): split over the data axis "
                   f"{_gib(fit['sharded_bytes_per_chip'])} GiB per chip, "
                   f"{'fits' if fit['fits_sharded'] else 'does not fit'}; replicated "
                   f"{'fits' if fit['fits_replicated'] else 'does not fit'} "
                   f"({_gib(fit['free_bytes_replicated'])} GiB left)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  flag_values, _ = cli.parse_flags(argv, define_flags, COMMAND_DOC,
                                   config="The config file (configs/*.py); "
                                   "--config.x=value overrides a field.",
                                   config_required=True)
  keep_jax_on_cpu()
  from affect_jax.aot import analysis  # pylint: disable=g-import-not-at-top
  try:
    report = compile_report(flag_values.config, flag_values)
  except analysis.DoesNotFit as error:
    print(f"affect-jax compile: {error}", file=sys.stderr)
    return DOES_NOT_FIT
  print(format_table(report))
  if flag_values.out:
    with open(flag_values.out, "w") as f:
      json.dump(report, f, indent=1)
  return 0
