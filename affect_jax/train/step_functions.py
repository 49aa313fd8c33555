"""The train and eval steps: per-device code (see affect_jax.train.loop) compiled as
`jax.shard_map` under `jax.jit` over a mesh of all devices."""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from affect_jax.data import device_resident, pipeline
from affect_jax.data_parallel import AXIS
from affect_jax.eval import metrics
from affect_jax.train import losses
from affect_jax.train.train_state import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """What the loss needs besides outputs and labels; constants of the compiled step."""
  tasks: tuple[str, ...]
  expression: str = "ce"
  au: str = "bce"
  va: str = "ccc"
  label_smoothing: float = 0.0
  focal_gamma: float = 2.0
  weighting: str = "fixed"
  weights: tuple[tuple[str, float], ...] = ()
  class_weights: tuple[float, ...] | None = None
  au_pos_weights: tuple[float, ...] | None = None


def loss_settings_from_config(config, label_statistics: dict | None) -> LossSettings:
  """Fixes the loss; class / positive weights come from the training-set counts."""
  cfg = config.loss
  tasks = tuple(config.model.tasks)
  class_weights = pos_weights = None
  if "expression" in tasks and cfg.expression == "weighted_ce":
    counts = _required_counts(label_statistics, "expr_class_counts")
    class_weights = tuple(float(w) for w in losses.class_weights_from_counts(counts))
  if "au" in tasks and cfg.au == "weighted_bce":
    positives = _required_counts(label_statistics, "au_positive_counts")
    totals = [label_statistics["labelled"]["au"]] * len(positives)
    pos_weights = tuple(float(w) for w in losses.pos_weights_from_counts(positives,
                                                                          totals))
  return LossSettings(
      tasks=tasks, expression=cfg.expression, au=cfg.au, va=cfg.va,
      label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma,
      weighting=cfg.weighting, weights=tuple(sorted(cfg.weights.items())),
      class_weights=class_weights, au_pos_weights=pos_weights)


def _required_counts(label_statistics, key):
  if not label_statistics or key not in label_statistics:
    raise ValueError(f"a weighted loss needs the training split's {key}, which the "
                     "dataset's metadata summary lacks (rebuild it with "
                     "affect-jax build)")
  return np.asarray(label_statistics[key], np.float64)


def task_losses(outputs, batch, settings: LossSettings, axis_name) -> dict:
  """The masked loss of each enabled task over the global batch."""
  result = {}
  if "expression" in settings.tasks:
    result["expression"] = losses.expression_loss(
        outputs["expression"], batch["expression"], batch["expression_mask"],
        kind=settings.expression, class_weights=_array_or_none(settings.class_weights),
        label_smoothing=settings.label_smoothing, focal_gamma=settings.focal_gamma,
        axis_name=axis_name)
  if "au" in settings.tasks:
    result["au"] = losses.au_loss(
        outputs["au"], batch["au"], batch["au_mask"], kind=settings.au,
        pos_weight=_array_or_none(settings.au_pos_weights),
        focal_gamma=settings.focal_gamma, axis_name=axis_name)
  if "va" in settings.tasks:
    result["va"] = losses.va_loss(outputs["va"], batch["valence_arousal"],
                                  batch["va_mask"], kind=settings.va,
                                  axis_name=axis_name)
  return result


def _array_or_none(values):
  return None if values is None else jnp.asarray(values, jnp.float32)


