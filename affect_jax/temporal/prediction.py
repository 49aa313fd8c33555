"""Per-frame predictions of a trained temporal model, in the frame model's form
(expression and AU probabilities, VA): for one video's embeddings, or for every frame
of an embedding store as an inference FrameTable, which the predict command's
thresholds, smoothing, scores and submission writers take as they are."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from affect_jax import data_parallel
from affect_jax.eval.metrics import DEFAULT_AU_THRESHOLD
from affect_jax.inference import restore, sources
from affect_jax.inference.frame_table import LABEL_KEYS, FrameTable, predict_split
from affect_jax.inference.outputs import write_predictions_csv
from affect_jax.temporal import compare, embed, loop, steps, windows
from affect_jax.temporal.model import create_model
from affect_jax.temporal.embed import host_arrays
from affect_jax.temporal.store import INDEX_FILE, EmbeddingStore, row_dtype
from affect_jax.train import checkpoints
from affect_jax.train.optimizers import create_learning_rate_fn
from affect_jax.vocabulary import NUM_AUS, compared_scores


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
  local = predictor.local_batch_size
  batch = local * jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  outputs: dict[str, np.ndarray] = {}
  for first in range(0, len(starts), batch):  # a batch of windows at a time
    chunk = [windows.assemble_window(rows[max(s, 0):s + settings.length], int(s), n,
                                     settings) for s in starts[first:first + batch]]
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


def trained_frame_step(config, workdir: str) -> int | None:
  """The frame run's checkpoint step whose embeddings the temporal run trained on."""
  index = os.path.join(embed.store_folder(config, workdir, config.frame_run.train_split),
                       INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      return int(json.load(f)["frame_step"])
  return config.frame_run.step


def predict_source_frames(config, workdir: str, data, embeddings_folder: str, *,
                          step: int | None = None, devices=None, description: str = ""
                          ) -> tuple[FrameTable, dict, int]:
  """What `frame_table.predict_frames` is for the frame model: every frame of a
  prediction source (inference.sources' TfdsRecords or ImageFiles) as a FrameTable
  sorted by video and frame, here predicted by checkpoint `step` (default: the best,
  else the latest) of the temporal run in `workdir` (config: its config.json). The
  frames are embedded first into `embeddings_folder`, by the frame run's checkpoint the
  temporal run trained on. Returns (table, scores of labelled frames, step)."""
  frame_workdir = config.frame_run.workdir
  frame_config = restore.load_config(frame_workdir, data_dir=config.frame_run.data_dir)
  store = embed.write_embeddings(
      frame_config, frame_workdir, data, embeddings_folder,
      step=trained_frame_step(config, workdir), batch_size=config.embeddings.batch_size,
      devices=devices, worker_count=frame_config.input.worker_count,
      description=description)
  predictor = restore_temporal_predictor(workdir, store.embedding_dim, step, config,
                                         devices)
  table, scores = predict_store(predictor, store, data)
  return table, scores, predictor.step


def run_prediction(config, workdir: str, source: str, out_dir: str, *,
                   step: int | None = None, image_roots: Sequence[str] = (),
                   devices=None) -> dict:
  """Predicts every face frame of `source` (tfds:SPLIT, folder:PATH or list:PATH, as
  `affect-jax predict` names sources) with the temporal run; writes predictions.csv
  and summary.json (with exact scores for labelled frames) into out_dir."""
  frame_config = restore.load_config(config.frame_run.workdir,
                                     data_dir=config.frame_run.data_dir)
  opened = sources.open_source(source, frame_config, image_roots)
  table, scores, step = predict_source_frames(
      config, workdir, opened.data, os.path.join(out_dir, "embeddings"), step=step,
      devices=devices, description=source)
  summary = {"workdir": workdir, "step": step, "source": source,
             "frame_run": config.frame_run.workdir,
             "frame_step": trained_frame_step(config, workdir), "frames": len(table),
             "videos": len(set(table.video.tolist()))}
  if table.labels is not None and any(np.any(table.labels[k] > 0) for k in (
      "expression_mask", "au_mask", "va_mask")):  # a test split has no labels
    summary["scores"] = {k: v for k, v in scores.items() if isinstance(v, float)}
  if jax.process_index() != 0:
    return summary
  summary["predictions_csv"] = write_predictions_csv(
      os.path.join(out_dir, "predictions.csv"), table,
      np.full(NUM_AUS, DEFAULT_AU_THRESHOLD, np.float32))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def predict_eval_split(config, workdir: str, step: int | None = None, devices=None
                       ) -> tuple[FrameTable, EmbeddingStore]:
  """Every frame of the eval split's embedding store, predicted by checkpoint `step`
  (default: the best, else the latest) of the temporal run in `workdir`; and that
  store."""
  store = embed.split_store(config, workdir, config.frame_run.eval_split)
  predictor = restore_temporal_predictor(workdir, store.embedding_dim, step, config,
                                         devices)
  return predict_store(predictor, store)[0], store


def compare_with_frame_model(config, workdir: str, *, step: int | None = None,
                             replicates: int = 1000, devices=None) -> list[dict]:
  """What the temporal stage adds: on every frame of the eval split's videos, each
  score of the temporal model (checkpoint `step`, default the best, else the latest)
  minus the frame model it was trained on, with a paired bootstrap interval over the
  videos."""
  temporal_table, store = predict_eval_split(config, workdir, step, devices)
  frame_config = restore.load_config(config.frame_run.workdir,
                                     data_dir=config.frame_run.data_dir)
  frame_tbl = predict_split(frame_config, config.frame_run.workdir,
                            config.frame_run.eval_split, store.index["frame_step"],
                            devices)
  classes = int(config.model.num_expr_classes)
  statistics = compare.common_videos({
      "temporal": compare.per_video_statistics(temporal_table, classes),
      "frame": compare.per_video_statistics(frame_tbl, classes)})
  return [compare.paired_difference([statistics["temporal"]], [statistics["frame"]], key,
                                    replicates=replicates)
          for key in compared_scores(config.model.tasks, frame_config.model.tasks)]
