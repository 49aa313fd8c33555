"""A whole decoded split kept on the devices, batches drawn and augmented inside jit.

When a split fits in device memory (s-Aff-Wild2's 142k training frames at 112x112 are
5.3 GB of uint8), the host input pipeline can leave the training loop entirely:

  dataset = load_split_to_device(source, mesh, seed=config.seed)   # decode, upload once
  draw = compile_draw_batch(mesh, dataset, global_batch_size=256, seed=config.seed,
                            augment=AugmentConfig.from_policy("basic"))
  for step in ...:
    batch = draw(dataset, step)        # on the devices: indices, gather, augment
    state, metrics = train_fn(state, batch)

or, where the platform allows, draw and train step as one program (`step_functions.
compile_resident_train_step`).

The split is sharded over the mesh's data axis, not copied to every device: each
device holds 1/D of the records (a seeded random assignment, so every device sees every
video) and draws its rows of each global batch from its own shard, so a step moves no
image between devices and a v5e-8 holds s-Aff-Wild2 in 0.7 GB per chip. The batch of
step s is a pure function of (seed, s): epoch e = s // steps_per_epoch shuffles each
shard by a permutation drawn from (seed, e, device), and step s takes its slice of it,
so a run resumes exactly from the step alone (no iterator state). Each epoch visits
every record at most once; a shard's remainder of fewer than one local batch (and the
rows a longer shard has beyond the shortest) are left out, a different remainder each
epoch.

Augmentation (device_augment.py) follows the host pipeline's policies.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from affect_jax import vocabulary
from affect_jax.data import pipeline
from affect_jax.data.augment import AugmentConfig
from affect_jax.data.device_augment import (
  augment_policy,
  has_colour,
  image_keys,
  jitter_batch,
  warp_batch,
)
from affect_jax.data_parallel import AXIS

LABEL_KEYS = vocabulary.LABEL_KEYS + ("record_index",)
PADDING = -1  # the record id of a shard's padding rows


@flax.struct.dataclass
class DeviceDataset:
  """A decoded split on the devices (a pytree: pass it to jitted functions).

  Every array has D * rows_per_device rows, sharded over the data axis: device d holds
  rows [d * rows_per_device, (d + 1) * rows_per_device), its shard.
  images: uint8 [rows, H, W, 3].
  labels: the training labels of `records.record_to_example` (float masks, 0 fillers
    under masks) and `record_index`, each [rows, ...].
  valid: bool [rows], False for the padding rows that even out shorter shards.
  """
  images: jax.Array
  labels: dict[str, jax.Array]
  valid: jax.Array
  num_records: int = flax.struct.field(pytree_node=False)
  rows_per_device: int = flax.struct.field(pytree_node=False)
  shortest_shard: int = flax.struct.field(pytree_node=False)  # its valid rows


def split_nbytes(num_records: int, image_size: int = vocabulary.IMAGE_SIZE) -> int:
  """Device bytes of a split's uint8 images (labels add ~80 bytes per record)."""
  return num_records * image_size * image_size * 3


