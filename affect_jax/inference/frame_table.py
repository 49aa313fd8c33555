"""Per-frame predictions of a restored model as one host table, and what is computed
from it: temporal smoothing per video and exact scores on labelled frames."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from affect_jax import data_parallel, vocabulary
from affect_jax.errors import InputError
from affect_jax.data import pipeline, records
from affect_jax.eval import accumulators, metrics
from affect_jax.inference.restore import Predictor, restore_predictor
from affect_jax.inference.sources import TfdsRecords, decode_names, prediction_dataset

LABEL_KEYS = vocabulary.LABEL_KEYS


# Rows per call when statistics are computed on the host from a whole table.
STATISTICS_CHUNK = 65536


@dataclasses.dataclass
class FrameTable:
  """Per-frame model outputs of one source: row i is one face frame."""
  video: np.ndarray  # str [N]
  frame: np.ndarray  # int32 [N]
  image_path: np.ndarray  # str [N] ('' for TFDS records)
  record_index: np.ndarray  # int32 [N] (-1 for image files)
  expression: np.ndarray | None  # float32 [N, K] probabilities
  au: np.ndarray | None  # float32 [N, 12] probabilities
  va: np.ndarray | None  # float32 [N, 2]
  labels: dict | None = None  # LABEL_KEYS arrays (TFDS sources)

  def __len__(self) -> int:
    return len(self.frame)

  def take(self, rows) -> "FrameTable":
    pick = lambda a: None if a is None else a[rows]  # noqa: E731
    return FrameTable(self.video[rows], self.frame[rows], self.image_path[rows],
                      self.record_index[rows], pick(self.expression), pick(self.au),
                      pick(self.va), None if self.labels is None else
                      {k: v[rows] for k, v in self.labels.items()})

  def sorted_by_video_and_frame(self) -> "FrameTable":
    return self.take(np.lexsort((self.frame, self.video)))


def _gathered(tree):
  """Host NumPy copies; all processes' rows in a multi-process run."""
  if jax.process_count() > 1:
    return jax.tree.map(lambda v: np.asarray(
        multihost_utils.process_allgather(v, tiled=True)), tree)
  return jax.tree.map(np.asarray, tree)


def predict_frames(predictor: Predictor, data, worker_count: int = 0) -> FrameTable:
  """One ordered pass over a source; padding rows removed."""
  ds = prediction_dataset(data, predictor.local_batch_size, jax.process_index(),
                          jax.process_count())
  chunks: dict[str, list] = {}
  iterator = pipeline.as_iterator(ds, worker_count)
  try:
    for local_batch in iterator:
      images = data_parallel.device_batch({"image": local_batch.pop("image")},
                                  predictor.mesh)["image"]
      outputs = predictor.predict_fn(predictor.state, images)
      host = _gathered({"outputs": outputs, "batch": local_batch})
      keep = host["batch"]["position"] >= 0  # padding rows go at once
      # Labels and outputs share names ("expression", "au"): outputs get a prefix.
      for key, value in host["outputs"].items():
        chunks.setdefault(f"pred_{key}", []).append(value[keep])
      for key, value in host["batch"].items():
        if key == "video":  # 128 bytes a row in the pipeline, a short str here
          value = np.asarray(decode_names(value), dtype=str)
        chunks.setdefault(key, []).append(value[keep])
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  columns = {k: np.concatenate(v) for k, v in chunks.items()}
  positions = columns["position"]
  labels = {k: columns[k] for k in LABEL_KEYS} if data.has_labels else None
  return FrameTable(
      video=columns["video"].astype(str),
      frame=columns["frame"].astype(np.int32),
      image_path=np.asarray(data.image_paths(positions), dtype=str),
      record_index=data.record_indices(positions),
      expression=columns.get("pred_expression"), au=columns.get("pred_au"),
      va=columns.get("pred_va"),
      labels=labels)


