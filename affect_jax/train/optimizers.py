"""The optax optimizer and learning-rate schedule a config asks for: SGD or AdamW with
warm-up, weight decay on kernels only, gradient clipping, and a backbone that can learn
at its own rate or stay frozen for its first steps."""
from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp
import optax


def create_learning_rate_fn(config) -> optax.Schedule:
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.num_train_steps)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)
  if opt.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, max(warmup, 1)),
         optax.constant_schedule(opt.learning_rate)], [warmup])
  raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}; cosine or constant")


def decay_mask(params) -> Any:
  """True for weights that take weight decay: kernels, not BN parameters or biases."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: path[-1] == "kernel", params)


def _base_optimizer(opt, learning_rate_fn) -> optax.GradientTransformation:
  if opt.name == "sgd":
    parts = []
    if opt.weight_decay:
      parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(learning_rate_fn, momentum=opt.momentum,
                           nesterov=opt.nesterov))
    return optax.chain(*parts)
  if opt.name == "adamw":
    return optax.adamw(learning_rate_fn, weight_decay=opt.weight_decay, mask=decay_mask)
  raise ValueError(f"unknown optimizer.name {opt.name!r}; expected sgd or adamw")


def parameter_part(params) -> Any:
  """'backbone' for the shared ResNet's parameters, 'heads' for everything else."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: "backbone" if path[:2] == ("model", "backbone") else "heads",
      params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """optax optimizer; the backbone can learn at a multiple of the heads' rate and stay
  frozen (no update at all, weight decay included) for its first steps."""
  opt = config.optimizer
  multiplier = opt.get("backbone_lr_multiplier", 1.0)
  freeze_steps = opt.get("freeze_backbone_steps", 0)
  backbone = _base_optimizer(opt, lambda step: learning_rate_fn(step) * multiplier)
  if freeze_steps:
    backbone = optax.chain(backbone, optax.scale_by_schedule(
        lambda step: (step >= freeze_steps).astype(jnp.float32)))
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if multiplier == 1.0 and not freeze_steps:
    parts.append(_base_optimizer(opt, learning_rate_fn))
  else:
    parts.append(optax.multi_transform(
        {"backbone": backbone, "heads": _base_optimizer(opt, learning_rate_fn)},
        parameter_part))
  return optax.chain(*parts)