def shard_assignment(num_records: int, num_shards: int, seed: int) -> np.ndarray:
  """Record ids [num_shards, rows_per_device]: a seeded permutation dealt round-robin,
  so shards differ in length by at most one record (PADDING fills the shorter ones)."""
  order = np.random.default_rng([seed, 0x5A4D]).permutation(num_records)
  rows = -(-num_records // num_shards)
  assignment = np.full((num_shards, rows), PADDING, np.int64)
  for shard in range(num_shards):
    dealt = order[shard::num_shards]
    assignment[shard, :len(dealt)] = dealt
  return assignment


def _device_memory_limit(mesh: Mesh) -> int | None:
  # Only this process's devices report their memory.
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def _local_shards(mesh: Mesh) -> list[int]:
  """Positions along the data axis of this process's devices."""
  return [position for position, device in enumerate(mesh.devices.flat)
          if device.process_index == jax.process_index()]


def _decode_rows(source, record_ids: np.ndarray, image_size: int,
                 blank: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Images and labels of `record_ids` as host arrays; PADDING rows are zeros."""
  rows = {"image": np.zeros((len(record_ids), image_size, image_size, 3), np.uint8)}
  rows.update({key: np.repeat(blank[key][None], len(record_ids), axis=0)
               for key in LABEL_KEYS})
  for row, record_id in enumerate(record_ids):
    if record_id == PADDING:
      continue
    example = pipeline.load_example(source[int(record_id)], int(record_id),
                                    AugmentConfig(), None, image_size)
    for key in ("image", *LABEL_KEYS):
      rows[key][row] = example[key]
  return rows


def _blank_labels(source, image_size: int) -> dict[str, np.ndarray]:
  """Zero labels shaped as the split's (the padding rows' labels)."""
  example = pipeline.load_example(source[0], 0, AugmentConfig(), None, image_size)
  return {key: np.zeros_like(np.asarray(example[key])) for key in LABEL_KEYS}


def _sharded_array(parts: dict[int, np.ndarray], rows_per_part: int,
                   sharding: NamedSharding) -> jax.Array:
  """The global array whose shard at data-axis position d is parts[d] (this process's
  positions only: each process decodes and uploads the rows of its own devices)."""
  some = next(iter(parts.values()))
  shape = (len(sharding.mesh.devices.flat) * rows_per_part, *some.shape[1:])
  return jax.make_array_from_callback(
      shape, sharding, lambda index: parts[(index[0].start or 0) // rows_per_part])


def load_split_to_device(source, mesh: Mesh, *, seed: int = 0,
                         image_size: int = vocabulary.IMAGE_SIZE, chunk_size: int = 4096,
                         max_fraction_of_device_memory: float = 0.5) -> DeviceDataset:
  """Decodes every record of `source` (a TFDS data source of `affwild2`, or any
  sequence of such records) and places the split on the devices of `mesh`, sharded
  over the data axis by `shard_assignment(seed)`.

  Host memory stays bounded: each device's images are decoded and uploaded
  `chunk_size` rows at a time into a preallocated device array. Refuses a split whose
  shard would take more than `max_fraction_of_device_memory` of a device's memory
  (where the device reports it).
  """
  num_records = len(source)
  if num_records == 0:
    raise ValueError("the split has no record")
  num_shards = mesh.devices.size
  assignment = shard_assignment(num_records, num_shards, seed)
  rows = assignment.shape[1]
  nbytes = split_nbytes(rows, image_size)
  limit = _device_memory_limit(mesh)
  if limit is not None and nbytes > max_fraction_of_device_memory * limit:
    raise ValueError(
        f"the split's {num_records} images take {nbytes / 2**30:.1f} GiB per device "
        f"({num_shards} devices), more than {max_fraction_of_device_memory:.0%} of the "
        f"device's {limit / 2**30:.1f} GiB; use the host input pipeline "
        "(config.input.device_resident=False)")
  sharded = NamedSharding(mesh, P(AXIS))
  images = jax.jit(lambda: jnp.zeros((num_shards * rows, image_size, image_size, 3),
                                     jnp.uint8), out_shardings=sharded)()
  write = _chunk_writer(mesh)
  local = _local_shards(mesh)
  blank = _blank_labels(source, image_size)
  labels: dict[int, list[dict]] = {shard: [] for shard in local}
  for start in range(0, rows, chunk_size):
    stop = min(start + chunk_size, rows)
    decoded = {shard: _decode_rows(source, assignment[shard, start:stop], image_size,
                                   blank) for shard in local}
    for shard in local:
      labels[shard].append({key: decoded[shard][key] for key in LABEL_KEYS})
    chunk = _sharded_array({shard: decoded[shard]["image"] for shard in local},
                           stop - start, sharded)
    images = write(images, chunk, jnp.int32(start))
  label_arrays = {key: _sharded_array(
      {shard: np.concatenate([part[key] for part in labels[shard]]) for shard in local},
      rows, sharded) for key in LABEL_KEYS}
  valid = _sharded_array({shard: assignment[shard] != PADDING for shard in local},
                         rows, sharded)
  shortest = int((assignment != PADDING).sum(axis=1).min())
  return DeviceDataset(images=images, labels=label_arrays, valid=valid,
                       num_records=num_records, rows_per_device=rows,
                       shortest_shard=shortest)


def _chunk_writer(mesh: Mesh):
  """(images, chunk, start) -> images with each device's chunk rows written at `start`
  of its shard (donated: the split is never held twice)."""
  def write(images, chunk, start):
    return jax.lax.dynamic_update_slice(images, chunk, (start, 0, 0, 0))
  return jax.jit(jax.shard_map(write, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()),
                               out_specs=P(AXIS)), donate_argnums=(0,))


def steps_per_epoch(shortest_shard: int, local_batch_size: int) -> int:
  """Steps of one epoch: every device has that many local batches in its shard."""
  if not 0 < local_batch_size <= shortest_shard:
    raise ValueError(f"batch size per device {local_batch_size} must be in "
                     f"1..{shortest_shard} (the records of the smallest shard)")
  return shortest_shard // local_batch_size


def shard_batch_indices(step, valid, local_batch_size: int, per_epoch: int, seed: int,
                        shard) -> jax.Array:
  """Row indices [local_batch_size] (int32) into one shard, whose valid rows are
  `valid`, for training step `step` (jittable; `shard` is the device's position on
  the data axis).

  Step s of epoch e = s // per_epoch reads positions [(s mod per_epoch) * b, ... + b)
  of a permutation of the shard's valid rows drawn from (seed, e, shard): no row twice
  in an epoch, and the same rows for the same step whatever happened before it.
  """
  step = jnp.asarray(step, jnp.int32)
  epoch, position = step // per_epoch, step % per_epoch
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), shard)
  # Sorting random scores permutes the rows; padding rows sort last and are never read
  # (per_epoch * b <= the shard's valid rows).
  scores = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
  order = jnp.argsort(scores).astype(jnp.int32)
  return jax.lax.dynamic_slice(order, (position * local_batch_size,),
                               (local_batch_size,))


# ----------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------


def _batch_rng(seed: int, step, shard):
  return jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), 0x5EED), step), shard)


def _gather_and_warp(dataset: DeviceDataset, step, *, local_batch_size: int,
                     per_epoch: int, seed: int, cfg: AugmentConfig, image_size: int):
  """Per-device code: this device's rows of step's batch, warped; and the keys of
  their colour jitter."""
  shard = jax.lax.axis_index(AXIS)
  rows = shard_batch_indices(step, dataset.valid, local_batch_size, per_epoch, seed,
                             shard)
  batch = {key: jnp.take(value, rows, axis=0) for key, value in dataset.labels.items()}
  warp_keys, colour_keys = image_keys(_batch_rng(seed, step, shard), local_batch_size)
  images = jnp.take(dataset.images, rows, axis=0)
  batch["image"] = warp_batch(images, warp_keys, cfg, image_size, has_colour(cfg))
  return batch, colour_keys


def _coloured(batch, colour_keys, cfg: AugmentConfig) -> dict:
  return dict(batch, image=jitter_batch(batch["image"], colour_keys, cfg))


@dataclasses.dataclass(frozen=True)
class DrawSettings:
  """What a device needs to draw its rows of each global batch."""
  local_batch_size: int
  per_epoch: int
  seed: int
  augment: AugmentConfig
  image_size: int


def draw_settings(mesh: Mesh, dataset: DeviceDataset, *, global_batch_size: int,
                  seed: int, augment: Any = "basic", image_size: int | None = None
                  ) -> DrawSettings:
  """Checks the batch against the mesh and the shards; the settings of the draw."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(f"batch size {global_batch_size} must be a multiple of the "
                     f"number of devices ({devices})")
  local = global_batch_size // devices
  return DrawSettings(local, steps_per_epoch(dataset.shortest_shard, local), seed,
                      augment_policy(augment), image_size or dataset.images.shape[1])


