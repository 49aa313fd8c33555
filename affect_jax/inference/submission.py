"""ABAW submission files: writers for each challenge year's format, and a validator.

Formats (see shared ABAW_FORMAT.md, "Submission files"):
  per_video       ABAW1-3 uni-task: `<out>/{VA,EXPR,AU}/<video>.txt`, the task's header,
                  then one line per frame of the whole video (line k+1 is frame k).
  mtl             ABAW3+ multi-task: one file `<out>/MTL.txt`, header
                  `image,valence,arousal,expression,aus`, one line per listed image
                  (`video/00001.jpg,v,a,expression,AU1,...,AU26`).
  image_location  ABAW5+ uni-task: `<out>/{VA,EXPR,AU}.txt`, header
                  `image_location,valence,arousal` / `image_location,Neutral,...,Other` /
                  `image_location,AU1,...,AU26`, one line per listed image.

Every frame the organisers list is written: a listed video is its frames 1..N (N from
affect_jax.inference.abaw_lists). A frame without a prediction (no face image, so
nothing to predict from) is filled: `previous` (the default, the challenges' rule)
takes the previous predicted frame's values, frames before the first prediction of a
video the first one; `linear` interpolates valence and arousal linearly between the
predicted frames around it and takes the expression and AUs of the nearer of them
(the previous one on a tie).

AU files carry the 12 AUs of ABAW2 and later, or ABAW1's 8 (`ABAW1_AU_NAMES`, for
per-video files of that challenge): AU20, which the model does not predict, is written
as 0 (absent).

Everything here is pure Python and NumPy: writers take decisions already made (VA
values, a class index, 0/1 AUs); `affect-jax predict` makes them from a model. What a
submission must cover (test lists, frame counts) is affect_jax.inference.abaw_lists';
the validator (`affect-jax validate`) is affect_jax.inference.submission_validator's.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from affect_jax.errors import InputError
from affect_jax.inference.abaw_lists import (  # noqa: F401  (re-exported)
  TestEntry,
  face_frames_of,
  listed_frame_counts,
  listed_images,
  read_frame_counts,
  read_test_list,
  resolve_frame_counts,
  video_file_frame_counts,
  video_lengths,
)
from tfds_affwild2 import annotations
from tfds_affwild2.annotations import AU_NAMES

FORMATS = ("per_video", "mtl", "image_location")
FILL_RULES = ("previous", "linear")
TASKS = ("va", "expr", "au")
# ABAW1 (2020) annotated 8 AUs; AU20 is not among the model's 12.
ABAW1_AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")
AU_SETS = {"abaw": AU_NAMES, "abaw1": ABAW1_AU_NAMES}
TASK_LABEL = {"va": "VA", "expr": "EXPR", "au": "AU"}  # folder / file names
MTL_FILE = "MTL.txt"
MTL_HEADER = ",".join(annotations.MTL_HEADER)
IMAGE_COLUMN = "image_location"


# ----------------------------------------------------------------------------------
# Predictions grouped by video, and the fill rule for frames without a prediction.
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoPredictions:
  """Decisions for the frames of one video that have a prediction, sorted by frame.

  Tasks the model does not have are None.
  """
  frames: np.ndarray  # int64 [n], strictly increasing
  va: np.ndarray | None = None  # float [n, 2] in [-1, 1]
  expression: np.ndarray | None = None  # int [n] in 0..K-1
  aus: np.ndarray | None = None  # int [n, 12] in {0, 1}

  def tasks(self) -> tuple[str, ...]:
    present = {"va": self.va, "expr": self.expression, "au": self.aus}
    return tuple(task for task in TASKS if present[task] is not None)


def group_by_video(videos: Sequence[str], frames, *, va=None, expression=None,
                   aus=None) -> dict[str, VideoPredictions]:
  """Per-frame decision arrays (any order) -> {video: VideoPredictions}."""
  names, video_ids = np.unique(np.asarray(videos, dtype=str), return_inverse=True)
  frames = np.asarray(frames, np.int64)
  order = np.lexsort((frames, video_ids))  # by video, then frame: one sort for all
  starts = np.searchsorted(video_ids[order], np.arange(len(names) + 1))
  result = {}
  for video_id, video in enumerate(names.tolist()):
    rows = order[starts[video_id]:starts[video_id + 1]]
    if np.any(np.diff(frames[rows]) == 0):
      duplicate = frames[rows][np.flatnonzero(np.diff(frames[rows]) == 0)[0]]
      raise ValueError(f"video {video}: two predictions for frame {duplicate}")
    result[video] = VideoPredictions(frames[rows], va=_rows_of(va, rows),
                                     expression=_rows_of(expression, rows),
                                     aus=_rows_of(aus, rows))
  return result


def _rows_of(values, rows):
  return None if values is None else np.asarray(values)[rows]


def source_rows_for_frames(known_frames: np.ndarray, frames) -> np.ndarray:
  """For each wanted frame, the row of the prediction it takes: the last predicted
  frame at or before it, else (before the first prediction) the first one."""
  if len(known_frames) == 0:
    raise ValueError("no predicted frame to take values from")
  rows = np.searchsorted(known_frames, np.asarray(frames, np.int64), side="right") - 1
  return np.maximum(rows, 0)


def nearest_rows_for_frames(known_frames: np.ndarray, frames) -> np.ndarray:
  """For each wanted frame, the row of the nearest predicted frame (the previous one
  on a tie)."""
  frames = np.asarray(frames, np.int64)
  previous = source_rows_for_frames(known_frames, frames)
  following = np.minimum(previous + 1, len(known_frames) - 1)
  nearer_next = (known_frames[following] - frames) < np.abs(frames -
                                                            known_frames[previous])
  return np.where(nearer_next & (known_frames[previous] < frames), following, previous)


def _interpolated_va(known: VideoPredictions, frames: np.ndarray) -> np.ndarray:
  """VA linearly interpolated between predicted frames (held at the ends)."""
  return np.stack([np.interp(frames, known.frames, known.va[:, d])
                   for d in range(known.va.shape[1])], axis=1)


def predictions_at(video: str, predictions: Mapping[str, VideoPredictions],
                   frames, fill: str = "previous") -> VideoPredictions:
  """The video's decisions at `frames`; frames without a prediction filled by `fill`
  (see the module docstring)."""
  if fill not in FILL_RULES:
    raise InputError(f"unknown fill rule {fill!r}; expected one of {FILL_RULES}")
  if video not in predictions:
    raise InputError(f"video {video} has no predicted frame (no face image was "
                     "predicted): nothing to fill its frames with")
  known = predictions[video]
  frames = np.asarray(frames, np.int64)
  if fill == "previous":
    rows = source_rows_for_frames(known.frames, frames)
    return VideoPredictions(frames, va=_rows_of(known.va, rows),
                            expression=_rows_of(known.expression, rows),
                            aus=_rows_of(known.aus, rows))
  rows = nearest_rows_for_frames(known.frames, frames)
  return VideoPredictions(
      frames, va=None if known.va is None else _interpolated_va(known, frames),
      expression=_rows_of(known.expression, rows), aus=_rows_of(known.aus, rows))


def image_location(video: str, frame: int) -> str:
  return f"{video}/{frame:05d}.jpg"


# ----------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------


def task_header(task: str, num_expr_classes: int = 8,
                au_names: Sequence[str] = AU_NAMES) -> str:
  if task == "va":
    return ",".join(annotations.VA_NAMES)
  if task == "expr":
    return ",".join(annotations.EXPRESSION_NAMES_8[:num_expr_classes])
  return ",".join(au_names)


def au_columns(au_names: Sequence[str]) -> list[int | None]:
  """Index of each written AU among the model's 12 (None: not predicted, written 0)."""
  return [AU_NAMES.index(name) if name in AU_NAMES else None for name in au_names]