def predict_split(config, workdir: str, split: str, step: int | None = None,
                  devices=None) -> FrameTable:
  """Every frame of the TFDS split `split` of config.dataset, predicted by checkpoint
  `step` (default: the best, else the latest) of the frame run in `workdir`."""
  predictor = restore_predictor(config, workdir, step, devices)
  raw = records.open_data_source(config.dataset.name, split, config.dataset.data_dir)
  data = TfdsRecords(raw, config.input.image_size, split)
  return predict_frames(predictor, data, config.input.worker_count)


def check_window(window: int) -> None:
  if window < 1 or window % 2 == 0:
    raise InputError(f"--smooth_window: the smoothing window must be a positive odd "
                     f"number of frames, got {window}")


def centred_moving_average(values: np.ndarray, video, frame, window: int) -> np.ndarray:
  """Mean of each row over the rows of the same video whose frame lies within
  window // 2 frames of its own (a centred window in time: a gap of frames without a
  face shrinks it, the ends of a video truncate it). Rows keep their order and count;
  a window of 1 returns the values unchanged."""
  check_window(window)
  values = np.asarray(values)
  flat = values.reshape(len(values), -1)
  video = np.asarray(video)
  frame = np.asarray(frame, np.int64)
  order = np.lexsort((frame, video))
  v, f = video[order], frame[order]
  x = flat[order].astype(np.float64)
  total, count = x.copy(), np.ones(len(x))
  half = window // 2
  # Frames are distinct within a video, so neighbours within `half` frames are at most
  # `half` rows away in sorted order.
  for offset in range(1, min(half, len(x) - 1) + 1):
    near = (v[:-offset] == v[offset:]) & (f[offset:] - f[:-offset] <= half)
    total[:-offset] += np.where(near[:, None], x[offset:], 0.0)
    count[:-offset] += near
    total[offset:] += np.where(near[:, None], x[:-offset], 0.0)
    count[offset:] += near
  smoothed = np.empty_like(flat)
  smoothed[order] = (total / count[:, None]).astype(flat.dtype)
  return smoothed.reshape(values.shape)


def smooth_table(table: FrameTable, window: int, smooth_au: bool = False) -> FrameTable:
  """Expression probabilities and VA (and AU probabilities when asked) averaged over
  a centred window per video."""
  smooth = lambda a: None if a is None else centred_moving_average(  # noqa: E731
      a, table.video, table.frame, window)
  return dataclasses.replace(table, expression=smooth(table.expression),
                             va=smooth(table.va),
                             au=smooth(table.au) if smooth_au else table.au)


def logits_from_probabilities(table: FrameTable, rows) -> dict:
  """What metrics.batch_statistics takes: log-probabilities keep the argmax, and
  logit(p) gives back p under its sigmoid."""
  outputs = {}
  with np.errstate(divide="ignore"):
    if table.expression is not None:
      outputs["expression"] = np.log(table.expression[rows])
    if table.au is not None:
      p = table.au[rows].astype(np.float64)
      outputs["au"] = (np.log(p) - np.log1p(-p)).astype(np.float32)
  if table.va is not None:
    outputs["va"] = table.va[rows]
  return outputs


def table_statistics(table: FrameTable, num_expr_classes: int,
                     au_thresholds=None) -> dict:
  """Sufficient statistics of a labelled table, in chunks (bounded device memory)."""
  if table.labels is None:
    raise ValueError("scores need labels: predict a TFDS split")
  accumulator = accumulators.StatisticsAccumulator()
  for start in range(0, len(table), STATISTICS_CHUNK):
    rows = slice(start, start + STATISTICS_CHUNK)
    accumulator.add(metrics.batch_statistics(
        logits_from_probabilities(table, rows),
        {k: v[rows] for k, v in table.labels.items()},
        num_expr_classes=num_expr_classes,
        au_thresholds=None if au_thresholds is None else
        jnp.asarray(au_thresholds, jnp.float32)))
  return accumulator.result()


def table_scores(table: FrameTable, num_expr_classes: int, au_thresholds=None) -> dict:
  return metrics.compute_scores(table_statistics(table, num_expr_classes,
                                                 au_thresholds))


