"""The temporal model's state and its train, eval and predict steps: per-device code
over batches of windows, compiled as `jax.shard_map` under `jax.jit` over the data
axis, exactly as the frame model's steps (affect_jax/train/step_functions.py).

A batch of B windows of T frames is B x T frames to the losses and the metrics: the
frame model's masked losses (`step_functions.task_losses`) and sufficient statistics
(`metrics.batch_statistics`) run on the flattened frames, with every frame a window
does not score masked out, so the frame and temporal scores are the same functions."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from affect_jax.data_parallel import AXIS
from affect_jax.eval import metrics
from affect_jax.temporal.store import LABEL_FIELDS
from affect_jax.train import losses, optimizers, step_functions
from affect_jax.train.train_state import TrainState, init_key


def _initializer(config, model, embedding_dim: int, learning_rate_fn):
  tx = optimizers.create_optimizer(config, learning_rate_fn)

  def init(rng):
    dummy = jnp.zeros((1, config.window.length, embedding_dim), jnp.float32)
    params = model.init({"params": rng}, dummy, train=False)["params"]
    loss_params = ({task: jnp.zeros((), jnp.float32) for task in model.tasks}
                   if config.loss.weighting == "uncertainty" else {})
    return TrainState.create(apply_fn=model.apply,
                             params={"model": params, "loss": loss_params}, tx=tx,
                             batch_stats={})

  return init


def create_state(config, model, embedding_dim: int, mesh: Mesh, learning_rate_fn):
  """A replicated state, initialised from config.seed."""
  init = _initializer(config, model, embedding_dim, learning_rate_fn)
  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(init_key(config.seed))


def abstract_state(config, model, embedding_dim: int, mesh: Mesh, learning_rate_fn):
  """Shapes and (replicated) shardings only: what a restore needs."""
  init = _initializer(config, model, embedding_dim, learning_rate_fn)
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                     sharding=replicated),
                      jax.eval_shape(init, init_key(config.seed)))


def frames_of(tree: dict) -> dict:
  """[B, T, ...] -> [B * T, ...]: windows as the frames the losses and metrics see."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in tree.items()}


def frame_labels(batch: dict) -> dict:
  """The labels of a batch of windows as frames; the masks already exclude every
  frame its window does not score (windows.assemble_window)."""
  return frames_of({k: batch[k] for k in LABEL_FIELDS})


def train_step(state: TrainState, batch: dict, *, settings, learning_rate_fn, seed: int,
               axis_name: str = AXIS):
  """One update on the global batch of windows; a non-finite loss or gradient skips
  it (the step counts, the host's NonFiniteGuard counts the streak)."""
  dropout_rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                                      state.step),
                                   jax.lax.axis_index(axis_name))
  labels = frame_labels(batch)

  def loss_fn(params):
    outputs = state.apply_fn({"params": params["model"]}, batch["embedding"],
                             train=True, rngs={"dropout": dropout_rng})
    per_task = step_functions.task_losses(frames_of(outputs), labels, settings,
                                          axis_name)
    uncertainty = settings.weighting == "uncertainty"
    total, _ = losses.combine_task_losses(
        per_task, weights=None if uncertainty else dict(settings.weights),
        log_variances=params["loss"] if uncertainty else None)
    return total, per_task

  (total, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(total) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  updated = state.apply_gradients(grads=grads)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                           state.replace(step=updated.step))
  step_metrics = {f"loss_{task}": value for task, value in per_task.items()}
  step_metrics["loss"] = sum(per_task.values())
  step_metrics["finite"] = finite.astype(jnp.float32)
  step_metrics["learning_rate"] = learning_rate_fn(state.step)
  return new_state, step_metrics


def probabilities(outputs: dict) -> dict:
  """Per-frame outputs in the frame model's prediction form: expression and AU
  probabilities, VA."""
  result = {}
  if "expression" in outputs:
    result["expression"] = jax.nn.softmax(outputs["expression"], -1)
  if "au" in outputs:
    result["au"] = jax.nn.sigmoid(outputs["au"])
  if "va" in outputs:
    result["va"] = outputs["va"]
  return result


def eval_step(state: TrainState, batch: dict, *, num_expr_classes: int,
              axis_name: str = AXIS):
  """Sufficient statistics of the scored frames of a global batch of windows, and
  every window's per-frame probabilities [B, T, ...]."""
  outputs = state.apply_fn({"params": state.params["model"]}, batch["embedding"],
                           train=False)
  statistics = metrics.batch_statistics(frames_of(outputs), frame_labels(batch),
                                        num_expr_classes=num_expr_classes,
                                        axis_name=axis_name)
  return statistics, probabilities(outputs)


def predict_step(state: TrainState, embeddings):
  return probabilities(state.apply_fn({"params": state.params["model"]}, embeddings,
                                      train=False))


def _compile(step, mesh: Mesh, in_specs, out_specs, **jit_kwargs):
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                 **jit_kwargs)


def compile_train_step(mesh: Mesh, **step_kwargs):
  return _compile(functools.partial(train_step, **step_kwargs), mesh, (P(), P(AXIS)),
                  (P(), P()), donate_argnums=(0,))


def compile_eval_step(mesh: Mesh, **step_kwargs):
  return _compile(functools.partial(eval_step, **step_kwargs), mesh, (P(), P(AXIS)),
                  (P(), P(AXIS)))


def compile_predict_step(mesh: Mesh):
  return _compile(predict_step, mesh, (P(), P(AXIS)), P(AXIS))
