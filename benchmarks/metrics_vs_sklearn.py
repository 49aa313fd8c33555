"""ABAW metrics over 1M frames: affect_jax's jitted streaming statistics against
scikit-learn's f1_score and a NumPy float64 CCC, same data, same run.

  taskset -c 0 python benchmarks/metrics_vs_sklearn.py --frames 1000000 \
      --out benchmarks/results/metrics_vs_sklearn.jsonl

affect_jax: `metrics.batch_statistics` (jitted, one call per batch of `--batch` frames)
+ accumulation + `compute_scores` (expression macro F1 and confusion, per-AU F1 at 0.5,
AU score histograms for threshold search, CCC of valence and arousal). Contenders:
  affect_jax_on_device     outputs already on the device (as in the eval step), the
                           statistics of every batch fetched and added on the host
                           (`StatisticsAccumulator`; the earlier eval loop);
  affect_jax_device_totals the same, totals kept on the device
                           (`DeviceStatisticsAccumulator`, one fetch at the end);
  affect_jax_with_copy     as on_device, plus the host-to-device copy of every batch;
  baseline_*               on_device / device_totals with `batch_statistics` from
                           affect_jax/eval/metrics.py (affect_jax/metrics.py before
                           the package split) at git revision `--baseline-rev` (the
                           formulation before the XLA:CPU rewrite), loaded with
                           `git show`; skipped where that fails.
Reference: the same scores with sklearn.metrics.f1_score (masked, macro over the 8
classes with every class counted, binary per AU) and CCC in float64 NumPy, on the whole
arrays at once. Scores of every contender are checked to agree. Interleaved rounds,
medians.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax
import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax.eval import accumulators, metrics  # noqa: E402

NUM_CLASSES, NUM_AUS = 8, 12


def make_data(frames: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  expression = rng.integers(0, NUM_CLASSES, frames).astype(np.int32)
  au = (rng.random((frames, NUM_AUS)) < 0.3).astype(np.float32)
  va = np.clip(rng.normal(0.2, 0.4, (frames, 2)), -1, 1).astype(np.float32)
  return {
      "outputs": {
          "expression": (rng.normal(size=(frames, NUM_CLASSES))
                         + 2.0 * np.eye(NUM_CLASSES)[expression]).astype(np.float32),
          "au": (rng.normal(size=(frames, NUM_AUS)) + 2.0 * (au - 0.5)).astype(np.float32),
          "va": np.clip(va + rng.normal(0, 0.3, va.shape), -1, 1).astype(np.float32),
      },
      "labels": {
          "expression": expression,
          "expression_mask": (rng.random(frames) < 0.7).astype(np.float32),
          "au": au, "au_mask": (rng.random((frames, NUM_AUS)) < 0.6).astype(np.float32),
          "valence_arousal": va, "va_mask": (rng.random(frames) < 0.8).astype(np.float32),
      },
  }


def batches(data: dict, batch: int):
  frames = len(data["labels"]["expression"])
  for start in range(0, frames - batch + 1, batch):
    yield ({k: v[start:start + batch] for k, v in data["outputs"].items()},
           {k: v[start:start + batch] for k, v in data["labels"].items()})


def load_baseline_metrics(revision: str):
  """The metrics module at `revision`, or None (not a git checkout)."""
  try:
    return bench_common.modules_at(["affect_jax/eval/metrics.py"], revision)[0]
  except (OSError, subprocess.CalledProcessError) as e:
    print(f"no baseline ({revision}): {e}", file=sys.stderr)
    return None


def device_totals_scores(device_batches, statistics_fn, module=metrics) -> dict:
  """`module`: where compute_scores comes from (the baseline's reads its own keys)."""
  accumulator = accumulators.DeviceStatisticsAccumulator()
  for outputs, labels in device_batches:
    accumulator.add(statistics_fn(outputs, labels), frames=len(labels["expression"]))
  return module.compute_scores(accumulator.result())


def affect_jax_scores(device_batches, statistics_fn, module=metrics) -> dict:
  accumulator = accumulators.StatisticsAccumulator()
  pending = None
  for outputs, labels in device_batches:
    statistics = statistics_fn(outputs, labels)
    if pending is not None:  # fetch the previous batch while this one computes
      accumulator.add(pending)
    pending = statistics
  accumulator.add(pending)
  return module.compute_scores(accumulator.result())


def sklearn_scores(data: dict, frames: int) -> dict:
  outputs = {k: v[:frames] for k, v in data["outputs"].items()}
  labels = {k: v[:frames] for k, v in data["labels"].items()}
  valid = labels["expression_mask"] > 0
  expr_f1 = f1_score(labels["expression"][valid],
                     outputs["expression"][valid].argmax(-1),
                     labels=list(range(NUM_CLASSES)), average="macro", zero_division=0)
  au_f1 = []
  predicted = outputs["au"] >= 0.0  # sigmoid(x) >= 0.5
  for a in range(NUM_AUS):
    mask = labels["au_mask"][:, a] > 0
    au_f1.append(f1_score(labels["au"][mask, a] > 0.5, predicted[mask, a],
                          zero_division=0))
  mask = labels["va_mask"] > 0
  ccc = []
  for d in range(2):
    x = outputs["va"][mask, d].astype(np.float64)
    y = labels["valence_arousal"][mask, d].astype(np.float64)
    mx, my = x.mean(), y.mean()
    cov = np.mean((x - mx) * (y - my))
    ccc.append(2 * cov / (x.var() + y.var() + (mx - my) ** 2))
  return {"expr_f1": float(expr_f1), "au_f1": float(np.mean(au_f1)),
          "ccc_valence": float(ccc[0]), "ccc_arousal": float(ccc[1])}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--frames", type=int, default=1_000_000)
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--baseline-rev", default="3de3617",
                      help="git revision whose batch_statistics is the baseline peer")
  args = bench_common.parse_args(parser)
  data = make_data(args.frames)
  frames = args.frames // args.batch * args.batch  # whole batches for both sides
  statistics_fn = jax.jit(lambda o, l: metrics.batch_statistics(
      o, l, num_expr_classes=NUM_CLASSES))
  host_batches = list(batches(data, args.batch))
  device_batches = [jax.device_put(b) for b in host_batches]
  jax.block_until_ready(device_batches)
  contenders = {
      "affect_jax_on_device": lambda: affect_jax_scores(device_batches, statistics_fn),
      "affect_jax_device_totals": lambda: device_totals_scores(device_batches,
                                                               statistics_fn),
      "affect_jax_with_copy": lambda: affect_jax_scores(host_batches, statistics_fn),
      "sklearn_numpy": lambda: sklearn_scores(data, frames),
  }
  baseline = load_baseline_metrics(args.baseline_rev)
  if baseline is not None:
    baseline_fn = jax.jit(lambda o, l: baseline.batch_statistics(
        o, l, num_expr_classes=NUM_CLASSES))
    contenders["baseline_on_device"] = lambda: affect_jax_scores(
        device_batches, baseline_fn, baseline)
    contenders["baseline_device_totals"] = lambda: device_totals_scores(
        device_batches, baseline_fn, baseline)
  results = {name: fn() for name, fn in contenders.items()}  # warm-up, compile
  reference = results["sklearn_numpy"]
  agreement = {(name, key): abs(scores[key] - value)
               for name, scores in results.items() for key, value in reference.items()}
  assert max(agreement.values()) < 1e-6, agreement
  load_before = bench_common.load()
  times = {name: [] for name in contenders}
  for round_index in range(args.rounds):
    names = list(contenders) if round_index % 2 == 0 else list(contenders)[::-1]
    for name in names:
      times[name].append(bench_common.timed(contenders[name]))
  row = bench_common.machine()
  row.update({"benchmark": "metrics_vs_sklearn", "frames": frames, "batch": args.batch,
              "jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "load_before": load_before,
              "rounds": args.rounds,
              "max_abs_score_difference": max(agreement.values())})
  for name, values in times.items():
    row[f"{name}_s"] = round(bench_common.median(values), 4)
    row[f"{name}_frames_per_s"] = round(frames / bench_common.median(values))
  sklearn_s = bench_common.median(times["sklearn_numpy"])
  for name in contenders:
    if name != "sklearn_numpy":
      row[f"{name}_speedup_over_sklearn"] = round(
          sklearn_s / bench_common.median(times[name]), 1)
  if baseline is not None:
    row["baseline_rev"] = args.baseline_rev
    for how in ("on_device", "device_totals"):
      row[f"{how}_speedup_over_baseline"] = round(
          bench_common.median(times[f"baseline_{how}"])
          / bench_common.median(times[f"affect_jax_{how}"]), 2)
  row["load_after"] = bench_common.load()
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
