"""Per-frame predictions of a trained temporal model, in the frame model's form
(expression and AU probabilities, VA): for one video's embeddings, or for every frame
of an embedding store as an inference FrameTable, which the predict command's
thresholds, smoothing, scores and submission writers take as they are."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from affect_jax import data_parallel
from affect_jax.inference import restore
from affect_jax.inference.frame_table import LABEL_KEYS, FrameTable
from affect_jax.temporal import loop, steps, windows
from affect_jax.temporal.model import create_model
from affect_jax.temporal.embed import host_arrays
from affect_jax.temporal.store import EmbeddingStore, row_dtype
from affect_jax.train import checkpoints
from affect_jax.train.optimizers import create_learning_rate_fn


@dataclasses.dataclass
class TemporalPredictor:
  """A restored temporal model, compiled for the devices of `mesh`."""
  config: ml_collections.ConfigDict
  mesh: Any
  state: Any
  step: int
  predict_fn: Any
  eval_fn: Any
  embedding_dim: int

  @property
  def settings(self) -> windows.WindowSettings:
    return loop.window_settings(self.config, training=False)

  @property
  def local_batch_size(self) -> int:
    return restore.prediction_batch_size(self.config.input.eval_batch_size,
                                         self.mesh.devices.size) // jax.process_count()


def restore_temporal_predictor(workdir: str, embedding_dim: int, step: int | None = None,
                               config=None, devices=None) -> TemporalPredictor:
  """Checkpoint `step` (default: the best, else the latest) of the temporal run in
  `workdir` (its config.json unless `config`) on `devices` (default: all)."""
  config = restore.load_config(workdir, config)
  loop.validate_config(config)
  mesh = data_parallel.create_mesh(devices)
  manager = checkpoints.create_checkpoint_manager(
      workdir, keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric or None, asynchronous=False)
  try:
    step = checkpoints.checkpoint_step(manager, f"{workdir}/checkpoints", step)
    abstract = steps.abstract_state(config, create_model(config), embedding_dim, mesh,
                                    create_learning_rate_fn(config))
    state = checkpoints.restore_checkpoint(manager, step, abstract)
  finally:
    manager.close()
  eval_fn = steps.compile_eval_step(mesh, num_expr_classes=config.model.num_expr_classes)
  return TemporalPredictor(config, mesh, state, step, steps.compile_predict_step(mesh),
                           eval_fn, embedding_dim)


def predict_video(predictor: TemporalPredictor, embeddings: np.ndarray) -> dict:
  """[n, D] embeddings of one video's frames, in frame order -> per-frame outputs
  {`expression` [n, K], `au` [n, 12], `va` [n, 2]} of the model's tasks, each frame
  taken from the one window that scores it."""
  embeddings = np.asarray(embeddings, np.float32)
  settings = predictor.settings
  n = len(embeddings)
  rows = np.zeros(n, row_dtype(embeddings.shape[1]))  # no labels: masks 0
  rows["embedding"] = embeddings
  starts = windows.window_starts(n, settings)
  assembled = [windows.assemble_window(
      rows[max(s, 0):s + settings.length], int(s), n, settings) for s in starts]
  local = predictor.local_batch_size
  batch = local * jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  outputs: dict[str, np.ndarray] = {}
  for first in range(0, len(assembled), batch):
    chunk = assembled[first:first + batch]
    inputs = np.zeros((batch, settings.length, embeddings.shape[1]), np.float32)
    inputs[:len(chunk)] = [w["embedding"] for w in chunk]
    placed = data_parallel.device_batch({"embedding": inputs[mine]}, predictor.mesh)
    result = host_arrays(predictor.predict_fn(predictor.state, placed["embedding"]))
    for key, value in result.items():
      if key not in outputs:
        outputs[key] = np.zeros((n,) + value.shape[2:], np.float32)
      for row, window in enumerate(chunk):
        scored = window["scored"] > 0
        outputs[key][window["position"][scored]] = value[row][scored]
  return outputs


def predict_store(predictor: TemporalPredictor, store: EmbeddingStore, data=None
                  ) -> tuple[FrameTable, dict]:
  """Every frame of `store` as a FrameTable sorted by video and frame (labels when the
  store has them; image paths and record indices from `data`, the source the store
  was computed from, when given), and the exact scores of the same pass (empty without
  labels)."""
  scores, collected = loop.evaluate_windows(
      predictor.eval_fn, predictor.state, store, predictor.settings,
      predictor.local_batch_size, predictor.mesh, collect_outputs=True)
  rows = store.first_rows[collected["video"]] + collected["position"]
  if len(np.unique(rows)) != len(rows) or len(rows) != len(store):
    raise AssertionError(f"{len(rows)} scored frames for a store of {len(store)}")
  order = np.argsort(rows)
  frames = frame_columns(store)
  names = np.repeat(np.asarray(store.video_names, dtype=str), store.frame_counts)
  pick = lambda key: collected[key][order] if key in collected else None  # noqa: E731
  has_labels = store.index.get("has_labels", True)
  positions = frames["source_index"]
  return FrameTable(
      video=names, frame=frames["frame"].astype(np.int32),
      image_path=np.asarray(data.image_paths(positions) if data is not None
                            else [""] * len(store), dtype=str),
      record_index=(data.record_indices(positions) if data is not None
                    else np.full(len(store), -1, np.int32)),
      expression=pick("pred_expression"), au=pick("pred_au"), va=pick("pred_va"),
      labels={k: frames[k] for k in LABEL_KEYS} if has_labels else None,
  ), scores if has_labels else {}


def frame_columns(store: EmbeddingStore) -> dict:
  """Frame numbers and labels of every row, read video by video (embeddings are
  dropped as they come: a few hundred bytes a frame stay, not the features)."""
  columns: dict[str, list] = {}
  for video in range(len(store.video_names)):
    rows = store.video_rows(video)
    for key in ("frame", "source_index") + LABEL_KEYS:
      columns.setdefault(key, []).append(np.array(rows[key]))
  return {k: np.concatenate(v) for k, v in columns.items()}
