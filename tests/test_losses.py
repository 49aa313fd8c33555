"""Masked losses against float64 NumPy references written here, and on eight devices.

References follow the formulas the docstrings promise (the PyTorch conventions for
weighted cross-entropy and pos_weight BCE); where torch is installed it is checked too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from affect_jax.train import losses

NUM_CLASSES = 8
NUM_AUS = 12


# ---------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------


def log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference_expression_loss(logits, labels, mask, *, class_weights=None,
                              label_smoothing=0.0, focal_gamma=None):
  valid = mask > 0
  log_p = log_softmax64(logits)[valid]
  labels = labels[valid]
  weights = np.ones(logits.shape[-1]) if class_weights is None else np.asarray(class_weights, np.float64)
  log_p_true = log_p[np.arange(len(labels)), labels]
  per_frame = ((1 - label_smoothing) * weights[labels] * -log_p_true
               + label_smoothing / logits.shape[-1] * (weights * -log_p).sum(-1))
  if focal_gamma is not None:
    per_frame = (1 - np.exp(log_p_true)) ** focal_gamma * per_frame
  return per_frame.sum() / weights[labels].sum()


def reference_au_loss(logits, labels, mask, *, pos_weight=None, focal_gamma=None):
  valid = mask > 0
  x = np.asarray(logits, np.float64)
  probability = 1 / (1 + np.exp(-x))
  pos_weight = np.ones(x.shape[-1]) if pos_weight is None else np.asarray(pos_weight, np.float64)
  per_entry = -(pos_weight * labels * np.log(probability) + (1 - labels) * np.log(1 - probability))
  if focal_gamma is not None:
    p_true = np.where(labels > 0.5, probability, 1 - probability)
    per_entry = (1 - p_true) ** focal_gamma * per_entry
  return per_entry[valid].mean()


def reference_one_minus_ccc(predictions, targets, mask):
  valid = mask > 0
  x = np.asarray(predictions, np.float64)[valid]
  y = np.asarray(targets, np.float64)[valid]
  terms = []
  for d in range(x.shape[1]):
    a, b = x[:, d], y[:, d]
    ccc = 2 * np.mean((a - a.mean()) * (b - b.mean())) / (a.var() + b.var() + (a.mean() - b.mean()) ** 2)
    terms.append(1 - ccc)
  return np.mean(terms)


def reference_mse(predictions, targets, mask):
  valid = mask > 0
  return np.mean((np.asarray(predictions, np.float64)[valid] - targets[valid]) ** 2)


# ---------------------------------------------------------------------------------
# data: 64 frames (8 per device), random masks, garbage under the masks
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  n = 64
  expr_labels = rng.integers(0, NUM_CLASSES, n)
  expr_mask = rng.random(n) < 0.7
  au = (rng.random((n, NUM_AUS)) < 0.3).astype(np.float32)
  au_mask = rng.random((n, NUM_AUS)) < 0.8
  va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  va_mask = rng.random(n) < 0.6
  return {
      "expr_logits": (2 * rng.normal(size=(n, NUM_CLASSES))).astype(np.float32),
      "expr_labels": expr_labels.astype(np.int32),
      "expr_mask": expr_mask.astype(np.float32),
      "au_logits": (2 * rng.normal(size=(n, NUM_AUS))).astype(np.float32),
      "au_labels": au,
      "au_mask": au_mask.astype(np.float32),
      "va_pred": np.tanh(va + rng.normal(0.1, 0.5, va.shape)).astype(np.float32),
      "va_target": va,
      "va_mask": va_mask.astype(np.float32),
      "class_weights": rng.uniform(0.2, 3.0, NUM_CLASSES).astype(np.float32),
      "pos_weight": rng.uniform(0.5, 20.0, NUM_AUS).astype(np.float32),
  }


def with_garbage(labels, mask, garbage):
  """Masked labels set to garbage: they must change nothing."""
  broadcast_mask = mask if labels.ndim == mask.ndim else mask[:, None]
  return jnp.where(broadcast_mask > 0, labels, garbage).astype(labels.dtype)


# Each case: (name, loss function of (data, axis_name), float64 reference of data).
def expression_case(kind, **options):
  reference_options = dict(label_smoothing=options.get("label_smoothing", 0.0))
  if kind == "focal":
    reference_options["focal_gamma"] = options.get("focal_gamma", 2.0)

  def loss(d, axis_name=None):
    weights = d["class_weights"] if kind == "weighted_ce" or options.get("weighted") else None
    extra = {k: v for k, v in options.items() if k != "weighted"}
    return losses.expression_loss(d["expr_logits"], with_garbage(d["expr_labels"], d["expr_mask"], -1),
                                  d["expr_mask"], kind=kind, class_weights=weights,
                                  axis_name=axis_name, **extra)

  def reference(d):
    weights = d["class_weights"] if kind == "weighted_ce" or options.get("weighted") else None
    return reference_expression_loss(d["expr_logits"], d["expr_labels"], d["expr_mask"],
                                     class_weights=weights, **reference_options)
  return (f"expression-{kind}-{options}", loss, reference)


def au_case(kind, **options):
  def uses_weight():
    return kind == "weighted_bce" or options.get("weighted")

  def loss(d, axis_name=None):
    return losses.au_loss(d["au_logits"], with_garbage(d["au_labels"], d["au_mask"], np.nan),
                          d["au_mask"], kind=kind,
                          pos_weight=d["pos_weight"] if uses_weight() else None,
                          axis_name=axis_name)

  def reference(d):
    return reference_au_loss(d["au_logits"], d["au_labels"], d["au_mask"],
                             pos_weight=d["pos_weight"] if uses_weight() else None,
                             focal_gamma=2.0 if kind == "focal" else None)
  return (f"au-{kind}-{options}", loss, reference)


def va_case(kind):
  def loss(d, axis_name=None):
    return losses.va_loss(d["va_pred"], with_garbage(d["va_target"], d["va_mask"], np.nan),
                          d["va_mask"], kind=kind, axis_name=axis_name)

  def reference(d):
    ccc = reference_one_minus_ccc(d["va_pred"], d["va_target"], d["va_mask"])
    mse = reference_mse(d["va_pred"], d["va_target"], d["va_mask"])
    return {"ccc": ccc, "mse": mse, "ccc+mse": ccc + mse}[kind]
  return (f"va-{kind}", loss, reference)


CASES = [
    expression_case("ce"),
    expression_case("ce", label_smoothing=0.1),
    expression_case("weighted_ce"),
    expression_case("weighted_ce", label_smoothing=0.2),
    expression_case("focal"),
    expression_case("focal", focal_gamma=0.5, label_smoothing=0.1, weighted=True),
    au_case("bce"),
    au_case("weighted_bce"),
    au_case("focal"),
    au_case("focal", weighted=True),
    va_case("ccc"),
    va_case("mse"),
    va_case("ccc+mse"),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("name,loss,reference", CASES, ids=CASE_IDS)
def test_matches_float64_reference(data, name, loss, reference):
  value = jax.jit(loss)(data)
  assert value.dtype == jnp.float32 and value.shape == ()
  np.testing.assert_allclose(value, reference(data), rtol=2e-6, atol=1e-6, err_msg=name)


def test_hand_values():
  # Uniform logits: CE = log K whatever the label; focal = (1 - 1/K)^2 log K.
  logits, labels, mask = np.zeros((2, 4), np.float32), np.array([1, 3]), np.ones(2)
  assert losses.expression_loss(logits, labels, mask) == pytest.approx(np.log(4), rel=1e-6)
  assert losses.expression_loss(logits, labels, mask, kind="focal") == pytest.approx(
      0.75 ** 2 * np.log(4), rel=1e-6)
  # Logit 0: BCE = log 2 for either label; pos_weight 3 on a positive: 3 log 2.
  zeros = np.zeros((1, 1), np.float32)
  assert losses.au_loss(zeros, np.zeros((1, 1)), np.ones((1, 1))) == pytest.approx(np.log(2))
  assert losses.au_loss(zeros, np.ones((1, 1)), np.ones((1, 1)), kind="weighted_bce",
                        pos_weight=np.array([3.0])) == pytest.approx(3 * np.log(2))
  # Perfect VA predictions: 1 - CCC = 0; negated zero-mean ones: CCC = -1, loss 2.
  va = np.array([[0.1, -0.5], [0.4, 0.2], [-0.5, 0.3]], np.float32)
  assert losses.va_loss(va, va, np.ones(3)) == pytest.approx(0.0, abs=1e-6)
  assert losses.va_loss(-va, va, np.ones(3)) == pytest.approx(2.0, abs=1e-6)
  assert losses.va_loss(va + 0.5, va, np.ones(3), kind="mse") == pytest.approx(0.25)


def test_torch_conventions(data):
  import torch  # pylint: disable=g-import-not-at-top  (a test extra)
  valid = data["expr_mask"] > 0
  expected = torch.nn.CrossEntropyLoss(weight=torch.tensor(data["class_weights"]),
                                       label_smoothing=0.2)(
      torch.tensor(data["expr_logits"][valid]), torch.tensor(data["expr_labels"][valid]).long())
  value = losses.expression_loss(data["expr_logits"], data["expr_labels"], data["expr_mask"],
                                 kind="weighted_ce", class_weights=data["class_weights"],
                                 label_smoothing=0.2)
  assert float(value) == pytest.approx(float(expected), rel=1e-5)
  valid = data["au_mask"] > 0
  expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data["pos_weight"]),
                                        reduction="none")(
      torch.tensor(data["au_logits"]), torch.tensor(data["au_labels"]))[torch.tensor(valid)].mean()
  value = losses.au_loss(data["au_logits"], data["au_labels"], data["au_mask"],
                         kind="weighted_bce", pos_weight=data["pos_weight"])
  assert float(value) == pytest.approx(float(expected), rel=1e-5)


def masked_out(d):
  return dict(d, expr_mask=np.zeros_like(d["expr_mask"]), au_mask=np.zeros_like(d["au_mask"]),
              va_mask=np.zeros_like(d["va_mask"]))


PREDICTION_KEY = {"expression": "expr_logits", "au": "au_logits", "va": "va_pred"}


@pytest.mark.parametrize("name,loss,reference", CASES, ids=CASE_IDS)
def test_all_masked_is_zero_with_zero_gradients(data, name, loss, reference):
  empty = masked_out(data)
  key = PREDICTION_KEY[name.split("-")[0]]

  def loss_of_predictions(predictions):
    return loss(dict(empty, **{key: predictions}))
  value, gradient = jax.jit(jax.value_and_grad(loss_of_predictions))(empty[key])
  assert float(value) == 0.0
  assert np.all(np.asarray(gradient) == 0.0)


@pytest.mark.parametrize("kind", losses.VA_LOSS_KINDS)
def test_ccc_with_one_valid_frame_is_finite(data, kind):
  mask = np.zeros_like(data["va_mask"])
  mask[5] = 1.0
  value, gradient = jax.value_and_grad(
      lambda p: losses.va_loss(p, data["va_target"], mask, kind=kind))(data["va_pred"])
  assert np.isfinite(value) and np.all(np.isfinite(gradient))
  if kind == "ccc":
    assert float(value) == 0.0
  # Constant predictions equal to constant targets: zero CCC denominator, still finite.
  constant = np.full((4, 2), 0.3, np.float32)
  value, gradient = jax.value_and_grad(
      lambda p: losses.va_loss(p, constant, np.ones(4), kind=kind))(constant)
  assert np.isfinite(value) and np.all(np.isfinite(gradient))


def test_extreme_logits_stay_finite():
  # p_t rounds to exactly 1 here, where (1 - p_t)^0.5 has an infinite derivative.
  logits = np.array([[200.0, -200.0, 0.0], [-200.0, 200.0, 50.0]], np.float32)
  for kind in losses.EXPRESSION_LOSS_KINDS:
    weights = np.ones(3) if kind == "weighted_ce" else None
    value, gradient = jax.value_and_grad(lambda x: losses.expression_loss(
        x, np.array([1, 1]), np.ones(2), kind=kind, class_weights=weights,
        focal_gamma=0.5))(logits)
    assert np.isfinite(value) and np.all(np.isfinite(gradient)), kind
    if kind != "focal":
      assert float(value) == pytest.approx(0.5 * 400.0, rel=1e-4)
  labels = np.array([[0, 1, 1], [1, 0, 0]], np.float32)
  for kind in losses.AU_LOSS_KINDS:
    weights = np.full(3, 5.0) if kind == "weighted_bce" else None
    value, gradient = jax.value_and_grad(lambda x: losses.au_loss(
        x, labels, np.ones((2, 3)), kind=kind, pos_weight=weights, focal_gamma=0.5))(logits)
    assert np.isfinite(value) and np.all(np.isfinite(gradient)), kind


# ---------------------------------------------------------------------------------
# eight devices
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8
  return Mesh(jax.devices(), ("data",))


@pytest.mark.parametrize("name,loss,reference", CASES, ids=CASE_IDS)
def test_eight_devices_equal_global_batch(data, mesh, name, loss, reference):
  sharded_data = {k: v for k, v in data.items() if k not in ("class_weights", "pos_weight")}
  weights = {k: data[k] for k in ("class_weights", "pos_weight")}
  sharded = jax.jit(jax.shard_map(
      lambda d, w: loss(dict(d, **w), axis_name="data"), mesh=mesh,
      in_specs=(P("data"), P()), out_specs=P()))(sharded_data, weights)
  np.testing.assert_allclose(sharded, jax.jit(loss)(data), rtol=0, atol=1e-6, err_msg=name)


def test_gradient_of_sharded_loss_is_global_gradient(data, mesh):
  # A linear layer with replicated parameters under all three losses: jax.grad inside
  # shard_map must give, on every device, the gradient of the global-batch loss.
  rng = np.random.default_rng(3)
  features = rng.normal(size=(64, 5)).astype(np.float32)
  params = {name: (0.5 * rng.normal(size=(5, width))).astype(np.float32)
            for name, width in (("expression", NUM_CLASSES), ("au", NUM_AUS), ("va", 2))}
  batch = {k: data[k] for k in ("expr_labels", "expr_mask", "au_labels", "au_mask",
                                "va_target", "va_mask")}

  def total_loss(params, features, batch, axis_name=None):
    task_losses = {
        "expression": losses.expression_loss(features @ params["expression"], batch["expr_labels"],
                                             batch["expr_mask"], axis_name=axis_name),
        "au": losses.au_loss(features @ params["au"], batch["au_labels"], batch["au_mask"],
                             axis_name=axis_name),
        "va": losses.va_loss(jnp.tanh(features @ params["va"]), batch["va_target"],
                             batch["va_mask"], axis_name=axis_name),
    }
    return losses.combine_task_losses(task_losses)[0]

  expected = jax.grad(total_loss)(params, features, batch)
  sharded = jax.jit(jax.shard_map(
      lambda p, f, b: jax.grad(total_loss)(p, f, b, "data"), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=P()))(params, features, batch)
  for name in params:
    np.testing.assert_allclose(sharded[name], expected[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------
# weights and combination
# ---------------------------------------------------------------------------------


def test_class_weights_from_counts():
  weights = losses.class_weights_from_counts([10, 0, 30, 60])
  np.testing.assert_allclose(weights, [2.0, 0.0, 2 / 3, 1 / 3], rtol=1e-6)
  assert weights[[0, 2, 3]].mean() == pytest.approx(1.0)
  with pytest.raises(ValueError):
    losses.class_weights_from_counts([0, 0])


def test_pos_weights_from_counts():
  weights = losses.pos_weights_from_counts([10, 0, 50, 0, 1], [100, 100, 100, 0, 1000])
  np.testing.assert_allclose(weights, [9.0, 100.0, 1.0, 1.0, 100.0])
  np.testing.assert_allclose(
      losses.pos_weights_from_counts([1], [1000], max_weight=500.0), [500.0])
  with pytest.raises(ValueError):
    losses.pos_weights_from_counts([5], [4])


def test_combine_with_fixed_weights():
  task_losses = {"expression": jnp.float32(2.0), "au": jnp.float32(0.5)}
  total, terms = losses.combine_task_losses(task_losses, weights={"expression": 0.5, "va": 9.0})
  assert float(total) == pytest.approx(2.0 * 0.5 + 0.5)  # au defaults to 1, va absent
  assert set(terms) == {"expression", "au"}
  total, _ = losses.combine_task_losses(task_losses)
  assert float(total) == pytest.approx(2.5)


def test_combine_with_uncertainty():
  task_losses = {"expression": jnp.float32(2.0), "au": jnp.float32(0.5), "va": jnp.float32(0.8)}
  log_variances = {"expression": jnp.float32(0.3), "au": jnp.float32(-1.0), "va": jnp.float32(0.0)}

  def total(log_variances):
    return losses.combine_task_losses(task_losses, log_variances=log_variances)[0]
  expected = sum(np.exp(-float(log_variances[t])) * float(task_losses[t]) + float(log_variances[t])
                 for t in task_losses)
  assert float(total(log_variances)) == pytest.approx(expected, rel=1e-6)
  gradient = jax.grad(total)(log_variances)
  for task in task_losses:  # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    assert float(gradient[task]) == pytest.approx(
        1 - np.exp(-float(log_variances[task])) * float(task_losses[task]), rel=1e-6)
  with pytest.raises(ValueError, match="log variance"):
    losses.combine_task_losses(task_losses, log_variances={"au": jnp.float32(0.0)})
  with pytest.raises(ValueError, match="either"):
    losses.combine_task_losses(task_losses, weights={}, log_variances=log_variances)


def test_unknown_or_inconsistent_kind_raises(data):
  with pytest.raises(ValueError, match="unknown expression loss kind"):
    losses.expression_loss(data["expr_logits"], data["expr_labels"], data["expr_mask"], kind="nll")
  with pytest.raises(ValueError, match="needs class_weights"):
    losses.expression_loss(data["expr_logits"], data["expr_labels"], data["expr_mask"],
                           kind="weighted_ce")
  with pytest.raises(ValueError, match="weighted_ce"):
    losses.expression_loss(data["expr_logits"], data["expr_labels"], data["expr_mask"],
                           class_weights=data["class_weights"])
  with pytest.raises(ValueError, match="unknown AU loss kind"):
    losses.au_loss(data["au_logits"], data["au_labels"], data["au_mask"], kind="hinge")
  with pytest.raises(ValueError, match="needs pos_weight"):
    losses.au_loss(data["au_logits"], data["au_labels"], data["au_mask"], kind="weighted_bce")
  with pytest.raises(ValueError, match="unknown VA loss kind"):
    losses.va_loss(data["va_pred"], data["va_target"], data["va_mask"], kind="l1")
