"""Per-AU decision thresholds tuned on a labelled split (saved beside the run's
checkpoints, used by later predictions) and the measurement of smoothing windows."""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import numpy as np

from affect_jax.eval import accumulators, metrics
from affect_jax.inference.frame_table import (
  FrameTable,
  check_window,
  predict_frames,
  smooth_table,
  table_scores,
  table_statistics,
)
from affect_jax.inference.restore import restore_predictor
from affect_jax.inference.sources import open_source
from tfds_affwild2 import annotations

log = logging.getLogger(__name__)


THRESHOLDS_FILE = "au_thresholds.json"


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
  accumulator = accumulators.StatisticsAccumulator()
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
    return default, f"default 0.5 ({path} does not exist: affect-jax tune writes it)"
  with open(path) as f:
    saved = json.load(f)
  if saved["step"] != step or saved.get("au_smoothing_window", 1) != au_smoothing_window:
    log.warning("%s was tuned for step %s with AU smoothing window %s, not step %d "
                "with window %d: using 0.5; run --mode tune again", path, saved["step"],
                saved.get("au_smoothing_window", 1), step, au_smoothing_window)
    return default, f"default 0.5 ({path} is for another step or AU smoothing)"
  return np.asarray(saved["thresholds"], np.float32), path


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


