"""Masked per-task losses for multi-task affect analysis; never NaN.

Each loss is a ratio of sums over the valid entries of a batch (a mask entry counts as
valid when it is > 0; masked labels may hold anything, NaN included). A task with no
valid entry gives exactly 0.0 and zero gradients: every division and every `pow` goes
through the double-`where` form, so no 0/0 or inf enters even the unselected branch.

Data parallelism: with `axis_name` (inside `jax.shard_map` over a mesh axis of that
name) every sum, normaliser and batch statistic is `psum`-ed over the axis, so each
device holds the loss of the whole global batch, equal to the 1-device value. Under
`shard_map`'s default `check_vma=True`, `jax.grad` of such a loss with respect to
replicated (`P()`) parameters is then already the global-batch gradient on every
device (autodiff turns the implicit broadcast of the parameters into a psum); a further
`lax.pmean` of it changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

EXPRESSION_LOSS_KINDS = ("ce", "weighted_ce", "focal")
AU_LOSS_KINDS = ("bce", "weighted_bce", "focal")
VA_LOSS_KINDS = ("ccc", "mse", "ccc+mse")


def _check_kind(kind: str, allowed: tuple[str, ...], task: str) -> None:
  if kind not in allowed:
    raise ValueError(f"unknown {task} loss kind {kind!r}; expected one of {allowed}")


def _global_sum(values, axis_name: str | None, axis=None):
  """Sum over `axis` of the local batch, then over the devices of `axis_name`."""
  total = jnp.sum(values, axis=axis)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _safe_divide(numerator, denominator):
  """numerator / denominator where denominator > 0, else 0, with finite gradients."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _focal_modulation(one_minus_p_true, gamma):
  """(1 - p_t) ** gamma, with a finite gradient where 1 - p_t is 0 for any gamma >= 0."""
  positive = one_minus_p_true > 0
  safe_base = jnp.where(positive, one_minus_p_true, 1.0)
  value_at_zero = jnp.where(jnp.asarray(gamma) == 0, 1.0, 0.0)
  return jnp.where(positive, safe_base ** gamma, value_at_zero)


# ----------------------------------------------------------------------------------
# Expression: K-way classification.
# ----------------------------------------------------------------------------------


def expression_loss(logits, labels, mask, *, kind: str = "ce", class_weights=None,
                    label_smoothing: float = 0.0, focal_gamma: float = 2.0,
                    axis_name: str | None = None) -> jax.Array:
  """Masked cross-entropy family over valid frames; scalar float32.

  Args:
    logits: [B, K]. labels: [B] int class indices. mask: [B].
    kind: "ce"; "weighted_ce" (needs `class_weights`); "focal" (optional
      `class_weights` act as the per-class alpha).
    class_weights: [K] per-class weights w.
    label_smoothing: eps; the target is (1 - eps) one_hot + eps / K.
    focal_gamma: gamma of the focal modulation (1 - p_t)^gamma.
    axis_name: mesh axis to sum over (see the module docstring).

  Follows PyTorch `CrossEntropyLoss(weight=w, label_smoothing=eps)` exactly:
    loss_i = (1 - eps) w_{y_i} (-log p_{i,y_i}) + eps / K sum_c w_c (-log p_{i,c}),
    loss = sum_i loss_i / sum_i w_{y_i}  over valid frames i;
  with w = 1 this is the mean smoothed cross-entropy. "focal" multiplies loss_i by
  (1 - p_{i,y_i})^gamma (p_t of the model, not of the smoothed target) and keeps the
  same normaliser, so with w = 1 it is a mean over valid frames.
  """
  _check_kind(kind, EXPRESSION_LOSS_KINDS, "expression")
  if kind == "weighted_ce" and class_weights is None:
    raise ValueError("expression loss kind 'weighted_ce' needs class_weights")
  if kind == "ce" and class_weights is not None:
    raise ValueError("class_weights given with expression loss kind 'ce'; "
                     "use kind='weighted_ce'")
  num_classes = logits.shape[-1]
  log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = (mask > 0).astype(jnp.float32)
  safe_labels = jnp.where(mask > 0, labels, 0).astype(jnp.int32)
  if class_weights is None:
    class_weights = jnp.ones((num_classes,), jnp.float32)
  class_weights = jnp.asarray(class_weights, jnp.float32)

  log_p_true = jnp.take_along_axis(log_probabilities, safe_labels[:, None], axis=-1)[:, 0]
  weight_true = class_weights[safe_labels]
  per_frame = ((1.0 - label_smoothing) * weight_true * -log_p_true
               + label_smoothing / num_classes
               * jnp.sum(class_weights * -log_probabilities, axis=-1))
  if kind == "focal":
    # 1 - p_t as -expm1(log p_t): accurate when p_t is close to 1.
    per_frame = _focal_modulation(-jnp.expm1(log_p_true), focal_gamma) * per_frame
  return _safe_divide(_global_sum(valid * per_frame, axis_name),
                      _global_sum(valid * weight_true, axis_name))


