"""Per-frame predictions from a run's checkpoint, and the ABAW deliverables.

  # predict a TFDS split, a cropped_aligned-style folder, or an ABAW test list
  python -m affect_jax.predict --workdir runs/mtl --source tfds:validation --out OUT
  python -m affect_jax.predict --workdir runs/mtl --source folder:/data/cropped_aligned \
      --out OUT
  python -m affect_jax.predict --workdir runs/mtl --source list:/data/test_set.txt \
      --image_root /data/cropped_aligned --image_root /data/cropped_aligned_new_50_vids \
      --formats mtl,image_location,per_video --out OUT
  # tune per-AU thresholds on validation (writes runs/mtl/au_thresholds.json, which
  # later predictions use) and measure temporal smoothing windows
  python -m affect_jax.predict --workdir runs/mtl --mode tune --smooth_windows 1,5,9,15

The config is the run's own `<workdir>/config.json` unless `--config FILE` is given
(then `--config.x=...` overrides work as in affect_jax.main). The checkpoint is the best
one (else the latest) unless `--step`; it is restored onto the devices present now,
whatever number of devices wrote it.

Outputs under --out: `predictions.csv` (one row per face frame, sorted by video and
frame), `summary.json` (step, thresholds, smoothing, counts, and, for a labelled TFDS
split, the scores before/after thresholds and smoothing) and `submission/<format>/`.
Predictions are held in host memory (smoothing needs each video's frames together, and
TFDS stores records shuffled): about 300 bytes a frame with labels or image paths,
300 MB for a million frames.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts: glibc reads malloc settings at start-up
  from affect_jax import host_memory
  host_memory.reexec_with_heap_reuse()

import csv
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from affect_jax import checkpoints, input_pipeline, metrics, submission, train
from tfds_affwild2 import annotations, release

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "au_thresholds.json"
NAME_BYTES = 128  # video names travel through the pipeline as fixed-width uint8
LABEL_KEYS = input_pipeline.LABEL_KEYS
# Rows per call when statistics are computed on the host from a whole table.
STATISTICS_CHUNK = 65536


# ----------------------------------------------------------------------------------
# Restoring a model.
# ----------------------------------------------------------------------------------


def load_config(workdir: str, config: ml_collections.ConfigDict | None = None,
                data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The given config, else the run's own `config.json`; `data_dir` replaces
  config.dataset.data_dir."""
  if config is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: pass --config (the file the run "
                              "was trained with)")
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  if data_dir is not None:
    config = ml_collections.ConfigDict(config.to_dict())  # unlock a locked config
    config.dataset.data_dir = data_dir
  return config


def predict_step(state, images, *, dtype):
  """Per-device forward pass: expression and AU probabilities, VA (float32)."""
  outputs = state.apply_fn({"params": state.params["model"],
                            "batch_stats": state.batch_stats},
                           input_pipeline.normalize_images(images, dtype), train=False)
  result = {}
  if "expression" in outputs:
    result["expression"] = jax.nn.softmax(outputs["expression"].astype(jnp.float32), -1)
  if "au" in outputs:
    result["au"] = jax.nn.sigmoid(outputs["au"].astype(jnp.float32))
  if "va" in outputs:
    result["va"] = outputs["va"].astype(jnp.float32)
  return result


@dataclasses.dataclass
class Predictor:
  """A restored model, compiled for the devices of `mesh`."""
  config: ml_collections.ConfigDict
  mesh: Any
  state: Any
  step: int
  predict_fn: Any
  local_batch_size: int

  @property
  def num_expr_classes(self) -> int:
    return int(self.config.model.num_expr_classes)


