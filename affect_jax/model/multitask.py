"""The multi-task affect network: a shared ResNet backbone and one head per task.

``MultiTaskNet`` nests the backbone under ``backbone`` and adds ``expression_head``,
``au_head`` and ``va_head`` (each ``TaskHead``: an optional ``hidden`` Dense layer and
an ``output`` Dense layer).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from affect_jax.data_parallel import AXIS
from affect_jax.model.implementation import network_layers
from affect_jax.model.resnet import ResNet
from affect_jax.vocabulary import NUM_AUS, NUM_VA, TASKS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TaskHead(nn.Module):
  """Linear head, or a one-hidden-layer ReLU MLP when hidden_dim > 0; float32 throughout.

  Heads are small, so computing them in float32 costs nothing under bf16 and keeps the
  logits exact. Flax's Dense init (LeCun normal, zero bias) is kept: torchvision's fc
  init is never imported.
  """

  num_outputs: int
  hidden_dim: int = 0

  @nn.compact
  def __call__(self, features):
    x = features
    if self.hidden_dim > 0:
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=jnp.float32, name="hidden")(x))
    return nn.Dense(self.num_outputs, dtype=jnp.float32, name="output")(x)


class MultiTaskNet(nn.Module):
  """Shared ResNet backbone -> pooled feature -> dropout -> one head per enabled task.

  ``__call__(images, train=..., return_features=False)`` returns a dict with, for the
  enabled tasks only: ``expression`` [B, num_expr_classes] logits, ``au`` [B, 12]
  logits, ``va`` [B, 2] in [-1, 1] (tanh); plus ``features`` [B, 512] (the pooled
  backbone output, before dropout) when ``return_features``. All float32. Dropout
  (train only) draws from the 'dropout' rng stream.
  """

  tasks: tuple[str, ...] = TASKS
  num_expr_classes: int = 8
  head_hidden_dim: int = 0
  dropout_rate: float = 0.0
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_filters: int = 64
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  zero_init_last_bn: bool = False
  implementation: str = "xla"  # resolved: "xla" or "cpu" (model.implementation)

  @nn.compact
  def __call__(self, images, *, train: bool, return_features: bool = False):
    unknown = set(self.tasks) - set(TASKS)
    if unknown or not self.tasks:
      raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
    features = ResNet(stage_sizes=self.stage_sizes, num_filters=self.num_filters,
                      dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      bn_momentum=self.bn_momentum,
                      zero_init_last_bn=self.zero_init_last_bn,
                      layers=network_layers(self.implementation), name="backbone")(
                          images, train=train)
    head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    num_outputs = {"expression": self.num_expr_classes, "au": NUM_AUS, "va": NUM_VA}
    outputs = {task: TaskHead(num_outputs[task], self.head_hidden_dim,
                              name=f"{task}_head")(head_input)
               for task in TASKS if task in self.tasks}
    if "va" in outputs:
      outputs["va"] = jnp.tanh(outputs["va"])
    if return_features:
      outputs["features"] = features
    return outputs


def create_model(model_config, implementation: str, *,
                 axis_name: str | None = AXIS) -> MultiTaskNet:
  """The network of `model_config` in a resolved implementation ("xla" or "cpu"; see
  affect_jax.model.implementation.implementation_for)."""
  return MultiTaskNet(
      tasks=tuple(model_config.tasks), num_expr_classes=model_config.num_expr_classes,
      head_hidden_dim=model_config.head_hidden_dim,
      dropout_rate=model_config.dropout_rate,
      stage_sizes=tuple(model_config.stage_sizes), num_filters=model_config.num_filters,
      dtype=DTYPES[model_config.dtype],
      bn_axis_name=axis_name if model_config.sync_batch_norm else None,
      implementation=implementation)