# ----------------------------------------------------------------------------------
# Action units: 12 binary labels per frame.
# ----------------------------------------------------------------------------------


def au_loss(logits, labels, mask, *, kind: str = "bce", pos_weight=None,
            focal_gamma: float = 2.0, axis_name: str | None = None) -> jax.Array:
  """Masked binary cross-entropy family, mean over valid (frame, AU) entries.

  Args:
    logits: [B, A]. labels: [B, A] in {0, 1}. mask: [B, A].
    kind: "bce"; "weighted_bce" (needs `pos_weight`); "focal" (optional `pos_weight`).
    pos_weight: [A] weight p of the positive term, as PyTorch
      `BCEWithLogitsLoss(pos_weight=p)`: -(p y log s(x) + (1 - y) log(1 - s(x))),
      averaged over entries (not normalised by the weights).
    focal_gamma: "focal" multiplies each entry by (1 - p_t)^gamma,
      1 - p_t = y s(-x) + (1 - y) s(x).
  """
  _check_kind(kind, AU_LOSS_KINDS, "AU")
  if kind == "weighted_bce" and pos_weight is None:
    raise ValueError("AU loss kind 'weighted_bce' needs pos_weight")
  if kind == "bce" and pos_weight is not None:
    raise ValueError("pos_weight given with AU loss kind 'bce'; use kind='weighted_bce'")
  x = logits.astype(jnp.float32)
  y = jnp.where(mask > 0, labels, 0).astype(jnp.float32)
  valid = (mask > 0).astype(jnp.float32)
  # -log s(x) = softplus(-x) and -log(1 - s(x)) = softplus(x): finite for any x.
  positive_term = y * jax.nn.softplus(-x)
  if pos_weight is not None:
    positive_term = jnp.asarray(pos_weight, jnp.float32) * positive_term
  per_entry = positive_term + (1.0 - y) * jax.nn.softplus(x)
  if kind == "focal":
    one_minus_p_true = y * jax.nn.sigmoid(-x) + (1.0 - y) * jax.nn.sigmoid(x)
    per_entry = _focal_modulation(one_minus_p_true, focal_gamma) * per_entry
  return _safe_divide(_global_sum(valid * per_entry, axis_name),
                      _global_sum(valid, axis_name))


# ----------------------------------------------------------------------------------
# Valence-arousal regression.
# ----------------------------------------------------------------------------------


def concordance_per_dimension(predictions, targets, mask, *,
                              axis_name: str | None = None) -> jax.Array:
  """CCC [D] of each column over the valid frames of the (global) batch.

  Population moments, two passes (means first, then centred sums) so float32 keeps
  its digits. 0 where there are fewer than 2 valid frames or the denominator is 0,
  with finite gradients there.
  """
  valid = (mask > 0)[:, None]
  weight = valid.astype(jnp.float32)
  x = jnp.where(valid, predictions.astype(jnp.float32), 0.0)
  y = jnp.where(valid, targets.astype(jnp.float32), 0.0)
  count = _global_sum(weight, axis_name, axis=0)
  mean_x = _safe_divide(_global_sum(x, axis_name, axis=0), count)
  mean_y = _safe_divide(_global_sum(y, axis_name, axis=0), count)
  centred_x = weight * (x - mean_x)
  centred_y = weight * (y - mean_y)
  var_x = _safe_divide(_global_sum(centred_x ** 2, axis_name, axis=0), count)
  var_y = _safe_divide(_global_sum(centred_y ** 2, axis_name, axis=0), count)
  covariance = _safe_divide(_global_sum(centred_x * centred_y, axis_name, axis=0), count)
  concordance = _safe_divide(2.0 * covariance, var_x + var_y + (mean_x - mean_y) ** 2)
  return jnp.where(count >= 2, concordance, 0.0)


