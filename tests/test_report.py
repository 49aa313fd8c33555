"""The run report: constant-predictor baselines and the files it writes."""
import numpy as np
import pytest

from affect_jax.eval import metrics, report


def collected_frames(rng, n=400):
  expression = rng.choice(8, n, p=[.4, .05, .05, .05, .15, .1, .1, .1]).astype(np.int32)
  au = (rng.random((n, 12)) < 0.2).astype(np.float32)
  va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  return {
      "record_index": np.arange(n), "expression": expression,
      "expression_mask": (rng.random(n) < 0.8).astype(np.float32), "au": au,
      "au_mask": np.ones((n, 12), np.float32), "valence_arousal": va,
      "va_mask": (rng.random(n) < 0.7).astype(np.float32),
      "pred_expression": rng.normal(size=(n, 8)).astype(np.float32),
      "pred_au": rng.normal(size=(n, 12)).astype(np.float32),
      "pred_va": np.clip(va + rng.normal(0, .3, va.shape), -1, 1).astype(np.float32),
  }


def test_constant_predictors_are_the_best_label_blind_ones():
  collected = collected_frames(np.random.default_rng(0))
  baseline = report.constant_predictor_scores(collected, 8)
  valid = collected["expression_mask"] > 0
  counts = np.bincount(collected["expression"][valid], minlength=8)
  majority_f1 = 2 * counts.max() / (counts.sum() + counts.max()) / 8
  assert baseline["expr_f1"] == pytest.approx(majority_f1)
  positives = collected["au"].mean(0)
  assert baseline["au_f1"] == pytest.approx(np.mean(2 * positives / (1 + positives)))
  assert baseline["p_va"] == pytest.approx(0.0, abs=1e-6)


def test_report_writes_table_and_plots(tmp_path):
  collected = collected_frames(np.random.default_rng(1))
  outputs = {"expression": collected["pred_expression"], "au": collected["pred_au"],
             "va": collected["pred_va"]}
  scores = metrics.compute_scores(metrics.batch_statistics(outputs, collected))
  path = report.write_report(str(tmp_path), scores, collected, num_expr_classes=8,
                             title="t", details={"steps": 3})
  text = open(path).read()
  assert f"| P_VA | {scores['p_va']:.4f} |" in text and "- steps: 3" in text
  for name in ("confusion.png", "va_density.png", "au_f1.png"):
    assert (tmp_path / name).stat().st_size > 10_000


def test_report_rows_follow_the_model_tasks(tmp_path):
  """A VA-only model has no P_MTL row; an EXPR model shows ABAW1/2's blend and the F1
  of each class."""
  collected = collected_frames(np.random.default_rng(2))
  va_only = metrics.compute_scores(metrics.batch_statistics(
      {"va": collected["pred_va"]}, collected))
  text = open(report.write_report(str(tmp_path / "va"), va_only, {
      k: v for k, v in collected.items() if k not in ("pred_expression", "pred_au")},
      num_expr_classes=8, title="va")).read()
  assert "P_VA" in text and "P_MTL" not in text and "ABAW1/2" not in text
  expr = metrics.compute_scores(metrics.batch_statistics(
      {"expression": collected["pred_expression"]}, collected))
  text = open(report.write_report(str(tmp_path / "expr"), expr, {
      k: v for k, v in collected.items() if k not in ("pred_va", "pred_au")},
      num_expr_classes=8, title="expr")).read()
  assert f"| EXPR 0.67 F1 + 0.33 accuracy (ABAW1/2) | {expr['p_expr_abaw2']:.4f} |" \
      in text
  assert "| model | " + " | ".join(f"{v:.4f}" for v in expr["expr_f1_per_class"]) \
      in text
