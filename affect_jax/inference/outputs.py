"""What a prediction run writes: the per-frame CSV, the ABAW submission files and
per-video plots."""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

from affect_jax import vocabulary
from affect_jax.errors import InputError
from affect_jax.inference import abaw_lists, submission
from affect_jax.inference.frame_table import FrameTable
from affect_jax.inference.sources import OpenedSource
from tfds_affwild2 import annotations


def au_decisions(au_probabilities: np.ndarray, thresholds) -> np.ndarray:
  """0/1 per AU: present when the probability is >= its threshold (metrics' rule)."""
  return (au_probabilities >= np.asarray(thresholds, np.float32)).astype(np.int8)


def csv_header(table: FrameTable) -> list[str]:
  header = ["video", "frame", "image_path", "record_index"]
  if table.expression is not None:
    header += [f"p_{n}" for n in vocabulary.expression_names(table.expression.shape[1])]
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


@dataclasses.dataclass(frozen=True)
class SubmissionPlan:
  """What prediction writes submissions for: `targets` maps a folder name ('' for the
  source list or the table itself) to the entries of the list it is for; `counts` is N
  of every video they name, with where each N came from."""
  targets: dict
  counts: abaw_lists.FrameCounts


def plan_submissions(opened: OpenedSource | None, test_lists: Sequence[str] = (), *,
                     frame_counts: dict | None = None, video_dir: str | None = None,
                     table_frames: dict | None = None) -> SubmissionPlan:
  """The lists to write submissions for and N of their videos, checked before any
  prediction runs. A list source is the submission's list; each of `test_lists` gets a
  submission of its own and lends its listed frames as N to the others. Without a
  list (a folder or TFDS split), the table's videos are written, N falling back to
  their last face frame (`table_frames`: video -> predicted frames)."""
  lists = {path: abaw_lists.read_test_list(path) for path in test_lists}
  targets = {_folder_name(path): entries for path, entries in lists.items()}
  source_list = opened is not None and opened.entries is not None
  if source_list:
    targets[""] = opened.entries
    lists[opened.data.description] = opened.entries
  elif not lists:
    targets[""] = [abaw_lists.TestEntry(0, video) for video in sorted(table_frames or {})]
  videos = [e.video for entries in targets.values() for e in entries]
  counts = abaw_lists.resolve_frame_counts(
      videos, given=frame_counts,
      video_files=(abaw_lists.video_file_frame_counts(video_dir, videos) if video_dir
                   else None),
      listed=abaw_lists.listed_frame_counts(lists),
      face_frames=None if (source_list or lists) else table_frames,
      listed_in=", ".join(lists) or "")
  if source_list:
    abaw_lists.check_counts_cover_faces(counts, opened.face_frames)
  return SubmissionPlan(targets, counts)


def _folder_name(list_path: str) -> str:
  return os.path.splitext(os.path.basename(list_path))[0]


def write_submissions(out_dir: str, formats: Sequence[str], table: FrameTable,
                      thresholds, plan: SubmissionPlan, num_expr_classes: int, *,
                      au_names: Sequence[str] = annotations.AU_NAMES,
                      fill: str = "previous") -> dict[str, list[str]]:
  """Each requested format under `out_dir/[<list name>/]<format>/`, covering every
  image and every frame 1..N its list names."""
  predictions = submission_predictions(table, thresholds)
  counts = plan.counts.counts
  written = {}
  for name, entries in plan.targets.items():
    for fmt in formats:
      folder = os.path.join(out_dir, name, fmt)
      key = os.path.join(name, fmt)
      if fmt == "per_video":
        written[key] = submission.write_per_video_files(
            folder, predictions, abaw_lists.video_lengths(entries, counts),
            num_expr_classes=num_expr_classes, au_names=au_names, fill=fill)
      elif fmt == "mtl":
        written[key] = [submission.write_mtl_file(
            folder, predictions, abaw_lists.listed_images(entries, counts), fill)]
      elif fmt == "image_location":
        written[key] = submission.write_image_location_files(
            folder, predictions, abaw_lists.listed_images(entries, counts),
            num_expr_classes=num_expr_classes, au_names=au_names, fill=fill)
      else:
        raise InputError(f"unknown submission format {fmt!r}; expected one of "
                         f"{submission.FORMATS}")
  return written


def plot_videos(out_dir: str, table: FrameTable, count: int) -> list[str]:
  """VA over time, expression timeline and AU heat map of the first `count` videos."""
  from affect_jax.inference import affect_plots  # pylint: disable=g-import-not-at-top
  paths = []
  for video in sorted(set(table.video.tolist()))[:count]:
    rows = np.flatnonzero(table.video == video)
    num_frames = int(table.frame[rows].max())
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in video)
    paths.append(affect_plots.plot_affect(os.path.join(out_dir, f"video_{safe_name}.png"),
                                          video, table, rows, num_frames))
  return paths


