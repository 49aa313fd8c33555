"""Exact, streaming ABAW metrics from per-batch sufficient statistics.

Evaluation is split in three stages so that it is exact over any number of batches and
devices and needs one pass with O(classes) state:

1. `batch_statistics` (on device, jittable): sums for CCC, an expression confusion
   matrix, AU TP/FP/FN/TN counts and AU score histograms for one (per-device) batch.
   Inside a data-parallel step pass `axis_name` to sum them over devices.
2. `accumulators.StatisticsAccumulator` (host) or `DeviceStatisticsAccumulator`
   (devices, then host): adds the statistics of many batches in float64 / int64.
3. `compute_scores` (host, NumPy): CCC, F1 and the ABAW P scores from the totals.

Statistics keys (present only for the tasks present in the model outputs):
  VA   `va_int` int32 [6, 2]: the frame count n and the integer parts of the sums of
       x, y, xx, yy, xy; `va_frac` float32 [5, 2]: the remainder parts of those five
       sums (column 0 valence, 1 arousal; x prediction, y label). `va_moment_sums`
       rebuilds the float64 sums from them.
  EXPR `expr_confusion` int32 [K, K] (row: true class, column: argmax prediction).
  AU   `au_confusion` int32 [12, 2, 2]: counts by [AU, label, prediction] (index 1
       positive / predicted present), so TP = [:, 1, 1], FP = [:, 0, 1],
       FN = [:, 1, 0], TN = [:, 0, 0];
       `au_hist` int32 [12, 2, bins] (unless bins is 0): histograms of the sigmoid
       scores of valid [AU, negative / positive] entries; bin j holds scores p with
       edge_j <= p < edge_{j+1}, edge_j about j/bins (exactly: `histogram_bin_edges`),
       the last bin also holds p == 1.
Few arrays on purpose: every output array of a jitted step costs XLA:CPU about 2.5 us
to hand over (25 arrays made half the cost of a 512-frame eval batch).

A mask entry counts as valid when it is > 0; masked labels may hold anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.eval.accumulators import to_host

DEFAULT_HISTOGRAM_BINS = 200
DEFAULT_AU_THRESHOLD = 0.5

# VA sums split each value into digits (x = a/2^5 + b/2^11 + c/2^17 + d/2^23 + r: 24
# bits, a float32's significand) and a remainder |r| <= 2^-24 (see `va_statistics`).
# The sums of the digits and of the digit products, grouped by weight, are exact integers;
# only the remainder terms are float32 sums, and they are 2^-24 of the values' scale, so
# the spread is resolved wherever the values lie in [-2, 2] (VA: [-1, 1]).
_VA_FIRST_DIGIT_BITS = 5
_VA_DIGIT_BITS = 6
_VA_DIGITS = 4
_VA_LIMIT = 2.0
# |a| <= 64, |b|, |c|, |d| <= 32: a weight group of products (a*b' + b*a', ...) is at
# most 2 * 64 * 32 + 2 * 32 * 32 = 6,144 < 2^13 per frame.
VA_MAX_INTEGER_TERM = 2 ** 13
# float32 sums of integer terms are exact while partial sums stay <= 2^24.
EXACT_FLOAT32_SUM_FRAMES = 2 ** 24 // VA_MAX_INTEGER_TERM
_VA_PRODUCT_GROUPS = 2 * _VA_DIGITS - 1
# Names the layout of the statistics (the VA split above): statistics saved to disk
# carry it, so totals of another layout are recomputed, never misread.
STATISTICS_LAYOUT = f"va:{_VA_FIRST_DIGIT_BITS}+{_VA_DIGITS - 1}x{_VA_DIGIT_BITS}"

# A CCC denominator counts as zero (constant predictions equal to constant labels) when
# it is within this fraction of the float32 rounding scale of the remainder sums
# (`va_rounding_scale`). Only the remainders are rounded (the integer parts are exact),
# so the cut-off follows the data's own scale: labels spread by 3e-5 around a grid
# value keep their CCC. Measured on constant data: within one batch the rounding is at
# most 3 float32 epsilons of that scale; device totals summed over 3,000 batches of 512
# frames reach 3e-5 of it.
_ZERO_DENOMINATOR_FRACTION = 1e-4

# ----------------------------------------------------------------------------------
# On device: per-batch sufficient statistics.
# ----------------------------------------------------------------------------------


def _digit_scale(position: int) -> float:
  """The digit at `position` (0 = most significant) counts in units of 1 / this."""
  return 2.0 ** (_VA_FIRST_DIGIT_BITS + _VA_DIGIT_BITS * position)


def _product_scale(group: int) -> float:
  """Products of digits i and j, i + j = group, count in units of 1 / this."""
  return 2.0 ** (2 * _VA_FIRST_DIGIT_BITS + _VA_DIGIT_BITS * group)


def _split_digits(values):
  """values = sum_k digits[k] / _digit_scale(k) + remainder, digits integer-valued float32.

  Each digit rounds what is left, so |digit 0| <= 64 and the others <= 32, and every
  step is exact in float32 (a power-of-2 scale, and a difference of two numbers within a
  factor of 2: Sterbenz). Values are clipped to +-_VA_LIMIT (2) first so products of
  digits cannot overflow; values beyond it (VA lies in [-1, 1]) keep their excess in the
  remainder, summed with float32 precision only.
  """
  clipped = jnp.clip(values, -_VA_LIMIT, _VA_LIMIT)
  rest, digits = clipped, []
  for position in range(_VA_DIGITS):
    digit = jnp.round(rest * _digit_scale(position))
    rest = rest - digit / _digit_scale(position)
    digits.append(digit)
  return digits, (values - clipped) + rest


def _grouped_products(digits_a, digits_b):
  """[groups, B]: sums of digit products by weight, group g = sum_{i+j=g} a_i * b_j in
  units of 1 / _product_scale(g); each is an integer below VA_MAX_INTEGER_TERM."""
  groups = [0.0] * _VA_PRODUCT_GROUPS
  for i, a in enumerate(digits_a):
    for j, b in enumerate(digits_b):
      groups[i + j] = groups[i + j] + a * b
  return jnp.concatenate(groups)


def va_statistics(predictions, labels, mask) -> dict[str, jax.Array]:
  """CCC sums per dimension over valid frames, split so that they stay exact.

  Args:
    predictions: [B, 2] predicted valence/arousal.
    labels: [B, 2] labels (anything where masked).
    mask: [B] frame validity.

  Why split: CCC from raw sums subtracts mean^2 from E[x^2]; with a mean of 0.8 and a
  standard deviation of 0.05 a float32 sum loses 2-3 of its 7 digits there (CCC off by
  1e-5, measured), and with a spread of 3e-5 all of them. Each value is split into four
  integer digits and a remainder (`_split_digits`): the sums of the digits and of their
  products are exact integers and only the remainder terms (|r| <= 2^-24) are float32
  sums, so the float64 sums rebuilt by `va_moment_sums` carry the variance even when it
  is 1e-10 of the mean square. Every statistic is still a plain sum: psum and host
  addition stay valid.

  Layout: the per-frame terms are stacked as rows of a [60, B] and a [10, B] array and
  summed along the frames; XLA:CPU sums such rows several times faster than the
  columns of narrow [B, 2] arrays. The integer terms are summed in float32, exact for
  batches of up to `EXACT_FLOAT32_SUM_FRAMES` frames (and faster than int32 sums here);
  larger batches sum them as int32.
  """
  valid = mask > 0
  # `where`, not multiplication: a masked label may be NaN, and NaN * 0 is NaN.
  x = jnp.where(valid[None, :], predictions.astype(jnp.float32).T, 0.0)  # [2, B]
  y = jnp.where(valid[None, :], labels.astype(jnp.float32).T, 0.0)
  (digits_x, fine_x), (digits_y, fine_y) = _split_digits(x), _split_digits(y)
  integer_terms = jnp.concatenate(
      [jnp.broadcast_to(valid[None, :], x.shape).astype(jnp.float32), *digits_x,
       *digits_y, _grouped_products(digits_x, digits_x),
       _grouped_products(digits_y, digits_y), _grouped_products(digits_x, digits_y)])
  if x.shape[1] <= EXACT_FLOAT32_SUM_FRAMES:
    integer_sums = jnp.sum(integer_terms, axis=1).astype(jnp.int32)
  else:
    integer_sums = jnp.sum(integer_terms.astype(jnp.int32), axis=1)
  # With q = x - r the digits' value: x*y - q_x*q_y = r_x * y + q_x * r_y.
  coarse_x, coarse_y = x - fine_x, y - fine_y
  remainder_terms = jnp.concatenate(
      [fine_x, fine_y, fine_x * (x + coarse_x), fine_y * (y + coarse_y),
       fine_x * y + coarse_x * fine_y])
  return {"va_int": integer_sums.reshape(-1, 2),
          "va_frac": jnp.sum(remainder_terms, axis=1).reshape(5, 2)}


def expression_statistics(logits, labels, mask) -> dict[str, jax.Array]:
  """Confusion matrix [K, K] (true x argmax prediction) over valid frames."""
  num_classes = logits.shape[-1]
  valid = mask > 0
  true_class = jnp.where(valid, labels, 0).astype(jnp.int32)
  predicted_class = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  confusion = jnp.zeros((num_classes, num_classes), jnp.int32)
  confusion = confusion.at[true_class, predicted_class].add(valid.astype(jnp.int32))
  return {"expr_confusion": confusion}


def histogram_bin_edges(num_bins: int) -> np.ndarray:
  """Lower bin edges (float32), j = 0..num_bins-1: edge j is the least float32 p whose
  `histogram_bin_index` is >= j, i.e. with float32(p * num_bins) >= j. That is j /
  num_bins rounded to float32, or one unit in the last place from it (28 of the 200
  default edges; never 0.5)."""
  bins = np.float32(num_bins)
  index = np.arange(num_bins, dtype=np.float32)
  edges = index / bins
  while np.any(too_low := edges * bins < index):  # float32 products, as on device
    edges = np.where(too_low, np.nextafter(edges, np.float32(2)), edges)
  while np.any(too_high := (index > 0) & (
      np.nextafter(edges, np.float32(-1)) * bins >= index)):
    edges = np.where(too_high, np.nextafter(edges, np.float32(-1)), edges)
  return edges


def histogram_bin_index(probabilities, num_bins: int) -> jax.Array:
  """Bin of each score: floor(float32(p * bins)), p == 1 in the last bin.

  float32(p * bins) never decreases as p grows, so "bin >= j" means exactly "p >=
  edge_j" for the edges of `histogram_bin_edges`, the comparison `best_au_thresholds`
  assumes. (No lookup of the edges: on XLA:CPU the two gathers that corrected a
  float32 j / bins took over half the time of the AU statistics.)
  """
  index = jnp.floor(probabilities.astype(jnp.float32) * np.float32(num_bins))
  return jnp.clip(index, 0, num_bins - 1).astype(jnp.int32)


def au_statistics(logits, labels, mask, *, thresholds=None,
                  num_histogram_bins: int = DEFAULT_HISTOGRAM_BINS
                  ) -> dict[str, jax.Array]:
  """Per-AU confusion counts at `thresholds` and score histograms over valid entries.

  An AU is predicted present when its sigmoid probability is >= its threshold
  (default 0.5). Histogram bins use the same `>=` comparison against the float32 bin
  edges, so a bin edge returned by `best_au_thresholds` reproduces exactly the counts
  it was chosen from.

  All of it is one int32 scatter-add of the valid entries into [AU, label, predicted,
  bin] cells: the histograms sum out `predicted`, the counts sum out `bin` (no sums
  over the batch axis, which XLA:CPU computes slowly for narrow arrays).

  Returns `au_confusion` [AU, label, predicted] and `au_hist` [AU, label, bin] (left
  out when `num_histogram_bins` is 0).
  """
  num_aus = logits.shape[-1]
  if thresholds is None:
    thresholds = jnp.full((num_aus,), DEFAULT_AU_THRESHOLD, jnp.float32)
  probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))
  valid = mask > 0
  positive = valid & (jnp.where(valid, labels, 0) > 0.5)
  predicted = probabilities >= jnp.asarray(thresholds, jnp.float32)
  cell = ((jnp.arange(num_aus, dtype=jnp.int32) * 2 + positive.astype(jnp.int32)) * 2
          + predicted.astype(jnp.int32))
  bins = num_histogram_bins
  if bins:
    cell = cell * bins + histogram_bin_index(probabilities, bins)
  cells = jnp.zeros((num_aus * 2 * 2 * max(bins, 1),), jnp.int32)
  cells = cells.at[cell.reshape(-1)].add(valid.astype(jnp.int32).reshape(-1))
  cells = cells.reshape(num_aus, 2, 2, max(bins, 1))  # AU, positive, predicted, bin
  statistics = {"au_confusion": jnp.sum(cells, axis=3)}
  if bins:
    statistics["au_hist"] = jnp.sum(cells, axis=2)
  return statistics


def batch_statistics(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                     *, num_expr_classes: int | None = None, au_thresholds=None,
                     num_histogram_bins: int = DEFAULT_HISTOGRAM_BINS,
                     axis_name: str | None = None) -> dict[str, jax.Array]:
  """Sufficient statistics of the tasks present in `outputs` (jittable).

  Args:
    outputs: model outputs; any of `expression` [B, K] logits, `au` [B, 12] logits,
      `va` [B, 2].
    batch: labels and masks (`expression`, `expression_mask`, `au`, `au_mask`,
      `valence_arousal`, `va_mask`).
    num_expr_classes: K; checked against the logits when given.
    au_thresholds: [12] decision thresholds on the sigmoid probability (default 0.5).
    num_histogram_bins: bins of the AU score histograms; 0 leaves them out (and with
      them `au_best_thresholds` and `au_f1_best_thresholds` from `compute_scores`),
      for evaluations that use given thresholds: AU statistics 20% faster on XLA:CPU.
    axis_name: when given (inside shard_map/pmap), statistics are summed over it.
  """
  statistics = {}
  if "va" in outputs:
    statistics.update(va_statistics(outputs["va"], batch["valence_arousal"],
                                    batch["va_mask"]))
  if "expression" in outputs:
    logits = outputs["expression"]
    if num_expr_classes is not None and logits.shape[-1] != num_expr_classes:
      raise ValueError(f"expression logits have {logits.shape[-1]} classes, "
                       f"num_expr_classes is {num_expr_classes}")
    statistics.update(expression_statistics(logits, batch["expression"],
                                            batch["expression_mask"]))
  if "au" in outputs:
    statistics.update(au_statistics(outputs["au"], batch["au"], batch["au_mask"],
                                    thresholds=au_thresholds,
                                    num_histogram_bins=num_histogram_bins))
  if axis_name is not None:
    statistics = jax.lax.psum(statistics, axis_name)
  return statistics


# ----------------------------------------------------------------------------------
# On the host: scores from summed statistics (eval/accumulators.py sums them).
# ----------------------------------------------------------------------------------


def _safe_ratio(numerator, denominator) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                   where=denominator != 0)


def va_moment_sums(statistics: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """float64 `n`, `sum_x`, `sum_y`, `sum_xx`, `sum_yy`, `sum_xy` [2] from VA statistics."""
  integer_parts = to_host(statistics["va_int"]).astype(np.float64)
  remainders = to_host(statistics["va_frac"])
  digit_units = np.array([_digit_scale(k) for k in range(_VA_DIGITS)])
  group_units = np.array([_product_scale(g) for g in range(_VA_PRODUCT_GROUPS)])
  rows = iter(np.split(integer_parts[1:], np.cumsum(
      [_VA_DIGITS, _VA_DIGITS, _VA_PRODUCT_GROUPS, _VA_PRODUCT_GROUPS])))
  sums = {"n": integer_parts[0]}
  for row, (name, units) in enumerate((("x", digit_units), ("y", digit_units),
                                       ("xx", group_units), ("yy", group_units),
                                       ("xy", group_units))):
    # Each integer sum over its power-of-2 unit is exact in float64 (below 2^53).
    sums[f"sum_{name}"] = np.sum(next(rows) / units[:, None], axis=0) + remainders[row]
  return sums


def va_rounding_scale(statistics: Mapping[str, Any]) -> np.ndarray:
  """[2] The size of the float32-rounded part of the CCC moments (per frame): the
  remainder sums of x*x and y*y and what the remainder sums of x and y add through the
  squared means. Rounding errors of the rebuilt moments are a small fraction of it."""
  remainders = np.abs(to_host(statistics["va_frac"]))
  sums = va_moment_sums(statistics)
  n = sums["n"]
  mean_x, mean_y = _safe_ratio(sums["sum_x"], n), _safe_ratio(sums["sum_y"], n)
  return _safe_ratio(remainders[2] + remainders[3] + 2.0 * np.abs(mean_x) * remainders[0]
                     + 2.0 * np.abs(mean_y) * remainders[1], n)


def concordance_from_sums(n, sum_x, sum_y, sum_xx, sum_yy, sum_xy,
                          zero_tolerance=0.0) -> np.ndarray:
  """CCC from sums (population moments); 0 where n == 0 or the denominator is 0 (at
  most `zero_tolerance`: the rounding noise of the sums)."""
  n = np.asarray(n, np.float64)
  mean_x, mean_y = _safe_ratio(sum_x, n), _safe_ratio(sum_y, n)
  var_x = _safe_ratio(sum_xx, n) - mean_x ** 2
  var_y = _safe_ratio(sum_yy, n) - mean_y ** 2
  cov = _safe_ratio(sum_xy, n) - mean_x * mean_y
  denominator = var_x + var_y + (mean_x - mean_y) ** 2
  is_zero = denominator <= np.asarray(zero_tolerance, np.float64)
  return _safe_ratio(2.0 * cov, np.where(is_zero | (n == 0), 0.0, denominator))


def ccc_from_statistics(statistics: Mapping[str, Any]) -> np.ndarray:
  """[2] CCC of valence and arousal from `va_statistics` totals."""
  return concordance_from_sums(
      **va_moment_sums(statistics),
      zero_tolerance=_ZERO_DENOMINATOR_FRACTION * va_rounding_scale(statistics))


def f1_from_counts(tp, fp, fn) -> np.ndarray:
  """Binary F1 = 2TP / (2TP + FP + FN), 0 when nothing is positive (zero_division=0)."""
  tp = np.asarray(tp, np.float64)
  return _safe_ratio(2.0 * tp, 2.0 * tp + np.asarray(fp) + np.asarray(fn))


def best_au_thresholds(hist_pos, hist_neg) -> tuple[np.ndarray, np.ndarray]:
  """Per-AU threshold among the histogram's lower bin edges that maximises F1.

  Predicting "present" at edge j means predicting it for every score in bins >= j, so
  TP and FP are suffix sums of the histograms. Ties go to the edge closest to 0.5
  (with no positives every edge gives F1 0, and 0.5 stays the threshold).

  Args:
    hist_pos, hist_neg: [..., bins] score histograms of positive / negative entries.
  Returns:
    thresholds [...] (float64, equal to the float32 edges used on device) and the F1
    each reaches on the histogrammed data.
  """
  hist_pos = np.asarray(hist_pos, np.int64)
  hist_neg = np.asarray(hist_neg, np.int64)
  num_bins = hist_pos.shape[-1]
  true_positives = np.flip(np.cumsum(np.flip(hist_pos, -1), -1), -1)
  false_positives = np.flip(np.cumsum(np.flip(hist_neg, -1), -1), -1)
  false_negatives = hist_pos.sum(-1, keepdims=True) - true_positives
  f1 = f1_from_counts(true_positives, false_positives, false_negatives)
  edges = histogram_bin_edges(num_bins).astype(np.float64)
  best_f1 = f1.max(-1, keepdims=True)
  distance_to_half = np.where(f1 == best_f1, np.abs(edges - 0.5), np.inf)
  best_index = np.argmin(distance_to_half, axis=-1)
  return edges[best_index], np.take_along_axis(f1, best_index[..., None], -1)[..., 0]


# ABAW1 and ABAW2 (2020-21) scored EXPR and AU as blends of F1 and accuracy; ABAW3
# and later score the F1s alone. Reported under keys of their own.
ABAW2_EXPR_WEIGHTS = (0.67, 0.33)  # (macro F1, accuracy)
ABAW2_AU_WEIGHTS = (0.5, 0.5)  # (mean AU F1, accuracy over all (frame, AU) entries)


def _mean_over(values: np.ndarray, included: np.ndarray) -> float:
  return float(values[included].mean()) if np.any(included) else 0.0


def compute_scores(statistics: Mapping[str, Any]) -> dict[str, Any]:
  """Scores (plain Python floats and lists) of the tasks present in `statistics`.

  VA: `ccc_valence`, `ccc_arousal`, `p_va`. EXPR: `expr_f1` (macro over all K classes,
  absent classes count as 0: scikit-learn's `f1_score(average="macro")` averages over
  the classes present in labels or predictions only, and equals this only with
  `labels=range(K)`), `expr_f1_per_class`, `expr_accuracy`, `expr_confusion`,
  `p_expr_abaw2` (ABAW1/2's 0.67 F1 + 0.33 accuracy).
  AU: `au_f1` (mean of the binary F1s of the AUs the data annotates: an AU without
  a single valid entry, such as the AUs ABAW1 did not label, is left out; every ABAW3+
  set annotates all 12), `au_f1_per_au` (12 values, 0 for AUs without labels),
  `au_accuracy` (over all valid (frame, AU) entries), `p_au_abaw2` (ABAW1/2's 0.5 F1 +
  0.5 accuracy), and from the histograms (where computed) `au_best_thresholds` with
  `au_f1_best_thresholds` (thresholds tuned on these same data: an optimistic figure,
  use the thresholds on other data).
  `p_mtl` = p_va + expr_f1 + au_f1, only when all three tasks are present (a model of
  one or two tasks has no P_MTL).
  """
  statistics = {key: to_host(value) for key, value in statistics.items()}
  scores: dict[str, Any] = {}
  if "va_int" in statistics:
    ccc = ccc_from_statistics(statistics)
    scores["ccc_valence"], scores["ccc_arousal"] = float(ccc[0]), float(ccc[1])
    scores["p_va"] = float(ccc.mean())
  if "expr_confusion" in statistics:
    confusion = statistics["expr_confusion"]
    true_positives = np.diag(confusion)
    f1_per_class = f1_from_counts(true_positives,
                                  confusion.sum(0) - true_positives,
                                  confusion.sum(1) - true_positives)
    scores["expr_f1"] = float(f1_per_class.mean())
    scores["expr_f1_per_class"] = f1_per_class.tolist()
    scores["expr_accuracy"] = float(_safe_ratio(true_positives.sum(), confusion.sum()))
    scores["expr_confusion"] = confusion.tolist()
    scores["p_expr_abaw2"] = (ABAW2_EXPR_WEIGHTS[0] * scores["expr_f1"]
                              + ABAW2_EXPR_WEIGHTS[1] * scores["expr_accuracy"])
  if "au_confusion" in statistics:
    confusion = statistics["au_confusion"]  # [AU, label, prediction]
    tp, fp, fn, tn = (confusion[:, 1, 1], confusion[:, 0, 1], confusion[:, 1, 0],
                      confusion[:, 0, 0])
    annotated = (tp + fp + fn + tn) > 0
    f1_per_au = f1_from_counts(tp, fp, fn)
    scores["au_f1"] = _mean_over(f1_per_au, annotated)
    scores["au_f1_per_au"] = f1_per_au.tolist()
    scores["au_accuracy"] = float(_safe_ratio((tp + tn).sum(), (tp + fp + fn + tn).sum()))
    scores["p_au_abaw2"] = (ABAW2_AU_WEIGHTS[0] * scores["au_f1"]
                            + ABAW2_AU_WEIGHTS[1] * scores["au_accuracy"])
    if "au_hist" in statistics:
      thresholds, tuned_f1 = best_au_thresholds(statistics["au_hist"][:, 1],
                                                statistics["au_hist"][:, 0])
      scores["au_best_thresholds"] = thresholds.tolist()
      scores["au_f1_best_thresholds"] = _mean_over(tuned_f1, annotated)
  if all(key in scores for key in ("p_va", "expr_f1", "au_f1")):
    scores["p_mtl"] = scores["p_va"] + scores["expr_f1"] + scores["au_f1"]
  return scores
