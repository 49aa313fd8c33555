"""Plots of predicted affect over a video: valence-arousal curves, the expression
probabilities with the predicted class, the AU probabilities; frames without a face
show as gaps. Per video over frame numbers (the predict command), or per face over
seconds (the faces command)."""
from __future__ import annotations

import os

import numpy as np

from affect_jax import vocabulary


def timeline(values: np.ndarray, frames: np.ndarray, num_frames: int) -> np.ndarray:
  """Rows of values per frame 1..num_frames, NaN where a frame has no face."""
  result = np.full((num_frames,) + values.shape[1:], np.nan)
  result[np.asarray(frames) - 1] = values
  return result


def plot_affect(path: str, title: str, table, rows: np.ndarray, num_frames: int
                ) -> str:
  """VA over time, expression probabilities and AU probabilities as heat maps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  frames = table.frame[rows]
  panels = [name for name in ("va", "expression", "au")
            if getattr(table, name) is not None]
  # Constrained layout keeps the panels' time axes aligned beside the colour bar.
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)),
                           sharex=True, squeeze=False, layout="constrained")
  x = np.arange(1, num_frames + 1)
  extent = (0.5, num_frames + 0.5)
  for ax, panel in zip(axes[:, 0], panels):
    if panel == "va":
      va = timeline(table.va[rows], frames, num_frames)
      ax.plot(x, va[:, 0], label="valence", marker="." if num_frames < 50 else None)
      ax.plot(x, va[:, 1], label="arousal", marker="." if num_frames < 50 else None)
      ax.set(ylim=(-1.05, 1.05), ylabel="VA")
      ax.axhline(0, color="grey", lw=0.5)
      ax.legend(loc="upper right", fontsize=8)
    elif panel == "expression":
      probabilities = timeline(table.expression[rows], frames, num_frames)
      names = vocabulary.expression_names(probabilities.shape[1])
      ax.imshow(probabilities.T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                interpolation="nearest", extent=(*extent, len(names) - 0.5, -0.5))
      predicted = np.where(np.isnan(probabilities[:, 0]), np.nan,
                           np.argmax(np.nan_to_num(probabilities, nan=-1), 1))
      ax.plot(x, predicted, "w.", ms=3)  # the predicted class of each frame
      ax.set(yticks=range(len(names)), ylabel="expression")
      ax.set_yticklabels(names, fontsize=7)
    else:
      probabilities = timeline(table.au[rows], frames, num_frames)
      image = ax.imshow(probabilities.T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                        interpolation="nearest",
                        extent=(*extent, len(vocabulary.AU_NAMES) - 0.5, -0.5))
      ax.set(yticks=range(len(vocabulary.AU_NAMES)), ylabel="AU probability")
      ax.set_yticklabels(vocabulary.AU_NAMES, fontsize=7)
      fig.colorbar(image, ax=axes[:, 0].tolist(), pad=0.01, fraction=0.03,
                   label="probability")
  axes[-1, 0].set_xlabel("frame")
  axes[-1, 0].set_xlim(*extent)
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def face_timeline(values: np.ndarray, frame_numbers: np.ndarray, num_frames: int
                  ) -> np.ndarray:
  """Rows of values per frame 1..num_frames, NaN where the face is not in the frame."""
  return timeline(np.asarray(values, np.float64), frame_numbers, num_frames)


def time_edges(frame_seconds: np.ndarray) -> np.ndarray:
  """The edges in seconds of each frame's span: [t_i, t_i+1), the last one as long as
  the median frame (a variable frame rate keeps its real spans)."""
  seconds = np.asarray(frame_seconds, np.float64)
  step = float(np.median(np.diff(seconds))) if len(seconds) > 1 else 1.0
  return np.append(seconds, seconds[-1] + (step if step > 0 else 1.0))


def plot_face_over_time(path: str, title: str, frame_seconds: np.ndarray,
                        frame_numbers: np.ndarray, expression: np.ndarray | None,
                        au: np.ndarray | None, va: np.ndarray | None) -> str:
  """One face over a video's time in seconds: valence and arousal, the expression
  probabilities with the predicted class, the AU probabilities; gaps where the face is
  not in the frame. `frame_seconds`: the time of every frame of the video;
  `frame_numbers`: the frames (from 1) of the face's rows."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  num_frames = len(frame_seconds)
  panels = [(n, v) for n, v in (("va", va), ("expression", expression), ("au", au))
            if v is not None]
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)),
                           sharex=True, squeeze=False, layout="constrained")
  seconds = np.asarray(frame_seconds, np.float64)
  edges = time_edges(seconds)
  marker = "." if num_frames < 50 else None
  for ax, (panel, values) in zip(axes[:, 0], panels):
    per_frame = face_timeline(values, frame_numbers, num_frames)
    if panel == "va":
      ax.plot(seconds, per_frame[:, 0], label="valence", marker=marker)
      ax.plot(seconds, per_frame[:, 1], label="arousal", marker=marker)
      ax.set(ylim=(-1.05, 1.05), ylabel="VA")
      ax.axhline(0, color="grey", lw=0.5)
      ax.legend(loc="upper right", fontsize=8)
      continue
    names = (vocabulary.expression_names(per_frame.shape[1]) if panel == "expression"
             else vocabulary.AU_NAMES)
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, per_frame.T,
                         cmap="magma", vmin=0, vmax=1, shading="flat")
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set(yticks=range(len(names)),
           ylabel="expression" if panel == "expression" else "AU probability")
    ax.set_yticklabels(names, fontsize=7)
    if panel == "expression":
      predicted = np.where(np.isnan(per_frame[:, 0]), np.nan,
                           np.argmax(np.nan_to_num(per_frame, nan=-1), 1))
      ax.plot((edges[:-1] + edges[1:]) / 2, predicted, "w.", ms=3)
    else:
      fig.colorbar(mesh, ax=axes[:, 0].tolist(), pad=0.01, fraction=0.03,
                   label="probability")
  axes[-1, 0].set_xlabel("seconds")
  axes[-1, 0].set_xlim(edges[0], edges[-1])
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_faces(out_dir: str, analysis) -> list[str]:
  """OUT/<name>_face<id>.png for each face of one input (an affect_jax.video
  Analysis: its rows and the time of every frame)."""
  by_face: dict = {}
  for row in analysis.rows:
    by_face.setdefault(row.face_id, []).append(row)
  paths = []
  for face_id, face_rows in sorted(by_face.items()):
    stack = lambda name: (None if getattr(face_rows[0], name) is None  # noqa: E731
                          else np.stack([getattr(r, name) for r in face_rows]))
    paths.append(plot_face_over_time(
        os.path.join(out_dir, f"{analysis.name}_face{face_id}.png"),
        f"{analysis.path or analysis.name}: face {face_id}", analysis.frame_seconds,
        np.asarray([r.frame for r in face_rows]), stack("expression"), stack("au"),
        stack("va")))
  return paths
