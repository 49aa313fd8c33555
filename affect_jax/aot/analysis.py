"""Compiles the real train and eval steps for a topology from abstract inputs (shapes
and shardings only, nothing initialised or transferred) and reads what the compiler
says about them: HBM per chip, FLOPs and bytes accessed, HLO size, and the roofline
rate these give on the chip's published peaks."""
from __future__ import annotations

import dataclasses
import re
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from affect_jax.aot import chips
from affect_jax.aot.topology import Topology
from affect_jax.data import device_resident, pipeline
from affect_jax.data.device_augment import augment_policy
from affect_jax.data_parallel import AXIS
from affect_jax.model import implementation
from affect_jax.model.multitask import DTYPES, create_model
from affect_jax.train.optimizers import create_learning_rate_fn
from affect_jax.train.step_functions import (
  compile_eval_step,
  compile_resident_train_step,
  compile_train_step,
  loss_settings_from_config,
)
from affect_jax.train.train_state import abstract_train_state
from affect_jax.vocabulary import NUM_AUS

STEPS = ("train", "eval", "resident")  # resident: draw + augment + train step, one program


class DoesNotFit(Exception):
  """A step needs more HBM per chip than the chip lets a program use."""

  def __init__(self, step: str, per_chip_batch: int, needed_bytes: int | None,
               usable_bytes: int, chip: chips.Chip):
    self.step, self.per_chip_batch = step, per_chip_batch
    self.needed_bytes, self.usable_bytes, self.chip = needed_bytes, usable_bytes, chip
    needs = (f"needs {needed_bytes / chips.GiB:.2f} GiB" if needed_bytes is not None
             else "needs more")
    super().__init__(
        f"the {step} step does not fit at {per_chip_batch} images per chip: it {needs} "
        f"of HBM per chip, a {chip.device_kind} ({chip.name}) lets a program use "
        f"{usable_bytes / chips.GiB:.2f} GiB of its {chip.hbm_bytes / chips.GiB:.2f}")


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps and the abstract TrainState of a config on a topology's mesh;
  `train_kwargs`, the train step's constants (for the device-resident program)."""
  train: object
  eval: object
  state: object
  implementation: str
  train_kwargs: dict = dataclasses.field(default_factory=dict)
  compiler_options: dict = dataclasses.field(default_factory=dict)
  augment: str = "basic"


def placeholder_label_statistics(config) -> dict:
  """Uniform counts for weighted losses: their weights are constants of the step, so
  any counts give the same program shape and cost as the training set's."""
  return {"expr_class_counts": [1] * config.model.num_expr_classes,
          "au_positive_counts": [1] * NUM_AUS, "labelled": {"au": 2}}


def build_steps(config, topology: Topology) -> Steps:
  """The steps as the Trainer builds them (affect_jax.train.loop.Trainer.__init__), with
  the implementation resolved for the topology's platform ("xla" on a TPU mesh)."""
  mesh = topology.mesh
  resolved = implementation.implementation_for(config.model, mesh)
  options = implementation.compiler_options(resolved)
  model = create_model(config.model, resolved)
  learning_rate_fn = create_learning_rate_fn(config)
  dtype = DTYPES[config.model.dtype]
  settings = loss_settings_from_config(config, placeholder_label_statistics(config))
  train_kwargs = dict(settings=settings, learning_rate_fn=learning_rate_fn, dtype=dtype,
                      seed=config.seed)
  train = compile_train_step(mesh, options, **train_kwargs)
  evaluate = compile_eval_step(mesh, options,
                               num_expr_classes=config.model.num_expr_classes,
                               dtype=dtype)
  state = abstract_train_state(config, model, mesh, learning_rate_fn)
  return Steps(train, evaluate, state, resolved, train_kwargs, options,
               config.input.augment)


def abstract_batch(topology: Topology, per_chip_batch: int, image_size: int) -> dict:
  """A global batch with the input pipeline's keys and dtypes, split over the data
  axis."""
  sharding = NamedSharding(topology.mesh, P(AXIS))
  rows = per_chip_batch * topology.chips
  return {key: jax.ShapeDtypeStruct((rows, *np.shape(value)), np.asarray(value).dtype,
                                    sharding=sharding)
          for key, value in pipeline.empty_example(image_size).items()}