def prediction_batch_size(requested: int, num_devices: int) -> int:
  """The requested global batch, rounded up to a multiple of the device count (a
  checkpoint written on 8 devices may be used on 3)."""
  return -(-max(requested, 1) // num_devices) * num_devices


def restore_predictor(config, workdir: str, step: int | None = None, devices=None,
                      batch_size: int | None = None) -> Predictor:
  """The given step's state, else the best checkpoint's, else the latest's."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"no checkpoint folder {folder}")
  mesh = train.create_mesh(devices)
  model = train.create_model(config.model)
  abstract = train.abstract_train_state(config, model, mesh,
                                        train.create_learning_rate_fn(config))
  manager = checkpoints.create_checkpoint_manager(
      workdir, keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric or None, asynchronous=False)
  try:
    step = step or manager.best_step() or manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {folder}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {folder} (steps: "
                              f"{sorted(manager.all_steps())})")
    state = checkpoints.restore_checkpoint(manager, step, abstract)
  finally:
    manager.close()
  global_batch = prediction_batch_size(batch_size or config.input.eval_batch_size,
                                       mesh.devices.size)
  step_fn = functools.partial(predict_step, dtype=train.DTYPES[config.model.dtype])
  predict_fn = jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(train.AXIS)),
                                     out_specs=P(train.AXIS)))
  return Predictor(config, mesh, state, int(step), predict_fn,
                   global_batch // jax.process_count())


# ----------------------------------------------------------------------------------
# Sources: TFDS records, or face image files.
# ----------------------------------------------------------------------------------


def encode_name(name: str) -> np.ndarray:
  data = name.encode()
  if len(data) > NAME_BYTES:
    raise ValueError(f"video name longer than {NAME_BYTES} bytes: {name!r}")
  return np.frombuffer(data.ljust(NAME_BYTES, b"\0"), np.uint8)


def decode_names(rows: np.ndarray) -> list[str]:
  return [bytes(row).rstrip(b"\0").decode() for row in np.asarray(rows, np.uint8)]


class TfdsRecords:
  """A split of the TFDS dataset: images and labels by record index."""

  has_labels = True

  def __init__(self, data_source, image_size: int, description: str):
    self._source = data_source
    self._image_size = image_size
    self.description = description

  def __len__(self) -> int:
    return len(self._source)

  def example(self, position: int) -> dict:
    record = self._source[position]
    # The eval pipeline's own loader: the same pixels as Trainer.evaluate sees.
    example = input_pipeline.load_example(record, position,
                                          input_pipeline.AugmentConfig(), None,
                                          self._image_size)
    video = record["video"]
    example.update(position=np.int32(position), frame=np.int32(record["frame"]),
                   video=encode_name(video.decode() if isinstance(video, bytes)
                                     else str(video)))
    return example

  def padding(self) -> dict:
    example = input_pipeline.empty_example(self._image_size)
    example.update(position=np.int32(-1), frame=np.int32(-1),
                   video=np.zeros(NAME_BYTES, np.uint8))
    return example

  def image_paths(self, positions: np.ndarray) -> list[str]:
    return [""] * len(positions)

  def record_indices(self, positions: np.ndarray) -> np.ndarray:
    return np.asarray(positions, np.int32)


@dataclasses.dataclass(frozen=True)
class ImageItem:
  video: str
  frame: int
  path: str
  origin: str = ""  # where it was listed (file:line), for messages


class ImageFiles:
  """Face images on disk (cropped_aligned layout), one item per frame."""

  has_labels = False

  def __init__(self, items: Sequence[ImageItem], image_size: int, description: str):
    if not items:
      raise FileNotFoundError(f"{description}: no face image to predict")
    self.items = list(items)
    self._image_size = image_size
    self.description = description

  def __len__(self) -> int:
    return len(self.items)

  def example(self, position: int) -> dict:
    item = self.items[position]
    return {"image": load_face_image(item, self._image_size),
            "position": np.int32(position), "frame": np.int32(item.frame),
            "video": encode_name(item.video)}

  def padding(self) -> dict:
    return {"image": np.zeros((self._image_size, self._image_size, 3), np.uint8),
            "position": np.int32(-1), "frame": np.int32(-1),
            "video": np.zeros(NAME_BYTES, np.uint8)}

  def image_paths(self, positions: np.ndarray) -> list[str]:
    return [self.items[p].path for p in positions]

  def record_indices(self, positions: np.ndarray) -> np.ndarray:
    return np.full(len(positions), -1, np.int32)


def load_face_image(item: ImageItem, image_size: int) -> np.ndarray:
  """uint8 [size, size, 3], resized as the eval pipeline resizes; a file that does not
  decode is an error naming it (and the list line that named it)."""
  try:
    with open(item.path, "rb") as f:
      image = input_pipeline.decode_jpeg(f.read())
  except (OSError, ValueError) as error:
    where = f" (listed at {item.origin})" if item.origin else ""
    raise ValueError(f"{item.path}{where}: cannot read the image: {error}") from None
  return input_pipeline.augment_image(image, None, input_pipeline.AugmentConfig(),
                                      image_size)


def folder_items(path: str) -> list[ImageItem]:
  """`PATH/<video>/<frame>.jpg` (or `PATH/<frame>.jpg`: one video named after PATH)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"image folder {path} does not exist")
  has_own_frames = any(_frame_of(name) is not None for name in os.listdir(path))
  if has_own_frames:
    videos = {os.path.basename(os.path.normpath(path)): path}
  else:
    videos = {e.name: e.path for e in os.scandir(path) if e.is_dir()}
  items = []
  for video, folder in sorted(videos.items()):
    for name in os.listdir(folder):
      frame = _frame_of(name)
      if frame is not None:
        items.append(ImageItem(video, frame, os.path.join(folder, name)))
  if not items:
    raise FileNotFoundError(f"{path}: no '<video>/<frame number>.jpg' image found")
  return sorted(items, key=lambda item: (item.video, item.frame))


