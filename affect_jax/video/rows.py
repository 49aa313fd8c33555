"""What an analysis gives: one row per (frame, face), its columns, the CSV, a pandas
DataFrame when pandas is installed, and a summary per face.

The columns (docs/VIDEO.md sets them beside OpenFace's and py-feat's names):
  source, frame, timestamp, face_id, left, top, right, bottom, detection_score,
  detected, p_<expression> (one per class), expression, p_AU<n> (one per AU), AU<n>
  (0/1 with the run's thresholds), valence, arousal.
"""
from __future__ import annotations

import csv
import dataclasses
from typing import Iterable, Sequence

import numpy as np

from affect_jax import vocabulary
from tfds_affwild2 import annotations


@dataclasses.dataclass
class FaceRow:
  """One face in one frame and what the model says of it."""
  source: str  # the input's name
  frame: int  # from 1
  timestamp: float  # seconds from the start
  face_id: int
  box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive) in pixels
  detection_score: float  # of the face's latest detection
  detected: bool  # found by the detector in this frame (else followed by the tracker)
  expression: np.ndarray | None = None  # probabilities [classes]
  au: np.ndarray | None = None  # probabilities [12]
  au_present: np.ndarray | None = None  # 0/1 [12]
  va: np.ndarray | None = None  # valence, arousal

  @property
  def expression_label(self) -> str | None:
    if self.expression is None:
      return None
    return vocabulary.expression_names(len(self.expression))[int(np.argmax(
        self.expression))]

  @property
  def valence(self) -> float | None:
    return None if self.va is None else float(self.va[0])

  @property
  def arousal(self) -> float | None:
    return None if self.va is None else float(self.va[1])


def columns(rows: Sequence[FaceRow]) -> list[str]:
  """The CSV's header for these rows (tasks the model lacks have no columns)."""
  header = ["source", "frame", "timestamp", "face_id", "left", "top", "right", "bottom",
            "detection_score", "detected"]
  first = rows[0] if rows else None
  if first is None or first.expression is not None:
    count = len(first.expression) if first is not None else 8
    header += [f"p_{n}" for n in vocabulary.expression_names(count)] + ["expression"]
  if first is None or first.au is not None:
    header += [f"p_{n}" for n in annotations.AU_NAMES] + list(annotations.AU_NAMES)
  if first is None or first.va is not None:
    header += ["valence", "arousal"]
  return header


def record(row: FaceRow) -> dict:
  """A row as {column: value} (plain Python numbers and strings)."""
  values = {"source": row.source, "frame": row.frame,
            "timestamp": round(row.timestamp, 6), "face_id": row.face_id,
            "left": row.box[0], "top": row.box[1], "right": row.box[2],
            "bottom": row.box[3], "detection_score": round(row.detection_score, 4),
            "detected": int(row.detected)}
  if row.expression is not None:
    names = vocabulary.expression_names(len(row.expression))
    values.update({f"p_{n}": float(p) for n, p in zip(names, row.expression)})
    values["expression"] = row.expression_label
  if row.au is not None:
    values.update({f"p_{n}": float(p) for n, p in zip(annotations.AU_NAMES, row.au)})
    values.update({n: int(d) for n, d in zip(annotations.AU_NAMES, row.au_present)})
  if row.va is not None:
    values.update(valence=float(row.va[0]), arousal=float(row.va[1]))
  return values


def format_value(value) -> str:
  return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_csv(path: str, rows: Iterable[FaceRow], header: Sequence[str] | None = None
              ) -> str:
  rows = list(rows)
  header = list(header or columns(rows))
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in rows:
      values = record(row)
      writer.writerow([format_value(values.get(name, "")) for name in header])
  return path


def data_frame(rows: Sequence[FaceRow]):
  """The rows as a pandas DataFrame (pandas is not a dependency: ImportError without)."""
  try:
    import pandas as pd  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("a DataFrame needs pandas: pip install pandas (the rows are "
                      "there without it: analysis.rows, analysis.records())") from None
  return pd.DataFrame([record(row) for row in rows], columns=columns(rows))


def face_summary(rows: Sequence[FaceRow]) -> dict:
  """One face's rows in a few numbers: when it was seen, mean valence and arousal,
  the share of its frames of each expression, how often each AU was present."""
  first, last = rows[0], rows[-1]
  summary = {"face_id": first.face_id, "frames_seen": len(rows),
             "frames_detected": sum(r.detected for r in rows),
             "first_frame": first.frame, "last_frame": last.frame,
             "first_seconds": round(first.timestamp, 3),
             "last_seconds": round(last.timestamp, 3)}
  if first.va is not None:
    va = np.stack([r.va for r in rows])
    summary.update(mean_valence=round(float(va[:, 0].mean()), 4),
                   mean_arousal=round(float(va[:, 1].mean()), 4))
  if first.expression is not None:
    names = vocabulary.expression_names(len(first.expression))
    labels = [r.expression_label for r in rows]
    summary["expression_shares"] = {n: round(labels.count(n) / len(rows), 4)
                                    for n in names}
  if first.au is not None:
    present = np.stack([r.au_present for r in rows]).mean(0)
    summary["au_rates"] = {n: round(float(p), 4)
                           for n, p in zip(annotations.AU_NAMES, present)}
  return summary


def rows_by_face(rows: Sequence[FaceRow]) -> dict[int, list[FaceRow]]:
  by_face: dict[int, list[FaceRow]] = {}
  for row in rows:
    by_face.setdefault(row.face_id, []).append(row)
  return dict(sorted(by_face.items()))


def smooth_rows(rows: list, window: int) -> list:
  """Expression probabilities and VA of each face averaged over a centred window of
  its frames (frame_table.centred_moving_average, a face's id as its video)."""
  if window == 1 or not rows:
    return rows
  from affect_jax.inference import frame_table  # pylint: disable=g-import-not-at-top
  keys = np.asarray([f"{r.source}#{r.face_id}" for r in rows])
  frames = np.asarray([r.frame for r in rows])
  smoothed = list(rows)
  for name in ("expression", "va"):
    if getattr(rows[0], name) is None:
      continue
    values = frame_table.centred_moving_average(
        np.stack([getattr(r, name) for r in rows]), keys, frames, window)
    smoothed = [dataclasses.replace(r, **{name: v}) for r, v in zip(smoothed, values)]
  return smoothed
