"""Metrics from sufficient statistics against independent references.

References: scikit-learn for F1 and accuracy, a float64 NumPy CCC written here. The
statistics must give the same scores from one batch, many accumulated batches and eight
devices.
"""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from sklearn.metrics import accuracy_score, f1_score

from affect_jax.eval import accumulators, metrics

NUM_CLASSES = 8
NUM_AUS = 12
TOLERANCE = 1e-6


def reference_ccc(predictions, labels):
  """Float64 CCC with population moments; 0 when undefined (as the metric promises)."""
  x = np.asarray(predictions, np.float64)
  y = np.asarray(labels, np.float64)
  if x.size == 0:
    return 0.0
  denominator = x.var() + y.var() + (x.mean() - y.mean()) ** 2
  covariance = np.mean((x - x.mean()) * (y - y.mean()))
  return 0.0 if denominator == 0 else 2.0 * covariance / denominator


def away_from_zero(logits, margin=1e-3):
  """Keep logits off the 0.5-probability decision edge, where float32 rounding of the
  sigmoid could flip a comparison between this test and the device."""
  return np.where(np.abs(logits) < margin, np.sign(logits + 1e-12) * margin, logits)


def make_data(seed, num_frames, *, absent_class=NUM_CLASSES - 1):
  """Random outputs and labels with random masks and garbage under the masks.

  Class `absent_class` is neither a label nor a prediction: its F1 of 0 must still be
  averaged in. Class 0 is labelled but never predicted.
  """
  rng = np.random.default_rng(seed)
  labels_expr = rng.integers(0, NUM_CLASSES - 1, num_frames)
  logits_expr = rng.normal(size=(num_frames, NUM_CLASSES)) + 1.5 * np.eye(NUM_CLASSES)[labels_expr]
  logits_expr[:, [0, absent_class]] = -10.0
  expr_mask = rng.random(num_frames) < 0.7
  au = (rng.random((num_frames, NUM_AUS)) < np.linspace(0.05, 0.6, NUM_AUS)).astype(np.float32)
  au_logits = away_from_zero(2.0 * (au - 0.4) + rng.normal(size=au.shape))
  au_mask = rng.random((num_frames, NUM_AUS)) < 0.8
  va = rng.uniform(-1, 1, (num_frames, 2))
  va_pred = np.tanh(0.8 * va + rng.normal(0.1, 0.4, va.shape))
  va_mask = rng.random(num_frames) < 0.6

  outputs = {"expression": logits_expr.astype(np.float32),
             "au": au_logits.astype(np.float32),
             "va": va_pred.astype(np.float32)}
  batch = {
      "expression": np.where(expr_mask, labels_expr, -1).astype(np.int32),
      "expression_mask": expr_mask.astype(np.float32),
      "au": np.where(au_mask, au, -1.0).astype(np.float32),
      "au_mask": au_mask.astype(np.float32),
      "valence_arousal": np.where(va_mask[:, None], va, np.nan).astype(np.float32),
      "va_mask": va_mask.astype(np.float32),
  }
  return outputs, batch


def reference_scores(outputs, batch):
  expr_valid = batch["expression_mask"] > 0
  true_expr = batch["expression"][expr_valid]
  predicted_expr = outputs["expression"][expr_valid].argmax(-1)
  probabilities = np.asarray(jax.nn.sigmoid(outputs["au"]))
  au_f1 = []
  for au in range(NUM_AUS):
    valid = batch["au_mask"][:, au] > 0
    au_f1.append(f1_score(batch["au"][valid, au], probabilities[valid, au] >= 0.5,
                          zero_division=0))
  au_valid = batch["au_mask"] > 0
  va_valid = batch["va_mask"] > 0
  ccc = [reference_ccc(outputs["va"][va_valid, d], batch["valence_arousal"][va_valid, d])
         for d in range(2)]
  return {
      "expr_f1": f1_score(true_expr, predicted_expr, labels=range(NUM_CLASSES),
                          average="macro", zero_division=0),
      "expr_accuracy": accuracy_score(true_expr, predicted_expr),
      "au_f1_per_au": au_f1,
      "au_f1": np.mean(au_f1),
      "au_accuracy": accuracy_score(batch["au"][au_valid], probabilities[au_valid] >= 0.5),
      "ccc_valence": ccc[0],
      "ccc_arousal": ccc[1],
      "p_va": np.mean(ccc),
  }