def _frame_of(name: str) -> int | None:
  stem, ext = os.path.splitext(name)
  return int(stem) if ext.lower() in (".jpg", ".jpeg") and stem.isdigit() else None


def list_items(entries: Sequence[submission.TestEntry], image_roots: Sequence[str],
               list_path: str) -> tuple[list[ImageItem], dict[str, list[int]]]:
  """Face images of a test list's entries (each once) and the face frames of each
  listed video. Listed images without a file are left out (their submission lines
  are filled from neighbouring frames); a listed video without a folder is an error."""
  if not image_roots:
    raise ValueError("--source list:... needs --image_root (the cropped_aligned "
                     "folders the list's images are in)")
  index = release.ImageIndex(list(image_roots))
  items, seen = [], set()
  face_frames: dict[str, list[int]] = {}
  for entry in entries:
    if not index.has_video(entry.video):
      raise annotations.AnnotationError(
          list_path, entry.line_number, f"video {entry.video!r} has no folder in "
          f"{', '.join(image_roots)}")
    frames = index.frames(entry.video)
    face_frames[entry.video] = sorted(frames)
    wanted = [entry.frame] if entry.frame is not None else sorted(frames)
    for frame in wanted:
      if frame in frames and (entry.video, frame) not in seen:
        seen.add((entry.video, frame))
        items.append(ImageItem(entry.video, frame, frames[frame],
                               f"{list_path}:{entry.line_number}"))
  return items, face_frames


@dataclasses.dataclass
class OpenedSource:
  data: Any  # TfdsRecords or ImageFiles
  entries: list | None = None  # test list entries (list sources)
  face_frames: dict | None = None  # listed video -> frames with a face image


def open_source(spec: str, config, image_roots: Sequence[str] = ()) -> OpenedSource:
  """`tfds:SPLIT`, `folder:PATH` or `list:PATH` (see the module docstring)."""
  kind, _, value = spec.partition(":")
  size = config.input.image_size
  if kind == "tfds" and value:
    data = input_pipeline.open_data_source(config.dataset.name, value,
                                           config.dataset.data_dir)
    return OpenedSource(TfdsRecords(data, size, f"{config.dataset.name} {value}"))
  if kind == "folder" and value:
    return OpenedSource(ImageFiles(folder_items(value), size, value))
  if kind == "list" and value:
    entries = submission.read_test_list(value)
    items, face_frames = list_items(entries, image_roots, value)
    return OpenedSource(ImageFiles(items, size, value), entries, face_frames)
  raise ValueError(f"--source {spec!r}: expected tfds:SPLIT, folder:PATH or list:PATH")