def train_step(state: TrainState, batch: dict, *, settings: LossSettings,
               learning_rate_fn: Callable, dtype, seed: int, axis_name: str = AXIS):
  """One SGD step on the global batch (per-device code; see the module docstring)."""
  dropout_rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                                      state.step),
                                   jax.lax.axis_index(axis_name))
  images = pipeline.normalize_images(batch["image"], dtype)

  def loss_fn(params):
    outputs, new_model_state = state.apply_fn(
        {"params": params["model"], "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    per_task = task_losses(outputs, batch, settings, axis_name)
    uncertainty = settings.weighting == "uncertainty"
    total, _ = losses.combine_task_losses(
        per_task, weights=None if uncertainty else dict(settings.weights),
        log_variances=params["loss"] if uncertainty else None)
    return total, (new_model_state, per_task)

  (total, (new_model_state, per_task)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # A non-finite loss or gradient (a bad batch, an overflow) must not poison the
  # weights: the update is skipped, the step still counts, the host counts the streak.
  finite = jnp.isfinite(total) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  updated = state.apply_gradients(grads=grads,
                                  batch_stats=new_model_state["batch_stats"])
  # Chosen by a branch rather than a select over every leaf: 75 MB less memory traffic
  # per step on a TPU v5e (compiled ahead of time, docs/ACCELERATORS.md); computing the
  # update inside the branch measured no better.
  new_state = jax.lax.cond(finite, lambda: updated,
                           lambda: state.replace(step=updated.step))
  step_metrics = {f"loss_{task}": value for task, value in per_task.items()}
  step_metrics["loss"] = sum(per_task.values())
  step_metrics["finite"] = finite.astype(jnp.float32)
  step_metrics["learning_rate"] = learning_rate_fn(state.step)
  if settings.weighting == "uncertainty":
    step_metrics.update({f"log_variance_{t}": v for t, v in state.params["loss"].items()})
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict, *, num_expr_classes: int, dtype,
              au_thresholds=None, axis_name: str = AXIS):
  """Sufficient statistics of one global batch, and the per-frame outputs."""
  images = pipeline.normalize_images(batch["image"], dtype)
  outputs = state.apply_fn({"params": state.params["model"],
                            "batch_stats": state.batch_stats}, images, train=False)
  statistics = metrics.batch_statistics(outputs, batch,
                                        num_expr_classes=num_expr_classes,
                                        au_thresholds=au_thresholds,
                                        axis_name=axis_name)
  return statistics, outputs


def _compile(step, mesh: Mesh, out_specs, compiler_options: dict | None, **jit_kwargs):
  """`step` under shard_map over `mesh` (state replicated, batch split), jitted with
  compiler_options (None: XLA's defaults; implementation.compiler_options gives the
  implementation's)."""
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs)
  return jax.jit(sharded, compiler_options=compiler_options or None, **jit_kwargs)


def task_probabilities(outputs: dict) -> dict:
  """The network's outputs as predictions: expression and AU probabilities, VA
  (float32), for the tasks the model has."""
  result = {}
  if "expression" in outputs:
    result["expression"] = jax.nn.softmax(outputs["expression"].astype(jnp.float32), -1)
  if "au" in outputs:
    result["au"] = jax.nn.sigmoid(outputs["au"].astype(jnp.float32))
  if "va" in outputs:
    result["va"] = outputs["va"].astype(jnp.float32)
  return result


def predict_step(state, images, *, dtype):
  """Per-device forward pass: expression and AU probabilities, VA (float32)."""
  return task_probabilities(state.apply_fn(
      {"params": state.params["model"], "batch_stats": state.batch_stats},
      pipeline.normalize_images(images, dtype), train=False))


def compile_train_step(mesh: Mesh, compiler_options: dict | None = None, **step_kwargs):
  return _compile(functools.partial(train_step, **step_kwargs), mesh, (P(), P()),
                  compiler_options, donate_argnums=(0,))


def compile_eval_step(mesh: Mesh, compiler_options: dict | None = None, **step_kwargs):
  return _compile(functools.partial(eval_step, **step_kwargs), mesh, (P(), P(AXIS)),
                  compiler_options)


def compile_predict_step(mesh: Mesh, compiler_options: dict | None = None, **step_kwargs):
  """(state, images) -> per-frame outputs, the images split over the data axis."""
  return _compile(functools.partial(predict_step, **step_kwargs), mesh, P(AXIS),
                  compiler_options)


def resident_train_step(state: TrainState, dataset, step_number, *, draw: Callable,
                        **step_kwargs):
  """Per-device code: draw this device's rows of the batch of `step_number` from its
  shard of the device-resident split, then the train step; also the rows' record
  indices (for the non-finite report)."""
  batch = draw(dataset, step_number)
  new_state, step_metrics = train_step(state, batch, **step_kwargs)
  return new_state, step_metrics, batch["record_index"]


def compile_resident_train_step(mesh: Mesh, draw_settings, compiler_options: dict | None
                                = None, **step_kwargs):
  """(state, dataset, step_number) -> (state, metrics, record indices): draw, augment
  and train step as one program over the device-resident split
  (affect_jax/data/device_resident.py), the dataset sharded over the data axis. No
  batch exists outside the program, so nothing waits on an input pipeline."""
  draw = functools.partial(device_resident.draw_shard_batch, settings=draw_settings)
  sharded = jax.shard_map(
      functools.partial(resident_train_step, draw=draw, **step_kwargs), mesh=mesh,
      in_specs=(P(), P(AXIS), P()), out_specs=(P(), P(), P(AXIS)))
  return jax.jit(sharded, compiler_options=compiler_options or None, donate_argnums=(0,))