def draw_shard_batch(dataset: DeviceDataset, step, settings: DrawSettings) -> dict:
  """Per-device code (under shard_map over the data axis): this device's rows of the
  training batch of `step`, drawn from its shard, labels gathered, images augmented
  (float32 pixels). The augmentation keys come from (seed, step, device) too."""
  batch, colour_keys = _gather_and_warp(
      dataset, step, local_batch_size=settings.local_batch_size,
      per_epoch=settings.per_epoch, seed=settings.seed, cfg=settings.augment,
      image_size=settings.image_size)
  return _coloured(batch, colour_keys, settings.augment)


def compile_draw_batch(mesh: Mesh, dataset: DeviceDataset, *, global_batch_size: int,
                       seed: int, augment: Any = "basic", image_size: int | None = None,
                       split_colour: bool | None = None) -> Callable:
  """fn(dataset, step) -> the global batch of `step`, sharded over the data axis as
  `data_parallel.device_batch` places host batches: each device draws and augments its
  own rows. One computation, or two dispatched back to back with no host round trip
  (`split_colour`; default: on a CPU mesh, where one computation recomputes the warp),
  with the same values."""
  settings = draw_settings(mesh, dataset, global_batch_size=global_batch_size,
                           seed=seed, augment=augment, image_size=image_size)
  if split_colour is None:
    split_colour = {d.platform for d in mesh.devices.flat} == {"cpu"}
  if not (split_colour and has_colour(settings.augment)):
    return jax.jit(jax.shard_map(functools.partial(draw_shard_batch, settings=settings),
                                 mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS)))
  first = jax.jit(jax.shard_map(
      functools.partial(_gather_and_warp, local_batch_size=settings.local_batch_size,
                        per_epoch=settings.per_epoch, seed=seed, cfg=settings.augment,
                        image_size=settings.image_size),
      mesh=mesh, in_specs=(P(AXIS), P()), out_specs=(P(AXIS), P(AXIS))))
  second = jax.jit(jax.shard_map(functools.partial(_coloured, cfg=settings.augment),
                                 mesh=mesh, in_specs=(P(AXIS), P(AXIS)),
                                 out_specs=P(AXIS)))
  return lambda dataset, step: second(*first(dataset, step))
