"""The data-parallel layout: a one-axis Mesh over all devices of all processes, global
batches assembled from each process's rows, and each process's share of a batch."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def device_batch(local_batch: dict, mesh: Mesh) -> dict:
  """A global batch array from each process's local part (no cross-host copies)."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Checks divisibility before anything compiles; returns this process's share."""
  devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(f"batch size {global_batch_size} must be a positive multiple of "
                     f"the number of devices ({devices})")
  return global_batch_size // jax.process_count()