def assert_scores_match(scores, expected):
  for key, value in expected.items():
    np.testing.assert_allclose(scores[key], value, atol=TOLERANCE, rtol=0, err_msg=key)
  np.testing.assert_allclose(
      scores["p_mtl"], expected["p_va"] + expected["expr_f1"] + expected["au_f1"],
      atol=TOLERANCE, rtol=0)


statistics_fn = jax.jit(functools.partial(metrics.batch_statistics,
                                          num_expr_classes=NUM_CLASSES))


@pytest.fixture(scope="module")
def data():
  return make_data(seed=0, num_frames=2048)


def test_one_batch_matches_references(data):
  outputs, batch = data
  scores = metrics.compute_scores(statistics_fn(outputs, batch))
  assert_scores_match(scores, reference_scores(outputs, batch))
  assert scores["expr_f1_per_class"][NUM_CLASSES - 1] == 0.0  # absent class
  assert scores["expr_f1_per_class"][0] == 0.0  # labelled, never predicted
  confusion = np.array(scores["expr_confusion"])
  assert confusion.sum() == int(batch["expression_mask"].sum())


def test_absent_class_is_averaged_in(data):
  outputs, batch = data
  scores = metrics.compute_scores(statistics_fn(outputs, batch))
  valid = batch["expression_mask"] > 0
  true_expr, predicted = batch["expression"][valid], outputs["expression"][valid].argmax(-1)
  # scikit-learn's default (classes seen only) differs: the absent class must count.
  seen_only = f1_score(true_expr, predicted, average="macro", zero_division=0)
  assert scores["expr_f1"] == pytest.approx(seen_only * 7 / 8, abs=TOLERANCE)


def test_accumulated_batches_equal_one_batch(data):
  outputs, batch = data
  whole = {k: np.asarray(v) for k, v in statistics_fn(outputs, batch).items()}
  accumulator = accumulators.StatisticsAccumulator()
  edges = [0, 1, 100, 357, 1024, 1500, 2048]  # uneven batches, one of a single frame
  for start, stop in zip(edges[:-1], edges[1:]):
    part = lambda tree: {k: v[start:stop] for k, v in tree.items()}  # noqa: E731
    accumulator.add(statistics_fn(part(outputs), part(batch)))
  summed = accumulator.result()
  for key, value in whole.items():
    if np.issubdtype(value.dtype, np.integer):
      assert summed[key].dtype == np.int64
      np.testing.assert_array_equal(summed[key], value, err_msg=key)
  assert_scores_match(metrics.compute_scores(summed), reference_scores(outputs, batch))


