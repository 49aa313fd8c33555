"""Training batches for the loop, one per step: the grain pipeline's rows placed on the
mesh (HostFeed), or drawn on the devices from a split held there (DeviceFeed).

The loop asks a feed for step s's input (`next_batch`), then has the feed run the
train step on it (`train`): a DeviceFeed on an accelerator draws, augments and trains
in one program, so its "input" is only the step number.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax.numpy as jnp

from affect_jax.data import device_resident
from affect_jax.data_parallel import device_batch
from affect_jax.model import implementation
from affect_jax.train.step_functions import compile_resident_train_step

log = logging.getLogger(__name__)


class Feed:
  """What the loop asks of a feed: `next_batch(step)`, `train(train_fn, state, drawn)`,
  `close()`, and `checkpoint_iterator` (None: no data position to save)."""

  checkpoint_iterator = None

  def train(self, train_fn: Callable, state, drawn) -> tuple[Any, dict, Any]:
    """(new state, step metrics, record indices) of train_fn on next_batch's output,
    a (global batch, its record indices) pair."""
    batch, record_index = drawn
    return (*train_fn(state, batch), record_index)

  def close(self) -> None:
    pass


class HostFeed(Feed):
  """Training batches from the grain pipeline: each process's rows placed on the mesh;
  the iterator's position goes into every checkpoint."""

  def __init__(self, trainer):  # the loop's Trainer, which builds its feed
    self.checkpoint_iterator = trainer.train_iterator()
    self._mesh = trainer.mesh

  def next_batch(self, step: int) -> tuple[dict, Any]:
    """(the global batch, its record indices)."""
    del step  # the iterator knows its position
    local = next(self.checkpoint_iterator)
    return device_batch(local, self._mesh), local["record_index"]

  def close(self) -> None:
    if hasattr(self.checkpoint_iterator, "close"):
      self.checkpoint_iterator.close()


def fuse_draw_and_step(mesh) -> bool:
  """Draw + augment + train step as one program, except on XLA:CPU, which fuses the
  augmentation's bilinear gathers into their consumers and recomputes them there (see
  device_resident.compile_draw_batch)."""
  return implementation.mesh_platform(mesh) != "cpu"


class DeviceFeed(Feed):
  """`config.input.device_resident`: the split decoded once onto the devices (sharded
  over the data axis), each batch drawn and augmented there
  (affect_jax/data/device_resident.py). Batch s is a function of (seed, s) alone, so
  checkpoints carry no data position and a resumed run continues with the very batches
  it would have drawn."""

  def __init__(self, trainer):  # the loop's Trainer, which builds its feed
    config = trainer.config
    start = time.perf_counter()
    self.dataset = device_resident.load_split_to_device(
        trainer.train_source, trainer.mesh, seed=config.seed,
        image_size=config.input.image_size)
    log.info("training split on the devices: %d records, %.2f GB per device, loaded "
             "in %.1f s", self.dataset.num_records,
             self.dataset.images.nbytes / trainer.mesh.devices.size / 1e9,
             time.perf_counter() - start)
    draw_kwargs = dict(global_batch_size=config.input.batch_size, seed=config.seed,
                       augment=config.input.augment, image_size=config.input.image_size)
    self._fused = None
    if fuse_draw_and_step(trainer.mesh):
      settings = device_resident.draw_settings(trainer.mesh, self.dataset, **draw_kwargs)
      self._fused = compile_resident_train_step(
          trainer.mesh, settings, implementation.compiler_options(
              trainer.implementation), settings=trainer.settings,
          learning_rate_fn=trainer.learning_rate_fn, dtype=trainer.dtype,
          seed=config.seed)
    else:
      self._draw = device_resident.compile_draw_batch(trainer.mesh, self.dataset,
                                                      **draw_kwargs)

  def next_batch(self, step: int) -> tuple[Any, Any]:
    if self._fused is not None:  # the program draws the batch itself
      return jnp.int32(step - 1), None  # training steps count from 1
    batch = self._draw(self.dataset, step - 1)
    return batch, batch["record_index"]

  def train(self, train_fn: Callable, state, drawn) -> tuple[Any, dict, Any]:
    if self._fused is None:
      return super().train(train_fn, state, drawn)
    return self._fused(state, self.dataset, drawn[0])
