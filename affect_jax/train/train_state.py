"""The TrainState (parameters, BatchNorm statistics, optimizer state, step) and how it
is created: initialised from config.seed, or abstract (shapes and shardings) for a
restore; replicated over the mesh either way."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from affect_jax.model import multitask
from affect_jax.train.optimizers import create_optimizer


class TrainState(train_state.TrainState):
  batch_stats: Any


def initial_variables(model: multitask.MultiTaskNet, rng, image_size: int,
                      weighting: str) -> dict:
  """Model variables plus the loss's own trainable parameters (task log-variances)."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # BN sync needs a named axis; initialisation computes no statistics, so use a
  # twin model without it.
  variables = model.clone(bn_axis_name=None).init({"params": rng}, dummy, train=False)
  loss_params = {}
  if weighting == "uncertainty":
    loss_params = {task: jnp.zeros((), jnp.float32) for task in model.tasks}
  return {"params": {"model": variables["params"], "loss": loss_params},
          "batch_stats": variables.get("batch_stats", {})}


def _state_initializer(config, model, learning_rate_fn):
  tx = create_optimizer(config, learning_rate_fn)

  def init(rng):
    variables = initial_variables(model, rng, config.input.image_size,
                                  config.loss.weighting)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])

  return init


def init_key(seed: int):
  # The 'rbg' generator compiles in a fraction of threefry's time on XLA:CPU, where
  # threefry costs seconds per parameter shape; initialisation is its only user here.
  return jax.random.key(seed, impl="rbg")


def create_train_state(config, model, mesh: Mesh, learning_rate_fn) -> TrainState:
  """A replicated TrainState, initialised from config.seed on every device."""
  init = _state_initializer(config, model, learning_rate_fn)
  replicated = NamedSharding(mesh, P())
  return jax.jit(init, out_shardings=replicated)(init_key(config.seed))


def abstract_train_state(config, model, mesh: Mesh, learning_rate_fn) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState, computing nothing:
  what a restore needs."""
  init = _state_initializer(config, model, learning_rate_fn)
  shapes = jax.eval_shape(init, init_key(config.seed))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