@pytest.mark.parametrize("max_frames", [700, 1500, accumulators.MAX_FRAMES_PER_DEVICE_TOTAL])
def test_device_totals_equal_host_totals_whenever_they_are_fetched(data, max_frames):
  outputs, batch = data
  host, device = accumulators.StatisticsAccumulator(), accumulators.DeviceStatisticsAccumulator(
      max_frames)
  fetched = []
  original_get = jax.device_get
  edges = [0, 1, 100, 357, 1024, 1500, 2048]
  for start, stop in zip(edges[:-1], edges[1:]):
    part = lambda tree: {k: v[start:stop] for k, v in tree.items()}  # noqa: E731
    statistics = statistics_fn(part(outputs), part(batch))
    host.add(statistics)
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(jax, "device_get",
                    lambda tree: (fetched.append(stop), original_get(tree))[1])
      device.add(statistics, frames=stop - start)
  summed, expected = device.result(), host.result()
  assert summed.keys() == expected.keys()
  for key, value in expected.items():
    assert summed[key].dtype == value.dtype
    np.testing.assert_allclose(summed[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
    if np.issubdtype(value.dtype, np.integer):
      np.testing.assert_array_equal(summed[key], value, err_msg=key)
  assert_scores_match(metrics.compute_scores(summed), reference_scores(outputs, batch))
  # fetched (while adding the batch ending at these frames) only when that batch would
  # take the totals past max_frames
  assert fetched == {700: [1024, 1500, 2048], 1500: [2048]}.get(max_frames, [])
  with pytest.raises(ValueError, match="more frames"):
    accumulators.DeviceStatisticsAccumulator(100).add(statistics, frames=548)


def test_eight_devices_equal_one_device(data):
  outputs, batch = data
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(devices, ("data",))
  sharded_fn = jax.jit(jax.shard_map(
      functools.partial(metrics.batch_statistics, num_expr_classes=NUM_CLASSES,
                        axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  sharded = sharded_fn(outputs, batch)
  whole = statistics_fn(outputs, batch)
  for key, value in whole.items():
    if np.issubdtype(value.dtype, np.integer):
      np.testing.assert_array_equal(sharded[key], value, err_msg=key)
  assert_scores_match(metrics.compute_scores(sharded), reference_scores(outputs, batch))


def test_ccc_exact_when_means_dwarf_spread():
  # Raw float32 sums lose the variance here (CCC off by ~1e-5); the split sums must not.
  rng = np.random.default_rng(1)
  labels = (0.7 + 0.1 * rng.normal(size=(50_000, 2))).astype(np.float32)
  predictions = (0.8 + 0.05 * rng.normal(size=labels.shape) + 0.02 * labels).astype(np.float32)
  mask = np.ones(len(labels), np.float32)
  scores = metrics.compute_scores(jax.jit(metrics.va_statistics)(predictions, labels, mask))
  for dimension, key in enumerate(("ccc_valence", "ccc_arousal")):
    expected = reference_ccc(predictions[:, dimension], labels[:, dimension])
    assert scores[key] == pytest.approx(expected, abs=TOLERANCE)


def test_all_masked_gives_zeros_not_nan(data):
  outputs, batch = data
  batch = dict(batch, expression_mask=np.zeros_like(batch["expression_mask"]),
               au_mask=np.zeros_like(batch["au_mask"]),
               va_mask=np.zeros_like(batch["va_mask"]))
  scores = metrics.compute_scores(statistics_fn(outputs, batch))
  for key in ("ccc_valence", "ccc_arousal", "p_va", "expr_f1", "expr_accuracy", "au_f1",
              "au_accuracy", "p_mtl"):
    assert scores[key] == 0.0, key
  assert scores["au_f1_per_au"] == [0.0] * NUM_AUS


def test_constant_predictions_give_zero_ccc():
  # Equal constants make every CCC moment 0: the score is 0, not NaN or noise.
  values = np.full((64, 2), 0.3, np.float32)
  scores = metrics.compute_scores(
      metrics.va_statistics(values, values, np.ones(64, np.float32)))
  assert scores["ccc_valence"] == 0.0 and scores["ccc_arousal"] == 0.0


def test_only_tasks_present_are_scored_and_p_mtl_needs_all_three(data):
  outputs, batch = data
  scores = metrics.compute_scores(metrics.batch_statistics({"va": outputs["va"]}, batch))
  assert set(scores) == {"ccc_valence", "ccc_arousal", "p_va"}  # no p_mtl = p_va
  scores = metrics.compute_scores(metrics.batch_statistics(
      {"expression": outputs["expression"], "au": outputs["au"]}, batch))
  assert "p_va" not in scores and "p_mtl" not in scores and "au_f1" in scores
  assert metrics.compute_scores({}) == {}


def test_abaw2_blends_and_per_class_scores(data):
  outputs, batch = data
  scores = metrics.compute_scores(statistics_fn(outputs, batch))
  expected = reference_scores(outputs, batch)
  assert scores["p_expr_abaw2"] == pytest.approx(
      0.67 * expected["expr_f1"] + 0.33 * expected["expr_accuracy"], abs=TOLERANCE)
  assert scores["p_au_abaw2"] == pytest.approx(
      0.5 * expected["au_f1"] + 0.5 * expected["au_accuracy"], abs=TOLERANCE)
  valid = batch["expression_mask"] > 0
  per_class = f1_score(batch["expression"][valid],
                       outputs["expression"][valid].argmax(-1),
                       labels=range(NUM_CLASSES), average=None, zero_division=0)
  np.testing.assert_allclose(scores["expr_f1_per_class"], per_class, atol=TOLERANCE)
  # p_mtl sums the ABAW3+ scores, never the blends.
  assert scores["p_mtl"] == pytest.approx(
      scores["p_va"] + scores["expr_f1"] + scores["au_f1"], abs=1e-12)


def test_aus_the_data_does_not_annotate_leave_the_mean(data):
  """ABAW1 labels 7 of the 12 AUs (AU7, AU10, AU23, AU24, AU26 never): their masks are
  all off, and the mean AU F1 is over the annotated ones, as that challenge scored."""
  outputs, batch = data
  unannotated = [4, 5, 8, 9, 11]
  au_mask = batch["au_mask"].copy()
  au_mask[:, unannotated] = 0
  scores = metrics.compute_scores(statistics_fn(outputs, dict(batch, au_mask=au_mask)))
  probabilities = np.asarray(jax.nn.sigmoid(outputs["au"]))
  annotated_f1 = [f1_score(batch["au"][au_mask[:, au] > 0, au],
                           probabilities[au_mask[:, au] > 0, au] >= 0.5, zero_division=0)
                  for au in range(NUM_AUS) if au not in unannotated]
  assert scores["au_f1"] == pytest.approx(np.mean(annotated_f1), abs=TOLERANCE)
  assert [scores["au_f1_per_au"][au] for au in unannotated] == [0.0] * 5
  assert len(scores["au_f1_per_au"]) == NUM_AUS


def tiny_spread_va(centre, spread=3e-5, frames=4096, batches=1):
  rng = np.random.default_rng(7)
  labels = (centre + spread * rng.normal(size=(frames, 2))).astype(np.float32)
  predictions = (labels.astype(np.float64) + 0.2 * spread * rng.normal(size=labels.shape)
                 ).astype(np.float32)
  statistics_fn = jax.jit(metrics.va_statistics)
  accumulator = accumulators.DeviceStatisticsAccumulator()
  for part in np.array_split(np.arange(frames), batches):
    accumulator.add(statistics_fn(predictions[part], labels[part],
                                  np.ones(len(part), np.float32)), len(part))
  scores = metrics.compute_scores(accumulator.result())
  expected = [reference_ccc(predictions[:, d], labels[:, d]) for d in range(2)]
  return [scores["ccc_valence"], scores["ccc_arousal"]], expected


@pytest.mark.parametrize("centre", [0.5, 0.51, -0.25, 0.0, 0.7310059, -0.9876543, 1.0])
def test_ccc_at_tiny_spreads_matches_float64(centre):
  """Labels c +- 3e-5 anywhere in [-1, 1]: the variance is 1e-9 of the mean square, and
  the CCC is float64 NumPy's (~0.98), not 0. (A 1/32 integer grid with float32
  remainders resolved it on the grid only: 0.51 gave 0.)"""
  ccc, expected = tiny_spread_va(centre)
  assert min(expected) > 0.97
  np.testing.assert_allclose(ccc, expected, atol=1e-5, rtol=0)


def test_ccc_at_tinier_spreads_over_many_batches_matches_float64():
  """1e-6 around 0.37 (a variance of 1e-12), summed over 20 batches on the device."""
  ccc, expected = tiny_spread_va(0.37, spread=1e-6, frames=20_000, batches=20)
  assert min(expected) > 0.9
  np.testing.assert_allclose(ccc, expected, atol=1e-3, rtol=0)


def test_va_integer_terms_stay_below_their_bound():
  """The int32 sums' frame limits assume every per-frame integer term is below
  VA_MAX_INTEGER_TERM; the extremes of [-1, 1] and values beyond it reach the largest."""
  values = np.array([[-2.0, 2.0], [2.0, -2.0], [1.9999999, -1.9999999], [2.5, -30.0],
                     [-0.5078125, 0.4921875], [0.0078125, -0.0078125]], np.float32)
  for row in values:
    batch = np.repeat(row[None], 1, axis=0)
    statistics = metrics.va_statistics(batch, batch[:, ::-1], np.ones(1, np.float32))
    assert np.abs(np.asarray(statistics["va_int"])).max() < metrics.VA_MAX_INTEGER_TERM
  assert (accumulators.MAX_FRAMES_PER_DEVICE_TOTAL * metrics.VA_MAX_INTEGER_TERM
          < 2 ** 31 <= (accumulators.MAX_FRAMES_PER_DEVICE_TOTAL + 1)
          * metrics.VA_MAX_INTEGER_TERM)


def test_va_values_beyond_the_unit_range_are_summed():
  """Predictions outside [-2, 2] (an unbounded VA head) keep their excess in the
  remainders: the CCC is still float64's."""
  rng = np.random.default_rng(3)
  labels = rng.uniform(-1, 1, size=(3000, 2)).astype(np.float32)
  predictions = (2.5 * labels + 0.3 * rng.normal(size=labels.shape)).astype(np.float32)
  scores = metrics.compute_scores(jax.jit(metrics.va_statistics)(
      predictions, labels, np.ones(len(labels), np.float32)))
  for dimension, key in enumerate(("ccc_valence", "ccc_arousal")):
    assert scores[key] == pytest.approx(
        reference_ccc(predictions[:, dimension], labels[:, dimension]), abs=1e-6)


def test_constant_equal_values_give_zero_ccc_after_many_batches():
  """Device totals of many batches round more than one batch; equal constants still
  give 0, not the ratio of two rounding errors."""
  values = np.full((512, 2), 0.2739, np.float32)
  statistics = jax.jit(metrics.va_statistics)(values, values, np.ones(512, np.float32))
  accumulator = accumulators.DeviceStatisticsAccumulator()
  for _ in range(300):
    accumulator.add(jax.tree.map(lambda a: a + 0, statistics), 512)
  scores = metrics.compute_scores(accumulator.result())
  assert scores["ccc_valence"] == 0.0 and scores["ccc_arousal"] == 0.0


def test_au_thresholds_override(data):
  outputs, batch = data
  thresholds = np.linspace(0.2, 0.8, NUM_AUS).astype(np.float32)
  statistics = metrics.batch_statistics({"au": outputs["au"]}, batch,
                                        au_thresholds=thresholds)
  scores = metrics.compute_scores(statistics)
  probabilities = np.asarray(jax.nn.sigmoid(outputs["au"]))
  for au in range(NUM_AUS):
    valid = batch["au_mask"][:, au] > 0
    expected = f1_score(batch["au"][valid, au], probabilities[valid, au] >= thresholds[au],
                        zero_division=0)
    assert scores["au_f1_per_au"][au] == pytest.approx(expected, abs=TOLERANCE)


def test_best_au_thresholds_match_brute_force_search():
  num_bins, num_frames = 100, 1500
  rng = np.random.default_rng(2)
  labels = (rng.random((num_frames, NUM_AUS)) < np.linspace(0.05, 0.5, NUM_AUS)).astype(np.float32)
  # Scores kept at least 1e-4 away from every bin edge, so float32 rounding of the
  # sigmoid cannot move a score across an edge between this test and the device.
  bins = np.clip(np.round(num_bins * (0.5 + 0.25 * (labels - 0.3)
                                      + 0.2 * rng.normal(size=labels.shape))), 0, num_bins - 1)
  probabilities = (bins + rng.uniform(0.01, 0.99, labels.shape)) / num_bins
  logits = np.log(probabilities / (1 - probabilities)).astype(np.float32)
  mask = (rng.random(labels.shape) < 0.9).astype(np.float32)
  mask[:, 3] = 0.0  # an AU with no valid label: F1 0 everywhere, threshold stays 0.5
  statistics = metrics.au_statistics(logits, labels, mask, num_histogram_bins=num_bins)
  histograms = np.asarray(statistics["au_hist"])
  thresholds, best_f1 = metrics.best_au_thresholds(histograms[:, 1], histograms[:, 0])
  f1_at_half = metrics.compute_scores(statistics)["au_f1_per_au"]
  edges = np.arange(num_bins) / num_bins
  for au in range(NUM_AUS):
    valid = mask[:, au] > 0
    if not valid.any():
      continue
    searched = [f1_score(labels[valid, au], probabilities[valid, au] >= edge, zero_division=0)
                for edge in edges]
    assert best_f1[au] == pytest.approx(max(searched), abs=TOLERANCE)
    at_chosen = f1_score(labels[valid, au], probabilities[valid, au] >= thresholds[au],
                         zero_division=0)
    assert at_chosen == pytest.approx(best_f1[au], abs=TOLERANCE)
    assert best_f1[au] >= f1_at_half[au] - TOLERANCE
  assert thresholds[3] == 0.5 and best_f1[3] == 0.0
  assert np.mean(best_f1) > np.mean(f1_at_half) + 0.01  # the search does find gains


def reference_va_digits(values):
  """int64 [4, N, 2]: the four digits of each value (units 2^-5, 2^-11, 2^-17, 2^-23),
  each rounding what the earlier ones left, after clipping to [-2, 2]; float64 here."""
  rest, digits = np.clip(np.asarray(values, np.float64), -2, 2), []
  for scale in (2.0 ** 5, 2.0 ** 11, 2.0 ** 17, 2.0 ** 23):
    digit = np.round(rest * scale)
    rest = rest - digit / scale
    digits.append(digit)
  return np.stack(digits).astype(np.int64)


def reference_digit_products(a, b):
  """int64 [7, N, 2]: products of digits grouped by the sum of their positions."""
  groups = np.zeros((7, *a.shape[1:]), np.int64)
  for i in range(4):
    for j in range(4):
      groups[i + j] += a[i] * b[j]
  return groups


@pytest.mark.parametrize("num_frames", [metrics.EXACT_FLOAT32_SUM_FRAMES,
                                        metrics.EXACT_FLOAT32_SUM_FRAMES + 1, 40_000])
def test_integer_statistics_exact_past_float32_integers(num_frames):
  # Predictions near +-2 make the VA integer terms ~64^2 per frame: up to 2,048 frames
  # (summed in float32) the sums stay below 2^24; at 40,000 frames (summed as int32)
  # they pass it, where float32 sums would drop odd counts. Every integer statistic
  # must equal NumPy's int64 count.
  rng = np.random.default_rng(3)
  va = np.where(rng.random((num_frames, 2)) < 0.9,
                rng.choice([-1.0, 1.0], (num_frames, 2)) * rng.uniform(0.95, 1.0, (num_frames, 2)),
                rng.uniform(-1, 1, (num_frames, 2))).astype(np.float32)
  va_pred = np.clip(2 * va + rng.normal(0, 0.05, va.shape), -2, 2).astype(np.float32)
  va_mask = rng.random(num_frames) < 0.95
  labels_expr = rng.integers(0, NUM_CLASSES, num_frames)
  expr_mask = rng.random(num_frames) < 0.9
  au = (rng.random((num_frames, NUM_AUS)) < 0.4).astype(np.float32)
  au_mask = rng.random((num_frames, NUM_AUS)) < 0.9
  outputs = {"va": va_pred,
             "expression": rng.normal(size=(num_frames, NUM_CLASSES)).astype(np.float32),
             "au": away_from_zero(rng.normal(size=au.shape) + au - 0.5).astype(np.float32)}
  batch = {"valence_arousal": np.where(va_mask[:, None], va, np.nan).astype(np.float32),
           "va_mask": va_mask.astype(np.float32),
           "expression": labels_expr.astype(np.int32),
           "expression_mask": expr_mask.astype(np.float32),
           "au": au, "au_mask": au_mask.astype(np.float32)}
  statistics = {k: np.asarray(v) for k, v in statistics_fn(outputs, batch).items()}

  digits_x, digits_y = reference_va_digits(va_pred[va_mask]), reference_va_digits(va[va_mask])
  expected_va = np.concatenate([np.full((1, 2), va_mask.sum()), digits_x.sum(1),
                                digits_y.sum(1)] + [
      reference_digit_products(a, b).sum(1)
      for a, b in ((digits_x, digits_x), (digits_y, digits_y), (digits_x, digits_y))])
  if num_frames > 2 * metrics.EXACT_FLOAT32_SUM_FRAMES:
    assert np.abs(expected_va).max() > 2 ** 24  # past float32's integers
  np.testing.assert_array_equal(statistics["va_int"], expected_va)

  predicted = outputs["expression"].argmax(-1)
  expected_expr = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(expected_expr, (labels_expr[expr_mask], predicted[expr_mask]), 1)
  np.testing.assert_array_equal(statistics["expr_confusion"], expected_expr)

  positive, present = au > 0.5, outputs["au"] >= 0  # sigmoid(x) >= 0.5
  for label in (0, 1):
    for prediction in (0, 1):
      np.testing.assert_array_equal(
          statistics["au_confusion"][:, label, prediction],
          (au_mask & (positive == label) & (present == prediction)).sum(0))
  assert_scores_match(metrics.compute_scores(statistics), reference_scores(outputs, batch))


def test_histograms_can_be_left_out(data):
  outputs, batch = data
  full = metrics.batch_statistics(outputs, batch)
  without = metrics.batch_statistics(outputs, batch, num_histogram_bins=0)
  assert set(full) - set(without) == {"au_hist"}
  for key, value in without.items():
    np.testing.assert_array_equal(value, full[key], err_msg=key)
  scores, full_scores = metrics.compute_scores(without), metrics.compute_scores(full)
  assert set(full_scores) - set(scores) == {"au_best_thresholds", "au_f1_best_thresholds"}
  assert scores == {k: v for k, v in full_scores.items() if k in scores}


@pytest.mark.parametrize("num_bins", [1, 7, 100, 200, 1000])
def test_bin_edges_are_the_least_scores_of_their_bins(num_bins):
  edges = metrics.histogram_bin_edges(num_bins)
  assert edges.dtype == np.float32 and edges[0] == 0.0
  index = np.arange(num_bins)
  np.testing.assert_array_equal(np.floor(edges * np.float32(num_bins)), index)
  below = np.nextafter(edges[1:], np.float32(-1))
  assert np.all(np.floor(below * np.float32(num_bins)) < index[1:])
  nearest = (index / num_bins).astype(np.float32)  # j / bins, one float32 rounding
  assert np.all(np.abs(edges.view(np.int32) - nearest.view(np.int32)) <= 1)
  if num_bins % 2 == 0:
    assert edges[num_bins // 2] == 0.5


@pytest.mark.parametrize("num_bins", [7, 100, 200, 1000])
def test_bin_index_is_exact_at_edges(num_bins):
  edges = metrics.histogram_bin_edges(num_bins)
  below = np.nextafter(edges, np.float32(-1))
  above = np.nextafter(edges, np.float32(2))
  scores = np.concatenate([edges, below[1:], above, [np.float32(1.0)]]).astype(np.float32)
  expected = np.searchsorted(edges, scores, side="right") - 1
  np.testing.assert_array_equal(
      jax.jit(metrics.histogram_bin_index, static_argnums=1)(scores, num_bins), expected)


def test_histograms_count_every_valid_entry(data):
  outputs, batch = data
  statistics = statistics_fn(outputs, batch)
  positives = ((batch["au"] > 0.5) & (batch["au_mask"] > 0)).sum(0)
  negatives = ((batch["au"] < 0.5) & (batch["au_mask"] > 0)).sum(0)
  histograms = np.asarray(statistics["au_hist"])  # [AU, label, bin]
  np.testing.assert_array_equal(histograms[:, 1].sum(-1), positives)
  np.testing.assert_array_equal(histograms[:, 0].sum(-1), negatives)
  confusion = np.asarray(statistics["au_confusion"])  # [AU, label, prediction]
  np.testing.assert_array_equal(confusion[:, 1].sum(-1), positives)
  np.testing.assert_array_equal(confusion[:, 0].sum(-1), negatives)


def test_errors_are_clear(data):
  outputs, batch = data
  with pytest.raises(ValueError, match="num_expr_classes"):
    metrics.batch_statistics(outputs, batch, num_expr_classes=7)
  accumulator = accumulators.StatisticsAccumulator()
  accumulator.add(metrics.batch_statistics({"va": outputs["va"]}, batch))
  with pytest.raises(ValueError, match="keys"):
    accumulator.add(metrics.batch_statistics({"au": outputs["au"]}, batch))
