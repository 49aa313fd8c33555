"""Temporal heads over windows of frame embeddings: a (bidirectional) GRU or a small
Transformer encoder, then the frame model's task heads at every frame."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from affect_jax.model.multitask import TaskHead
from affect_jax.vocabulary import NUM_AUS, NUM_VA, TASKS

KINDS = ("gru", "transformer")


class GRUEncoder(nn.Module):
  hidden_dim: int
  num_layers: int
  bidirectional: bool

  @nn.compact
  def __call__(self, x):
    for layer in range(self.num_layers):
      # A zero carry derived from the input: inside shard_map it is then "varying"
      # over the data axis like the carry the scan computes (check_vma).
      carry = jnp.zeros_like(x[:, 0, :1]) + jnp.zeros((self.hidden_dim,), x.dtype)
      forward = nn.RNN(nn.GRUCell(self.hidden_dim), name=f"forward_{layer}")(
          x, initial_carry=carry)
      if self.bidirectional:
        backward = nn.RNN(nn.GRUCell(self.hidden_dim), reverse=True, keep_order=True,
                          name=f"backward_{layer}")(x, initial_carry=carry)
        forward = jnp.concatenate([forward, backward], axis=-1)
      x = forward
    return x


class TransformerEncoder(nn.Module):
  """Pre-norm encoder layers with learned positions (windows have a fixed length)."""
  hidden_dim: int
  num_layers: int
  num_heads: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    length = x.shape[-2]
    positions = self.param("positions", nn.initializers.normal(0.02),
                           (length, self.hidden_dim))
    x = nn.Dense(self.hidden_dim, name="input")(x) + positions
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    for layer in range(self.num_layers):
      y = nn.LayerNorm(name=f"attention_norm_{layer}")(x)
      y = nn.MultiHeadDotProductAttention(self.num_heads, name=f"attention_{layer}")(y, y)
      x = x + drop(y)
      y = nn.LayerNorm(name=f"mlp_norm_{layer}")(x)
      y = nn.Dense(4 * self.hidden_dim, name=f"mlp_in_{layer}")(y)
      y = nn.Dense(self.hidden_dim, name=f"mlp_out_{layer}")(nn.gelu(y))
      x = x + drop(y)
    return nn.LayerNorm(name="output_norm")(x)


class TemporalNet(nn.Module):
  """[B, T, D] embeddings -> per-frame outputs [B, T, ...] of the enabled tasks, as the
  frame model gives them: `expression` logits, `au` logits, `va` in [-1, 1]."""

  kind: str = "gru"
  tasks: tuple[str, ...] = TASKS
  num_expr_classes: int = 8
  hidden_dim: int = 128
  num_layers: int = 1
  num_heads: int = 4
  bidirectional: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, embeddings, *, train: bool):
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(
        embeddings.astype(jnp.float32))
    if self.kind == "gru":
      x = GRUEncoder(self.hidden_dim, self.num_layers, self.bidirectional,
                     name="encoder")(x)
    elif self.kind == "transformer":
      x = TransformerEncoder(self.hidden_dim, self.num_layers, self.num_heads,
                             self.dropout_rate, name="encoder")(x, train=train)
    else:
      raise ValueError(f"unknown temporal model kind {self.kind!r}; one of {KINDS}")
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    num_outputs = {"expression": self.num_expr_classes, "au": NUM_AUS, "va": NUM_VA}
    outputs = {task: TaskHead(num_outputs[task], name=f"{task}_head")(x)
               for task in TASKS if task in self.tasks}
    if "va" in outputs:
      outputs["va"] = jnp.tanh(outputs["va"])
    return outputs


def create_model(config) -> TemporalNet:
  model = config.model
  return TemporalNet(kind=model.kind, tasks=tuple(model.tasks),
                     num_expr_classes=model.num_expr_classes, hidden_dim=model.hidden_dim,
                     num_layers=model.num_layers, num_heads=model.num_heads,
                     bidirectional=model.bidirectional,
                     dropout_rate=model.dropout_rate)