def abstract_resident_dataset(topology: Topology, frames: int, image_size: int
                              ) -> device_resident.DeviceDataset:
  """A split of `frames` records as device_resident.load_split_to_device places it:
  every array sharded over the data axis, each chip holding 1/chips of the records."""
  sharding = NamedSharding(topology.mesh, P(AXIS))
  rows = -(-frames // topology.chips)

  def rows_of(shape, dtype):
    return jax.ShapeDtypeStruct((rows * topology.chips, *shape), dtype,
                                sharding=sharding)

  example = pipeline.empty_example(image_size)
  labels = {key: rows_of(np.shape(example[key]), np.asarray(example[key]).dtype)
            for key in device_resident.LABEL_KEYS}
  return device_resident.DeviceDataset(
      images=rows_of((image_size, image_size, 3), np.uint8), labels=labels,
      valid=rows_of((), np.bool_), num_records=frames, rows_per_device=rows,
      shortest_shard=frames // topology.chips)


def lower_resident_step(steps: Steps, topology: Topology, per_chip_batch: int,
                        image_size: int, frames: int):
  """The device-resident training program (draw, augment, train step) lowered for a
  split of `frames` records on the topology's mesh."""
  dataset = abstract_resident_dataset(topology, frames, image_size)
  settings = device_resident.DrawSettings(
      per_chip_batch, dataset.shortest_shard // per_chip_batch, steps.train_kwargs["seed"],
      augment_policy(steps.augment), image_size)
  program = compile_resident_train_step(topology.mesh, settings, steps.compiler_options,
                                        **steps.train_kwargs)
  return program.lower(steps.state, dataset, jax.ShapeDtypeStruct((), np.int32))


def batch_bytes_per_image(image_size: int) -> int:
  return sum(np.asarray(v).nbytes for v in pipeline.empty_example(image_size).values())


_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s+=\s")


def count_hlo_instructions(hlo_text: str) -> tuple[int, int]:
  """(instructions of every computation, those of the entry computation) of an HLO
  module's text: the second is about the operations one step launches."""
  total = entry = 0
  in_entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
    elif line.startswith("}"):
      in_entry = False
    elif _INSTRUCTION.match(line):
      total += 1
      entry += in_entry
  return total, entry


_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_NEEDED_AGAINST_AVAILABLE = (
  re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
  re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
)


def _bytes(number: str, unit: str) -> int:
  # XLA prints sizes in binary units (its "G" is GiB).
  return int(float(number) * 1024 ** " KMGTP".index(unit or " "))


def needed_and_available(message: str) -> tuple[int, int] | None:
  """(needed, available) bytes from the TPU compiler's out-of-memory message."""
  for pattern in _NEEDED_AGAINST_AVAILABLE:
    match = pattern.search(message)
    if match:
      return _bytes(*match.group(1, 2)), _bytes(*match.group(3, 4))
  return None


def step_cost(lowered, compiled) -> dict:
  """XLA's {"flops", "bytes accessed", ...} of one device's program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    return cost
  # XLA:GPU compiled without a device reports no cost.
  from affect_jax.aot import gpu  # pylint: disable=g-import-not-at-top
  return gpu.cost_without_device(lowered, compiled)


def hbm_bytes_used(memory) -> int:
  """Arguments + outputs + temporaries + generated code per chip, outputs that alias
  (donated) arguments counted once: the train step donates its state, so the new
  state is written over the old."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)


def roofline(chip: chips.Chip, flops_per_image: float, bytes_per_image: float) -> dict:
  """Images/s per chip at the chip's peak FLOP/s or HBM bandwidth, whichever binds."""
  if chip.peak_flops is None or chip.hbm_bandwidth is None:
    return {"roofline_images_per_s_per_chip": None, "bound": None,
            "compute_bound_images_per_s": None, "memory_bound_images_per_s": None}
  compute = chip.peak_flops / flops_per_image
  memory = chip.hbm_bandwidth / bytes_per_image
  return {"roofline_images_per_s_per_chip": min(compute, memory),
          "bound": "compute" if compute <= memory else "memory",
          "compute_bound_images_per_s": compute, "memory_bound_images_per_s": memory}


def compile_step(steps: Steps, step: str, topology: Topology, per_chip_batch: int,
                 image_size: int, resident_frames: int = 0) -> dict:
  """Compiles one step at a per-chip batch; its analysis, or DoesNotFit. The
  "resident" step holds a split of `resident_frames` records on the chips."""
  chip = topology.chip
  start = time.perf_counter()
  try:
    if step == "resident":
      lowered = lower_resident_step(steps, topology, per_chip_batch, image_size,
                                    resident_frames)
    else:
      jitted = steps.train if step == "train" else steps.eval
      lowered = jitted.lower(steps.state, abstract_batch(topology, per_chip_batch,
                                                         image_size))
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    sizes = needed_and_available(str(error))
    raise DoesNotFit(step, per_chip_batch, sizes[0] if sizes else None,
                     sizes[1] if sizes else chip.usable_hbm_bytes, chip) from None
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  used = hbm_bytes_used(memory)
  if used > chip.usable_hbm_bytes:  # XLA:GPU and XLA:CPU compile whatever the memory
    raise DoesNotFit(step, per_chip_batch, used, chip.usable_hbm_bytes, chip)
  cost = step_cost(lowered, compiled)
  flops_per_image = cost["flops"] / per_chip_batch  # the cost of one chip's program
  bytes_per_image = cost["bytes accessed"] / per_chip_batch
  instructions, entry_instructions = count_hlo_instructions(compiled.as_text())
  return {
    "step": step, "chip": chip.name, "device_kind": chip.device_kind,
    "chips": topology.chips, "hosts": topology.hosts,
    "per_chip_batch": per_chip_batch, "global_batch": per_chip_batch * topology.chips,
    "hbm_bytes_used": used, "hbm_bytes_total": chip.hbm_bytes,
    "hbm_bytes_usable": chip.usable_hbm_bytes,
    "hbm_bytes_arguments": memory.argument_size_in_bytes,
    "hbm_bytes_outputs": memory.output_size_in_bytes,
    "hbm_bytes_aliased": memory.alias_size_in_bytes,
    "hbm_bytes_temporaries": memory.temp_size_in_bytes,
    "hbm_bytes_code": memory.generated_code_size_in_bytes,
    "flops_per_image": flops_per_image, "bytes_per_image": bytes_per_image,
    **roofline(chip, flops_per_image, bytes_per_image),
    "hlo_ops": instructions, "hlo_entry_ops": entry_instructions,
    "compile_seconds": round(seconds, 1),
  }
