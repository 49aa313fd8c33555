"""A run's report: scores next to constant predictors, and the plots people look at
(EXPR confusion matrix, valence/arousal predicted-vs-true density, per-AU F1)."""
from __future__ import annotations

import os

import matplotlib
import numpy as np

from affect_jax import vocabulary
from affect_jax.eval import metrics

matplotlib.use("Agg")  # files only, no display; chosen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

SCORE_ROWS = (("p_va", "P_VA"), ("ccc_valence", "CCC valence"),
              ("ccc_arousal", "CCC arousal"), ("expr_f1", "EXPR macro F1"),
              ("expr_accuracy", "EXPR accuracy"),
              ("p_expr_abaw2", "EXPR 0.67 F1 + 0.33 accuracy (ABAW1/2)"),
              ("au_f1", "AU mean F1"), ("au_accuracy", "AU accuracy"),
              ("p_au_abaw2", "AU 0.5 F1 + 0.5 accuracy (ABAW1/2)"), ("p_mtl", "P_MTL"))


def _fixed(value: float) -> str:
  text = f"{value:.4f}"
  return "0.0000" if text == "-0.0000" else text


def constant_predictor_scores(collected: dict, num_expr_classes: int) -> dict:
  """Scores of the best label-blind predictors on the same frames: the majority class
  (EXPR), every AU on (the best constant for F1), the mean label (VA, CCC 0)."""
  outputs, batch = {}, {}
  n = len(collected["record_index"])
  if "expression_mask" in collected and "pred_expression" in collected:
    valid = collected["expression_mask"] > 0
    majority = np.bincount(collected["expression"][valid],
                           minlength=num_expr_classes).argmax() if valid.any() else 0
    outputs["expression"] = np.eye(num_expr_classes, dtype=np.float32)[[majority] * n]
    batch.update(expression=collected["expression"],
                 expression_mask=collected["expression_mask"])
  if "pred_au" in collected:
    outputs["au"] = np.full((n, len(vocabulary.AU_NAMES)), 10.0, np.float32)
    batch.update(au=collected["au"], au_mask=collected["au_mask"])
  if "pred_va" in collected:
    valid = collected["va_mask"] > 0
    mean = collected["valence_arousal"][valid].mean(0) if valid.any() else np.zeros(2)
    outputs["va"] = np.tile(mean, (n, 1)).astype(np.float32)
    batch.update(valence_arousal=collected["valence_arousal"],
                 va_mask=collected["va_mask"])
  statistics = metrics.batch_statistics(outputs, batch)
  return metrics.compute_scores(statistics)


def plot_confusion(confusion, names, path) -> None:
  confusion = np.asarray(confusion, np.float64)
  rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(6, 5))
  image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
  ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted",
         ylabel="true", title="Expression confusion (row-normalised)")
  ax.set_xticklabels(names, rotation=45, ha="right")
  ax.set_yticklabels(names)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=7,
              color="white" if rows[i, j] > 0.5 else "black")
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_va_density(predicted, true, mask, scores, path) -> None:
  valid = mask > 0
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
  for dim, (ax, name) in enumerate(zip(axes, ("valence", "arousal"))):
    ax.hist2d(true[valid, dim], predicted[valid, dim], bins=40,
              range=[[-1, 1], [-1, 1]], cmap="magma", cmin=1)
    ax.plot([-1, 1], [-1, 1], color="cyan", lw=1, ls="--")
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", aspect="equal",
           title=f"{name}: CCC {scores.get(f'ccc_{name}', float('nan')):.3f}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_au_f1(f1_per_au, baseline_per_au, path) -> None:
  x = np.arange(len(vocabulary.AU_NAMES))
  fig, ax = plt.subplots(figsize=(9, 4))
  ax.bar(x - 0.2, f1_per_au, 0.4, label="model")
  ax.bar(x + 0.2, baseline_per_au, 0.4, label="all-on constant", color="grey")
  ax.set(xticks=x, ylim=(0, 1), ylabel="F1", title="Per-AU F1")
  ax.set_xticklabels(vocabulary.AU_NAMES)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(out_dir: str, scores: dict, collected: dict, *, num_expr_classes: int,
                 title: str, details: dict | None = None) -> str:
  """Writes report.md and its plots into out_dir; returns the report's path."""
  os.makedirs(out_dir, exist_ok=True)
  baseline = constant_predictor_scores(collected, num_expr_classes)
  lines = [f"# {title}", "", "| score | model | constant predictor |", "|---|---|---|"]
  for key, label in SCORE_ROWS:
    if key in scores:
      lines.append(f"| {label} | {_fixed(scores[key])} | "
                   f"{_fixed(baseline.get(key, 0.0))} |")
  lines.append("")
  if "expr_f1_per_class" in scores:
    names = vocabulary.expression_names(num_expr_classes)
    lines += ["| expression F1 | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names),
              "| model | " + " | ".join(_fixed(v) for v in scores["expr_f1_per_class"])
              + " |", ""]
  if "expr_confusion" in scores:
    names = vocabulary.expression_names(num_expr_classes)
    plot_confusion(scores["expr_confusion"], names, os.path.join(out_dir,
                                                                 "confusion.png"))
    lines += ["![expression confusion matrix](confusion.png)", ""]
  if "pred_va" in collected:
    plot_va_density(collected["pred_va"], collected["valence_arousal"],
                    collected["va_mask"], scores, os.path.join(out_dir, "va_density.png"))
    lines += ["![valence-arousal density](va_density.png)", ""]
  if "au_f1_per_au" in scores:
    plot_au_f1(scores["au_f1_per_au"], baseline["au_f1_per_au"],
               os.path.join(out_dir, "au_f1.png"))
    lines += ["![per-AU F1](au_f1.png)", ""]
  for key, value in (details or {}).items():
    lines.append(f"- {key}: {value}")
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