class LoadPosition(grain.transforms.Map):
  """position -> example; -1 -> a padding example (dropped from the results)."""

  def __init__(self, data):
    self._data = data

  def map(self, position):
    return self._data.padding() if position < 0 else self._data.example(position)


def prediction_dataset(data, local_batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  """This process's strided share of the positions, padded to the same number of
  whole batches on every process."""
  positions = list(range(process_index, len(data), process_count))
  batches = input_pipeline.eval_num_batches(len(data), local_batch_size, process_count)
  positions += [-1] * (batches * local_batch_size - len(positions))
  return grain.MapDataset.source(positions).map(LoadPosition(data)).batch(
      local_batch_size, drop_remainder=True)


# ----------------------------------------------------------------------------------
# Per-frame predictions.
# ----------------------------------------------------------------------------------


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
  iterator = input_pipeline.as_iterator(ds, worker_count)
  try:
    for local_batch in iterator:
      images = train.device_batch({"image": local_batch.pop("image")},
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


# ----------------------------------------------------------------------------------
# Temporal smoothing.
# ----------------------------------------------------------------------------------


def check_window(window: int) -> None:
  if window < 1 or window % 2 == 0:
    raise ValueError(f"the smoothing window must be a positive odd number of frames, "
                     f"got {window}")


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


# ----------------------------------------------------------------------------------
# Scores and AU thresholds.
# ----------------------------------------------------------------------------------


def _logits_from_probabilities(table: FrameTable, rows) -> dict:
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
  accumulator = metrics.StatisticsAccumulator()
  for start in range(0, len(table), STATISTICS_CHUNK):
    rows = slice(start, start + STATISTICS_CHUNK)
    accumulator.add(metrics.batch_statistics(
        _logits_from_probabilities(table, rows),
        {k: v[rows] for k, v in table.labels.items()},
        num_expr_classes=num_expr_classes,
        au_thresholds=None if au_thresholds is None else
        jnp.asarray(au_thresholds, jnp.float32)))
  return accumulator.result()


def table_scores(table: FrameTable, num_expr_classes: int, au_thresholds=None) -> dict:
  return metrics.compute_scores(table_statistics(table, num_expr_classes,
                                                 au_thresholds))


def tune_au_thresholds(table: FrameTable, num_expr_classes: int) -> dict:
  """Per-AU thresholds maximising each AU's F1 on this table, all found in one pass
  over its score histograms; with the F1 at 0.5 and at the tuned thresholds."""
  before = table_scores(table, num_expr_classes)
  thresholds = [float(t) for t in before["au_best_thresholds"]]
  after = table_scores(table, num_expr_classes, thresholds)
  return {"thresholds": thresholds, "au_names": list(annotations.AU_NAMES),
          "histogram_bins": metrics.DEFAULT_HISTOGRAM_BINS,
          "au_f1_default": before["au_f1"], "au_f1_tuned": after["au_f1"],
          "au_f1_per_au_default": before["au_f1_per_au"],
          "au_f1_per_au_tuned": after["au_f1_per_au"],
          "au_f1_tuned_held_out": held_out_au_f1(table, num_expr_classes)}


def held_out_au_f1(table: FrameTable, num_expr_classes: int) -> float | None:
  """AU F1 of tuned thresholds on frames they were not tuned on: videos split in two
  folds, each fold decided with the thresholds tuned on the other, statistics of both
  summed. Tuning and scoring on the same frames flatters the thresholds; this does
  not. None with fewer than two videos."""
  videos = np.unique(table.video)
  if len(videos) < 2:
    return None
  in_first = np.isin(table.video, videos[::2])
  accumulator = metrics.StatisticsAccumulator()
  for held_out in (in_first, ~in_first):
    tuned_on = table.take(np.flatnonzero(~held_out))
    thresholds = table_scores(tuned_on, num_expr_classes)["au_best_thresholds"]
    accumulator.add(table_statistics(table.take(np.flatnonzero(held_out)),
                                     num_expr_classes, thresholds))
  return metrics.compute_scores(accumulator.result())["au_f1"]


def save_au_thresholds(workdir: str, tuned: dict, *, step: int, split: str,
                       au_smoothing_window: int) -> str:
  path = os.path.join(workdir, THRESHOLDS_FILE)
  record = {"step": step, "split": split, "au_smoothing_window": au_smoothing_window,
            **tuned}
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  return path


def au_thresholds_for(workdir: str, step: int, au_smoothing_window: int,
                      use_tuned: bool = True) -> tuple[np.ndarray, str]:
  """The thresholds to decide AUs with, and where they come from: the tuned ones when
  they were tuned for this checkpoint and this AU smoothing, else 0.5."""
  default = np.full(len(annotations.AU_NAMES), metrics.DEFAULT_AU_THRESHOLD, np.float32)
  path = os.path.join(workdir, THRESHOLDS_FILE)
  if not use_tuned:
    return default, "default 0.5 (tuned thresholds disabled)"
  if not os.path.exists(path):
    return default, f"default 0.5 ({path} does not exist: --mode tune writes it)"
  with open(path) as f:
    saved = json.load(f)
  if saved["step"] != step or saved.get("au_smoothing_window", 1) != au_smoothing_window:
    log.warning("%s was tuned for step %s with AU smoothing window %s, not step %d "
                "with window %d: using 0.5; run --mode tune again", path, saved["step"],
                saved.get("au_smoothing_window", 1), step, au_smoothing_window)
    return default, f"default 0.5 ({path} is for another step or AU smoothing)"
  return np.asarray(saved["thresholds"], np.float32), path


# ----------------------------------------------------------------------------------
# Outputs: CSV and submissions.
# ----------------------------------------------------------------------------------


def expression_names(num_classes: int) -> tuple[str, ...]:
  return annotations.EXPRESSION_NAMES_8[:num_classes]


def au_decisions(au_probabilities: np.ndarray, thresholds) -> np.ndarray:
  """0/1 per AU: present when the probability is >= its threshold (metrics' rule)."""
  return (au_probabilities >= np.asarray(thresholds, np.float32)).astype(np.int8)


def csv_header(table: FrameTable) -> list[str]:
  header = ["video", "frame", "image_path", "record_index"]
  if table.expression is not None:
    header += [f"p_{n}" for n in expression_names(table.expression.shape[1])]
    header.append("expression")
  if table.au is not None:
    header += [f"p_{n}" for n in annotations.AU_NAMES] + list(annotations.AU_NAMES)
  if table.va is not None:
    header += ["valence", "arousal"]
  return header


def write_predictions_csv(path: str, table: FrameTable, thresholds) -> str:
  """One row per frame: probabilities, the decisions made from them, VA."""
  expression = None if table.expression is None else table.expression.argmax(1)
  aus = None if table.au is None else au_decisions(table.au, thresholds)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(csv_header(table))
    for i in range(len(table)):
      row = [table.video[i], int(table.frame[i]), table.image_path[i],
             int(table.record_index[i])]
      if expression is not None:
        row += [f"{p:.6f}" for p in table.expression[i]] + [int(expression[i])]
      if aus is not None:
        row += [f"{p:.6f}" for p in table.au[i]] + aus[i].tolist()
      if table.va is not None:
        row += [f"{x:.6f}" for x in table.va[i]]
      writer.writerow(row)
  return path


def submission_predictions(table: FrameTable, thresholds
                           ) -> dict[str, submission.VideoPredictions]:
  """Decisions per video: the argmax class, thresholded AUs, VA clipped to [-1, 1]."""
  return submission.group_by_video(
      table.video, table.frame,
      va=None if table.va is None else np.clip(table.va, -1.0, 1.0),
      expression=None if table.expression is None else table.expression.argmax(1),
      aus=None if table.au is None else au_decisions(table.au, thresholds))


def write_submissions(out_dir: str, formats: Sequence[str], table: FrameTable,
                      thresholds, opened: OpenedSource, num_expr_classes: int,
                      frame_counts: dict | None = None) -> dict[str, list[str]]:
  """Each requested format under `out_dir/<format>/`; for a test list, exactly the
  listed images / videos, else every video of the table."""
  predictions = submission_predictions(table, thresholds)
  if opened.entries is not None:
    entries, face_frames = opened.entries, opened.face_frames
  else:
    entries = [submission.TestEntry(0, video) for video in sorted(predictions)]
    face_frames = {v: p.frames.tolist() for v, p in predictions.items()}
  written = {}
  for fmt in formats:
    folder = os.path.join(out_dir, fmt)
    if fmt == "per_video":
      written[fmt] = submission.write_per_video_files(
          folder, predictions, submission.video_lengths(entries, face_frames,
                                                        frame_counts),
          num_expr_classes=num_expr_classes)
    elif fmt == "mtl":
      written[fmt] = [submission.write_mtl_file(
          folder, predictions, submission.listed_images(entries, face_frames))]
    elif fmt == "image_location":
      written[fmt] = submission.write_image_location_files(
          folder, predictions, submission.listed_images(entries, face_frames),
          num_expr_classes=num_expr_classes)
    else:
      raise ValueError(f"unknown submission format {fmt!r}; expected one of "
                       f"{submission.FORMATS}")
  return written


def labelled_scores(table: FrameTable, smoothed: FrameTable, num_expr_classes: int,
                    thresholds) -> dict:
  """Scores before and after the AU thresholds and the smoothing, for the summary."""
  pick = lambda s: {k: v for k, v in s.items() if isinstance(v, float)}  # noqa: E731
  return {"raw": pick(table_scores(table, num_expr_classes)),
          "thresholds": pick(table_scores(table, num_expr_classes, thresholds)),
          "thresholds_and_smoothing": pick(table_scores(smoothed, num_expr_classes,
                                                        thresholds))}


# ----------------------------------------------------------------------------------
# The two modes.
# ----------------------------------------------------------------------------------


def run_prediction(config, workdir: str, source: str, out_dir: str, *,
                   step: int | None = None, image_roots: Sequence[str] = (),
                   use_tuned_thresholds: bool = True, smooth_window: int = 1,
                   smooth_au: bool = False, formats: Sequence[str] = (),
                   frame_counts: dict | None = None, devices=None,
                   batch_size: int | None = None, plot_video_count: int = 4) -> dict:
  """Predicts every face frame of `source`, writes the CSV, the submissions, plots of
  the first `plot_video_count` videos and summary.json into out_dir; returns the
  summary."""
  check_window(smooth_window)  # before minutes of prediction, not after
  unknown = [f for f in formats if f not in submission.FORMATS]
  if unknown:
    raise ValueError(f"unknown submission formats {unknown}; expected some of "
                     f"{submission.FORMATS}")
  if "mtl" in formats and set(config.model.tasks) != {"expression", "au", "va"}:
    raise ValueError(f"the mtl submission needs all three tasks; the model has "
                     f"{', '.join(config.model.tasks)}")
  opened = open_source(source, config, image_roots)
  predictor = restore_predictor(config, workdir, step, devices, batch_size)
  table = predict_frames(predictor, opened.data,
                         config.input.worker_count).sorted_by_video_and_frame()
  au_window = smooth_window if smooth_au else 1
  thresholds, threshold_origin = au_thresholds_for(workdir, predictor.step, au_window,
                                                   use_tuned_thresholds)
  smoothed = smooth_table(table, smooth_window, smooth_au)
  summary = {"workdir": workdir, "step": predictor.step, "source": source,
             "frames": len(table), "videos": len(set(table.video.tolist())),
             "smooth_window": smooth_window, "smooth_au": smooth_au,
             "au_thresholds": thresholds.tolist(), "au_thresholds_from": threshold_origin}
  if jax.process_index() != 0:
    return summary
  os.makedirs(out_dir, exist_ok=True)
  summary["predictions_csv"] = write_predictions_csv(
      os.path.join(out_dir, "predictions.csv"), smoothed, thresholds)
  if opened.data.has_labels and any(np.any(table.labels[k] > 0) for k in (
      "expression_mask", "au_mask", "va_mask")):  # a test split has records, no labels
    summary["scores"] = labelled_scores(table, smoothed, predictor.num_expr_classes,
                                        thresholds)
  summary["plots"] = plot_videos(out_dir, smoothed, plot_video_count)
  if formats:
    summary["submission"] = write_submissions(
        os.path.join(out_dir, "submission"), formats, smoothed, thresholds, opened,
        predictor.num_expr_classes, frame_counts)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def plot_videos(out_dir: str, table: FrameTable, count: int) -> list[str]:
  """VA over time, expression timeline and AU heat map of the first `count` videos."""
  from affect_jax import faces  # pylint: disable=g-import-not-at-top
  paths = []
  for video in sorted(set(table.video.tolist()))[:count]:
    rows = np.flatnonzero(table.video == video)
    num_frames = int(table.frame[rows].max())
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in video)
    paths.append(faces.plot_affect(os.path.join(out_dir, f"video_{safe_name}.png"),
                                   video, table, rows, num_frames))
  return paths


def run_tuning(config, workdir: str, *, split: str | None = None,
               step: int | None = None, smooth_windows: Sequence[int] = (1,),
               smooth_au: bool = False, au_smoothing_window: int = 1, devices=None,
               batch_size: int | None = None) -> dict:
  """On a labelled split (default: the config's eval split): tunes the AU thresholds
  (saved as <workdir>/au_thresholds.json; on AU probabilities smoothed over
  `au_smoothing_window`) and scores each smoothing window with them (AU probabilities
  smoothed too when `smooth_au`)."""
  check_window(au_smoothing_window)
  for window in smooth_windows:
    check_window(window)
  split = split or config.dataset.eval_split
  predictor = restore_predictor(config, workdir, step, devices, batch_size)
  opened = open_source(f"tfds:{split}", config)
  table = predict_frames(predictor, opened.data, config.input.worker_count)
  k = predictor.num_expr_classes
  tuned = tune_au_thresholds(smooth_table(table, au_smoothing_window, smooth_au=True), k)
  report = {"step": predictor.step, "split": split, "au_thresholds": tuned,
            "smoothing": {}}
  for window in smooth_windows:
    smoothed = smooth_table(table, window, smooth_au)
    scores = table_scores(smoothed, k, tuned["thresholds"])
    report["smoothing"][str(window)] = {
        key: scores[key] for key in ("ccc_valence", "ccc_arousal", "p_va", "expr_f1",
                                     "au_f1", "p_mtl") if key in scores}
  if jax.process_index() == 0:
    report["au_thresholds_file"] = save_au_thresholds(
        workdir, tuned, step=predictor.step, split=split,
        au_smoothing_window=au_smoothing_window)
    with open(os.path.join(workdir, "tuning.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report


def format_tuning_report(report: dict) -> str:
  tuned = report["au_thresholds"]
  lines = [f"step {report['step']} on {report['split']}: AU F1 "
           f"{tuned['au_f1_default']:.4f}"
           f" at 0.5 -> {tuned['au_f1_tuned']:.4f} with thresholds tuned on it"
           + ("" if tuned["au_f1_tuned_held_out"] is None else
              f" ({tuned['au_f1_tuned_held_out']:.4f} tuned on the other half of the "
              "videos)"),
           f"{'window':>6} {'CCC-V':>7} {'CCC-A':>7} {'P_VA':>7} {'EXPR F1':>8} "
           f"{'AU F1':>7} {'P_MTL':>7}"]
  for window, s in report["smoothing"].items():
    lines.append(f"{window:>6} " + " ".join(
        f"{s.get(key, float('nan')):>{w}.4f}" for key, w in (
            ("ccc_valence", 7), ("ccc_arousal", 7), ("p_va", 7), ("expr_f1", 8),
            ("au_f1", 7), ("p_mtl", 7))))
  return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The training run's folder.")
  flags.DEFINE_enum("mode", "predict", ["predict", "tune"], "predict: per-frame "
                    "predictions of --source; tune: AU thresholds and smoothing on a "
                    "labelled split.")
  flags.DEFINE_string("source", None, "tfds:SPLIT, folder:PATH or list:PATH.")
  flags.DEFINE_string("out", None, "Output folder (predict).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best, else latest).")
  flags.DEFINE_multi_string("image_root", [], "With list:PATH: a cropped_aligned "
                            "folder (repeat for several).")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the config's).")
  flags.DEFINE_bool("tuned_au_thresholds", True, "Use <workdir>/au_thresholds.json "
                    "when it was tuned for this checkpoint.")
  flags.DEFINE_integer("smooth_window", 1, "Centred moving average over this many "
                       "frames per video (odd; 1: none).")
  flags.DEFINE_bool("smooth_au", False, "Smooth AU probabilities too.")
  flags.DEFINE_list("formats", [], f"Submission formats, some of {submission.FORMATS}.")
  flags.DEFINE_string("frame_counts", None, "Frames per video for per_video files "
                      "(JSON or 'video,frames' CSV; default: the last face frame).")
  flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's eval "
                       "batch, rounded up to a multiple of the device count).")
  flags.DEFINE_integer("plot_videos", 4, "Plot affect over time for this many videos.")
  flags.DEFINE_string("split", None, "tune: the labelled split (default: eval split).")
  flags.DEFINE_list("smooth_windows", ["1", "3", "5", "9", "15"],
                    "tune: smoothing windows to score.")
  config_flags.DEFINE_config_file("config", None, "Config file (default: the run's "
                                  "config.json).", lock_config=True)
  flags.mark_flags_as_required(["workdir"])
  return flags.FLAGS


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from affect_jax import cli_logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  cli_logging.quiet_library_logs()
  config = load_config(FLAGS.workdir, FLAGS.config, FLAGS.data_dir)
  if FLAGS.mode == "tune":
    report = run_tuning(config, FLAGS.workdir, split=FLAGS.split, step=FLAGS.step,
                        smooth_windows=[int(w) for w in FLAGS.smooth_windows],
                        smooth_au=FLAGS.smooth_au,
                        au_smoothing_window=FLAGS.smooth_window if FLAGS.smooth_au
                        else 1, batch_size=FLAGS.batch_size)
    print(format_tuning_report(report))
    return
  if not FLAGS.source or not FLAGS.out:
    raise app.UsageError("--mode predict needs --source and --out")
  frame_counts = submission.read_frame_counts(FLAGS.frame_counts) \
      if FLAGS.frame_counts else None
  summary = run_prediction(
      config, FLAGS.workdir, FLAGS.source, FLAGS.out, step=FLAGS.step,
      image_roots=FLAGS.image_root, use_tuned_thresholds=FLAGS.tuned_au_thresholds,
      smooth_window=FLAGS.smooth_window, smooth_au=FLAGS.smooth_au,
      formats=FLAGS.formats, frame_counts=frame_counts, batch_size=FLAGS.batch_size,
      plot_video_count=FLAGS.plot_videos)
  print(json.dumps({k: v for k, v in summary.items() if k != "au_thresholds"},
                   indent=2))


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  _app.run(main)
