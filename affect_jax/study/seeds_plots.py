"""The study report's plots: each variant's scores over its seeds (bars of the mean,
a line of ± one sd, a dot per seed), and every run's training loss and validation
curves."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from affect_jax.study import seeds
from affect_jax.vocabulary import TASKS

# (score key, label) as the report's tables show them
SCORE_COLUMNS = (("p_va", "P_VA"), ("ccc_valence", "CCC_v"), ("ccc_arousal", "CCC_a"),
                 ("expr_f1", "EXPR F1"), ("au_f1", "AU F1"), ("p_mtl", "P_MTL"))


def pyplot():
  """matplotlib's pyplot drawing to files; imported on first use, so that training
  through the runner does not load it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_scores(results: Sequence, path: str) -> None:
  """One horizontal bar chart per score: each variant's mean over its seeds, a line
  of ± one standard deviation, a dot per seed; the best mean drawn darker."""
  plt = pyplot()
  groups = seeds.group_by_variant(results)
  fig, axes = plt.subplots(2, 3, figsize=(15, 0.32 * len(groups) * 2 + 3))
  for ax, (key, label) in zip(axes.flat, SCORE_COLUMNS):
    shown = {name: seeds.spread([seeds.finished_score(r, key) for r in runs])
             for name, runs in groups.items()}
    shown = {name: value for name, value in shown.items() if value is not None}
    if not shown:
      ax.axis("off")
      continue
    best = max(value.mean for value in shown.values())
    for y, (name, value) in enumerate(shown.items()):
      ax.barh(y, value.mean, color="tab:red" if value.mean == best else "tab:blue",
              alpha=0.6)
      if value.sd is not None:
        ax.plot([value.mean - value.sd, value.mean + value.sd], [y, y], color="black",
                lw=1)
      ax.plot(value.values, [y] * value.count, "k.", ms=4)
      ax.text(max(value.values + (value.mean,)), y, f" {value.mean:.3f}", va="center",
              fontsize=7)
    ax.set_yticks(range(len(shown)), list(shown), fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{label} (mean ± sd, dots: seeds)")
    ax.margins(x=0.2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
  """(step, mean over the curves) at the steps every curve has, with two curves or
  more (a run stopped early would otherwise bend the mean where it stops)."""
  by_step: dict[int, list[float]] = {}
  for curve in curves:
    for step, value in curve:
      by_step.setdefault(step, []).append(value)
  return [(step, float(np.mean(v))) for step, v in sorted(by_step.items())
          if len(v) == len(curves) > 1]


def plot_curves(results: Sequence, path: str) -> None:
  """Training loss and validation scores against steps, every variant overlaid: a thin
  line per seed (fainter the more seeds a variant has) and, for several seeds, their
  mean as a thick line."""
  plt = pyplot()
  panels = [("train/loss", "training loss (scales differ between losses)")]
  panels += [(key, f"validation {label}") for key, label in SCORE_COLUMNS
             if key not in ("ccc_valence", "ccc_arousal")]
  fig, grid = plt.subplots(2, 3, figsize=(16, 9))
  axes = grid.flat[:len(panels)]
  colours = plt.get_cmap("tab20")
  groups = seeds.group_by_variant(results)
  for number, (name, runs) in enumerate(groups.items()):
    first = runs[0]
    style = {"color": colours(number % 20),
             "ls": "--" if len(first.tasks) == 1 else ":" if first.temporal else "-"}
    alpha = min(1.0, max(0.15, 3 / len(runs)))
    for ax, (key, _) in zip(axes, panels):
      if key == "train/loss":
        curves = [r.losses for r in runs if r.losses]
      elif key == "p_mtl" and set(first.tasks) != set(TASKS):
        curves = []
      else:
        curves = [[(m["step"], m[key]) for m in r.evaluations if key in m] for r in runs]
        curves = [c for c in curves if c]
      for curve in curves:
        ax.plot(*zip(*curve), lw=1, alpha=alpha,
                marker=None if key == "train/loss" else "o", ms=2, **style)
      mean = mean_curve(curves)
      if mean:
        ax.plot(*zip(*mean), lw=2.5, **style)
    axes[0].plot([], [], lw=2, label=f"{name} ({len(runs)})", **style)  # legend entry
  for ax, (_, title) in zip(axes, panels):
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  legend_panel = grid.flat[len(panels)]  # the sixth panel holds the legend
  legend_panel.axis("off")
  handles, labels = axes[0].get_legend_handles_labels()
  legend_panel.legend(handles, labels, loc="center", fontsize=9,
                      title="variant (seeds): uni-task dashed, multi-task solid, "
                      "temporal dotted;\nthin: one seed; thick: the mean over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
