"""Plots of predicted affect over the frames of one video: valence-arousal curves, the
expression probabilities with the predicted class, the AU probabilities; frames without
a face show as gaps."""
from __future__ import annotations

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
