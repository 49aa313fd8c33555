"""Training batches for the loop, one per step: the grain pipeline's rows placed on the
mesh (HostFeed), or drawn on the devices from a split held there (DeviceFeed)."""
from __future__ import annotations

import logging
import time
from typing import Any

from affect_jax.data import device_resident
from affect_jax.data_parallel import device_batch



log = logging.getLogger(__name__)


class HostFeed:
  """Training batches from the grain pipeline: each process's rows placed on the mesh;
  the iterator's position goes into every checkpoint."""

  def __init__(self, trainer):  # the loop's Trainer, which builds its feed
    self.checkpoint_iterator = trainer.train_iterator()
    self._mesh = trainer.mesh

  def next_batch(self, step: int) -> tuple[dict, Any]:
    del step  # the iterator knows its position
    local = next(self.checkpoint_iterator)
    return device_batch(local, self._mesh), local["record_index"]

  def close(self) -> None:
    if hasattr(self.checkpoint_iterator, "close"):
      self.checkpoint_iterator.close()


class DeviceFeed:
  """`config.input.device_resident`: the split decoded once onto the devices, each
  batch drawn and augmented there (affect_jax/data/device_resident.py). Batch s is a
  function of (seed, s) alone, so checkpoints carry no data position and a resumed run
  continues with the very batches it would have drawn."""

  checkpoint_iterator = None

  def __init__(self, trainer):  # the loop's Trainer, which builds its feed
    config = trainer.config
    start = time.perf_counter()
    self.dataset = device_resident.load_split_to_device(
        trainer.train_source, trainer.mesh, image_size=config.input.image_size)
    log.info("training split on the devices: %d records, %.2f GB, loaded in %.1f s",
             self.dataset.num_records, self.dataset.images.nbytes / 1e9,
             time.perf_counter() - start)
    self._draw = device_resident.compile_draw_batch(
        trainer.mesh, global_batch_size=config.input.batch_size, seed=config.seed,
        augment=config.input.augment, image_size=config.input.image_size)

  def next_batch(self, step: int) -> tuple[dict, Any]:
    batch = self._draw(self.dataset, step - 1)  # training steps count from 1
    return batch, batch["record_index"]

  def close(self) -> None:
    pass


