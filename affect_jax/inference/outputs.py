"""What a prediction run writes: the per-frame CSV, the ABAW submission files and
per-video plots."""
from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np

from affect_jax import vocabulary
from affect_jax.inference import submission
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


