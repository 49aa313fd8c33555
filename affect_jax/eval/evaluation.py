"""One evaluation pass: a compiled eval step over an eval dataset's batches, its
per-batch sufficient statistics summed on the device into exact scores, and optionally
every frame's outputs and labels gathered for reports and predictions."""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from affect_jax.data import pipeline
from affect_jax.data_parallel import device_batch
from affect_jax.eval import accumulators, metrics

if TYPE_CHECKING:  # evaluation imports nothing from training
  from affect_jax.train.train_state import TrainState


def evaluate(eval_fn, state: TrainState, dataset, num_batches: int, mesh: Mesh, *,
             collect_outputs: bool = False, worker_count: int = 0,
             max_frames_per_fetch: int = accumulators.MAX_FRAMES_PER_DEVICE_TOTAL):
  """One pass over an eval dataset; exact scores from summed statistics, totalled on
  the device and fetched every `max_frames_per_fetch` frames and at the end.

  Returns (scores, collected) where collected holds per-frame outputs, labels and
  record indices (padding removed) when `collect_outputs`.
  """
  accumulator = accumulators.DeviceStatisticsAccumulator(max_frames_per_fetch)
  collected: dict[str, list] = {}
  iterator = pipeline.as_iterator(dataset, worker_count)
  try:
    for _, local_batch in zip(range(num_batches), iterator):
      batch = device_batch(local_batch, mesh)
      statistics, outputs = eval_fn(state, batch)
      accumulator.add(statistics, frames=batch["image"].shape[0])
      if collect_outputs:
        _collect(collected, outputs, local_batch)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  scores = metrics.compute_scores(accumulator.result())
  if collect_outputs:
    collected = {k: np.concatenate(v) for k, v in collected.items()}
    keep = collected["record_index"] >= 0
    collected = {k: v[keep] for k, v in collected.items()}
  return scores, collected


def _collect(collected: dict, outputs: dict, local_batch: dict) -> None:
  local = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)
                         if jax.process_count() > 1 else v) for k, v in outputs.items()}
  if jax.process_count() > 1:
    local_batch = {k: np.asarray(multihost_utils.process_allgather(
        v, tiled=True)) for k, v in local_batch.items() if k != "image"}
  for key, value in local.items():
    collected.setdefault(f"pred_{key}", []).append(value)
  for key, value in local_batch.items():
    if key != "image":
      collected.setdefault(key, []).append(np.asarray(value))