def format_values(task: str, predictions: VideoPredictions, row: int,
                  au_names: Sequence[str] = AU_NAMES) -> str:
  """One frame's values of one task as the ABAW files write them."""
  if task == "va":
    return ",".join(f"{float(x):.6f}" for x in predictions.va[row])
  if task == "expr":
    return str(int(predictions.expression[row]))
  aus = predictions.aus[row]
  return ",".join("0" if i is None else str(int(aus[i])) for i in au_columns(au_names))


def _write_lines(path: str, header: str, lines: Iterable[str]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(header + "\n")
    for line in lines:
      f.write(line + "\n")


def _selected_tasks(predictions: Mapping[str, VideoPredictions],
                    tasks: Sequence[str] | None) -> tuple[str, ...]:
  available = next(iter(predictions.values())).tasks() if predictions else ()
  tasks = tuple(tasks) if tasks is not None else available
  missing = [t for t in tasks if t not in available]
  if missing:
    raise ValueError(f"the predictions have no {', '.join(missing)} values "
                     f"(tasks of the model: {', '.join(available) or 'none'})")
  return tasks


def write_per_video_files(out_dir: str, predictions: Mapping[str, VideoPredictions],
                          lengths: Mapping[str, int], *, tasks=None,
                          num_expr_classes: int = 8, au_names: Sequence[str] = AU_NAMES,
                          fill: str = "previous") -> list[str]:
  """ABAW1-3: `<out_dir>/<TASK>/<video>.txt` with frames 1..lengths[video]."""
  written = []
  for task in _selected_tasks(predictions, tasks):
    for video, length in sorted(lengths.items()):
      filled = predictions_at(video, predictions, np.arange(1, length + 1), fill)
      path = os.path.join(out_dir, TASK_LABEL[task], f"{video}.txt")
      _write_lines(path, task_header(task, num_expr_classes, au_names),
                   (format_values(task, filled, row, au_names) for row in range(length)))
      written.append(path)
  return written


def _filled_per_image(predictions, images: Sequence[tuple[str, int]], fill: str):
  """(location, VideoPredictions of one row, row) for each image, in order; filled
  video by video so that the whole list needs one lookup per video."""
  by_video: dict[str, list[int]] = {}
  for position, (video, _) in enumerate(images):
    by_video.setdefault(video, []).append(position)
  filled = [None] * len(images)
  for video, positions in by_video.items():
    values = predictions_at(video, predictions, [images[p][1] for p in positions], fill)
    for row, position in enumerate(positions):
      filled[position] = (image_location(*images[position]), values, row)
  return filled


def write_mtl_file(out_dir: str, predictions: Mapping[str, VideoPredictions],
                   images: Sequence[tuple[str, int]], fill: str = "previous") -> str:
  """ABAW3+ MTL: one line per image, `image,valence,arousal,expression,AU1..AU26`."""
  _selected_tasks(predictions, TASKS)
  path = os.path.join(out_dir, MTL_FILE)
  _write_lines(path, MTL_HEADER, (
      ",".join([location] + [format_values(t, values, row) for t in TASKS])
      for location, values, row in _filled_per_image(predictions, images, fill)))
  return path


def write_image_location_files(out_dir: str,
                               predictions: Mapping[str, VideoPredictions],
                               images: Sequence[tuple[str, int]], *, tasks=None,
                               num_expr_classes: int = 8,
                               au_names: Sequence[str] = AU_NAMES,
                               fill: str = "previous") -> list[str]:
  """ABAW5+: `<out_dir>/<TASK>.txt`, one `image_location,...` line per image."""
  filled = _filled_per_image(predictions, images, fill)
  written = []
  for task in _selected_tasks(predictions, tasks):
    path = os.path.join(out_dir, f"{TASK_LABEL[task]}.txt")
    _write_lines(path, f"{IMAGE_COLUMN},{task_header(task, num_expr_classes, au_names)}",
                 (f"{location},{format_values(task, values, row, au_names)}"
                  for location, values, row in filled))
    written.append(path)
  return written
