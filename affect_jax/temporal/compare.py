"""Whether one model beats another beyond noise: paired differences of exact scores with
bootstrap confidence intervals over videos.

Frames of a video are not independent, so the unit of resampling is the video. Scores
are functions of sufficient statistics that add over frames (metrics.py), so each
video's statistics are computed once and a bootstrap replicate is a weighted sum of
them: exact scores for every resample, no frame revisited. Both models are scored on the
same resampled videos (a paired bootstrap); a model given as several runs (seeds) scores
the mean of its runs' scores on each resample. The trained networks stay fixed, so the
interval is that of the sampling of videos only: how far a difference would move with
other seeds needs an interval over the seeds (the study report gives both).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from affect_jax.eval import metrics
from affect_jax.eval.accumulators import to_host
from affect_jax.inference.frame_table import FrameTable, logits_from_probabilities

Statistics = dict  # name -> [videos, ...] array of per-video sufficient statistics


def _outputs_and_labels(table: FrameTable, rows: np.ndarray) -> tuple[dict, dict]:
  """What metrics.batch_statistics takes, for `rows` of the table."""
  return (logits_from_probabilities(table, rows),
          {k: v[rows] for k, v in table.labels.items()})


@functools.partial(jax.jit, static_argnames=("num_expr_classes",))
def _statistics(outputs, labels, au_thresholds, num_expr_classes):
  return metrics.batch_statistics(outputs, labels, num_expr_classes=num_expr_classes,
                                  au_thresholds=au_thresholds)


def _padded(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`rows` padded to a power of two (one compiled shape per size class, not one per
  video length), and which of them are real."""
  size = max(64, 1 << int(np.ceil(np.log2(max(len(rows), 1)))))
  padded = np.concatenate([rows, np.full(size - len(rows), rows[0])])
  return padded, np.arange(size) < len(rows)


def per_video_statistics(table: FrameTable, num_expr_classes: int, au_thresholds=None
                         ) -> tuple[list[str], Statistics]:
  """The videos of a labelled table (sorted) and their statistics stacked [V, ...]."""
  if table.labels is None:
    raise ValueError("per-video statistics need labels: predict a TFDS split")
  videos, inverse = np.unique(table.video, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  per_video = []
  for rows in np.split(order, np.cumsum(np.bincount(inverse))[:-1]):
    padded, real = _padded(rows)
    outputs, labels = _outputs_and_labels(table, padded)
    for key in ("expression_mask", "va_mask"):
      labels[key] = np.where(real, labels[key], 0.0)
    labels["au_mask"] = np.where(real[:, None], labels["au_mask"], 0.0)
    per_video.append(jax.device_get(_statistics(
        outputs, labels, None if au_thresholds is None else
        np.asarray(au_thresholds, np.float32), num_expr_classes)))
  return videos.tolist(), {k: np.stack([to_host(s[k]) for s in per_video])
                           for k in per_video[0]}


def common_videos(tables: dict[str, tuple[list[str], Statistics]]
                  ) -> dict[str, Statistics]:
  """Each model's statistics restricted to the videos every model has, in one order."""
  shared = sorted(set.intersection(*(set(videos) for videos, _ in tables.values())))
  if not shared:
    raise ValueError("the models share no video")
  chosen = {}
  for name, (videos, statistics) in tables.items():
    rows = [videos.index(v) for v in shared]
    chosen[name] = {k: v[rows] for k, v in statistics.items()}
  return chosen


def _weighted_sum(statistics: Statistics, weights: np.ndarray) -> Statistics:
  """[R, V] video weights -> R totals of each statistic (int64 counts stay exact)."""
  return {k: np.tensordot(weights.astype(v.dtype if v.dtype.kind in "iu" else
                                         np.float64), v, axes=(1, 0))
          for k, v in statistics.items()}


def _scores(statistics: Statistics, replicate: int | None, key: str) -> float:
  single = {k: v if replicate is None else v[replicate] for k, v in statistics.items()}
  return float(metrics.compute_scores(single)[key])


def mean_score(runs: Sequence[Statistics], key: str) -> float:
  """The mean over runs of each run's score over all its videos."""
  return float(np.mean([_scores({k: v.sum(0) for k, v in run.items()}, None, key)
                        for run in runs]))


def paired_difference(runs_a: Sequence[Statistics], runs_b: Sequence[Statistics],
                      key: str, *, replicates: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
  """Score `key` of model a minus model b (each the mean over its runs), with a
  percentile bootstrap interval over the videos; `clear` when the interval excludes
  0. All runs hold the same videos in the same order (`common_videos`)."""
  counts = {len(next(iter(run.values()))) for run in (*runs_a, *runs_b)}
  if len(counts) != 1:
    raise ValueError(f"runs hold different numbers of videos: {sorted(counts)}")
  num_videos = counts.pop()
  rng = np.random.default_rng(seed)
  weights = np.stack([np.bincount(rng.integers(0, num_videos, num_videos),
                                  minlength=num_videos) for _ in range(replicates)])
  totals_a = [_weighted_sum(run, weights) for run in runs_a]
  totals_b = [_weighted_sum(run, weights) for run in runs_b]
  differences = np.array([
      np.mean([_scores(t, r, key) for t in totals_a])
      - np.mean([_scores(t, r, key) for t in totals_b]) for r in range(replicates)])
  tail = (1.0 - confidence) / 2 * 100
  low, high = np.percentile(differences, [tail, 100 - tail])
  return {"score": key, "a": mean_score(runs_a, key), "b": mean_score(runs_b, key),
          "difference": mean_score(runs_a, key) - mean_score(runs_b, key),
          "low": float(low), "high": float(high),
          "clear": bool(low > 0 or high < 0), "videos": num_videos,
          "replicates": replicates, "confidence": confidence}


def format_difference(result: dict, names: tuple[str, str] = ("a", "b")) -> str:
  verdict = "clear of noise" if result["clear"] else "within noise"
  return (f"{result['score']}: {names[0]} {result['a']:.4f}, {names[1]} "
          f"{result['b']:.4f}, difference {result['difference']:+.4f} "
          f"[{result['low']:+.4f}, {result['high']:+.4f}] "
          f"({result['confidence']:.0%} over {result['videos']} videos): {verdict}")