def va_loss(predictions, targets, mask, *, kind: str = "ccc",
            axis_name: str | None = None) -> jax.Array:
  """Masked VA loss; scalar float32.

  Args:
    predictions, targets: [B, 2] (valence, arousal). mask: [B].
    kind: "ccc": mean over the two dimensions of (1 - CCC), CCC over the valid frames
      of the global batch; a dimension with fewer than 2 valid frames adds 0.
      "mse": mean squared error over valid frames and both dimensions.
      "ccc+mse": their sum.
  """
  _check_kind(kind, VA_LOSS_KINDS, "VA")
  total = jnp.zeros((), jnp.float32)
  if kind in ("ccc", "ccc+mse"):
    count = _global_sum((mask > 0).astype(jnp.float32), axis_name)
    concordance = concordance_per_dimension(predictions, targets, mask,
                                            axis_name=axis_name)
    total += jnp.where(count >= 2, jnp.mean(1.0 - concordance), 0.0)
  if kind in ("mse", "ccc+mse"):
    valid = (mask > 0)[:, None]
    error = jnp.where(valid, predictions.astype(jnp.float32)
                      - jnp.where(valid, targets, 0).astype(jnp.float32), 0.0)
    entries = _global_sum(valid.astype(jnp.float32), axis_name) * predictions.shape[-1]
    total += _safe_divide(_global_sum(error ** 2, axis_name), entries)
  return total


# ----------------------------------------------------------------------------------
# Weights from training-set label counts (host, NumPy).
# ----------------------------------------------------------------------------------


def class_weights_from_counts(counts) -> np.ndarray:
  """Inverse-frequency class weights [K] (float32), mean 1 over the classes present.

  w_c = (1 / n_c) / mean_{c': n_c' > 0}(1 / n_c'). A class with count 0 gets weight 0:
  it never is a target, and under the PyTorch label-smoothing convention a 0 keeps it
  from entering the smoothing term with an arbitrary weight.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or np.any(counts < 0):
    raise ValueError(f"counts must be a 1-D array of non-negative numbers, got {counts}")
  present = counts > 0
  if not present.any():
    raise ValueError("class_weights_from_counts needs at least one class with a count")
  inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=present)
  return (inverse / inverse[present].mean()).astype(np.float32)


def pos_weights_from_counts(positives, totals, *, max_weight: float = 100.0
                            ) -> np.ndarray:
  """Per-AU positive weights negatives / positives (float32), capped at `max_weight`.

  An AU with no positive example gets `max_weight`; one with no labelled example at all
  gets 1 (its weight is never used).
  """
  positives = np.asarray(positives, np.float64)
  totals = np.asarray(totals, np.float64)
  if positives.shape != totals.shape or np.any(positives < 0) or np.any(positives > totals):
    raise ValueError("need 0 <= positives <= totals, same shapes; got "
                     f"{positives} and {totals}")
  negatives = totals - positives
  ratio = np.divide(negatives, positives, out=np.full_like(positives, max_weight),
                    where=positives > 0)
  weights = np.where(totals > 0, np.minimum(ratio, max_weight), 1.0)
  return weights.astype(np.float32)


# ----------------------------------------------------------------------------------
# Combining the task losses.
# ----------------------------------------------------------------------------------


def combine_task_losses(task_losses: Mapping[str, jax.Array], *,
                        weights: Mapping[str, float] | None = None,
                        log_variances: Mapping[str, jax.Array] | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss over the tasks present and the term each task adds to it.

  Fixed weighting (default): total = sum_t w_t L_t, w_t from `weights` (1 where not
  given). Uncertainty weighting (Kendall, Gal & Cipolla 2018), when `log_variances`
  is given: total = sum_t exp(-s_t) L_t + s_t, with s_t = log sigma_t^2 a trainable
  scalar per task. This is the common single form for regression and classification
  tasks alike (the paper's 1/(2 sigma^2) factor for regression only rescales s_t); the
  s_t term keeps sigma from growing without bound.

  Keys of `weights` / `log_variances` for tasks absent from `task_losses` are ignored,
  so one configuration serves uni-task and multi-task models.
  """
  if weights is not None and log_variances is not None:
    raise ValueError("give either fixed weights or log_variances, not both")
  terms = {}
  for task, loss in task_losses.items():
    if log_variances is not None:
      if task not in log_variances:
        raise ValueError(f"no log variance for task {task!r}; have {sorted(log_variances)}")
      log_variance = jnp.asarray(log_variances[task], jnp.float32)
      terms[task] = jnp.exp(-log_variance) * loss + log_variance
    else:
      terms[task] = (1.0 if weights is None else weights.get(task, 1.0)) * loss
  total = sum(terms.values(), jnp.zeros((), jnp.float32))
  return total, terms
