"""Face crops predicted in batches in memory, one batch on the device while the host
finds the next: crops go in with what they belong to, rows come out in the same order.

A batch is padded to the next of a few sizes (powers of two up to the batch size, each
a multiple of the device count), so that a single photo does not pay for a full batch;
once a stream has filled a batch, its last one is padded to the full size, which is
compiled already (a compilation costs seconds, a padded batch a fraction of one).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np


def padded_size(count: int, batch_size: int, num_devices: int = 1) -> int:
  """The smallest power of two >= count (and >= num_devices), rounded up to a
  multiple of num_devices, at most batch_size rounded so."""
  size = max(1, num_devices)
  while size < count:
    size *= 2
  size = -(-size // num_devices) * num_devices
  return min(size, -(-batch_size // num_devices) * num_devices)


class CropBatcher:
  """`add(key, crop)` queues a crop; full batches are dispatched at once and read back
  when the next one is dispatched (or at `finish`), so the device and the host work
  at the same time. Yields (key, outputs of that crop) in the order added."""

  def __init__(self, predict: Callable[[np.ndarray], dict], batch_size: int,
               num_devices: int = 1):
    if batch_size < 1:
      raise ValueError(f"the batch size must be 1 or more, not {batch_size}")
    self.predict = predict
    self.batch_size = -(-batch_size // num_devices) * num_devices
    self.num_devices = num_devices
    self.keys: list[Any] = []
    self.crops: list[np.ndarray] = []
    self.in_flight: tuple[list, dict] | None = None
    self.filled_a_batch = False

  def add(self, key: Any, crop: np.ndarray) -> Iterator[tuple[Any, dict]]:
    self.keys.append(key)
    self.crops.append(crop)
    if len(self.crops) >= self.batch_size:
      yield from self.dispatch()

  def finish(self) -> Iterator[tuple[Any, dict]]:
    if self.crops:
      yield from self.dispatch()
    yield from self.collect()

  def dispatch(self) -> Iterator[tuple[Any, dict]]:
    count = len(self.crops)
    self.filled_a_batch |= count >= self.batch_size
    size = (self.batch_size if self.filled_a_batch else
            padded_size(count, self.batch_size, self.num_devices))
    images = np.zeros((size, *self.crops[0].shape), np.uint8)
    images[:count] = np.stack(self.crops)
    outputs = self.predict(images)  # asynchronous: not read back yet
    keys = self.keys
    self.keys, self.crops = [], []
    yield from self.collect()
    self.in_flight = (keys, outputs)

  def collect(self) -> Iterator[tuple[Any, dict]]:
    if self.in_flight is None:
      return
    keys, outputs = self.in_flight
    self.in_flight = None
    host = {name: np.asarray(value)[:len(keys)] for name, value in outputs.items()}
    for i, key in enumerate(keys):
      yield key, {name: value[i] for name, value in host.items()}
