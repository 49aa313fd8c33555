"""Mesh typing inside jax.shard_map for hand-written derivatives and foreign calls."""
from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
  """Mesh axes over which x varies inside jax.shard_map (empty outside it). Read
  without a default: should JAX rename the attribute, this fails loudly instead of
  skipping the cast (a replication-check error or wrong gradients later)."""
  return frozenset(jax.typeof(x).manual_axis_type.varying)


def as_varying_like(value, x):
  """`value` typed as varying over x's mesh axes. Two uses: a custom_vjp's backward
  pass returns per-device parameter gradients, which shard_map's replication check only
  accepts for varying inputs (the transpose of this cast then sums them over the
  devices); and an FFI call's result carries no mesh type of its own although its
  values differ per device."""
  missing = varying_axes(x) - varying_axes(value)
  return lax.pcast(value, tuple(sorted(missing)), to="varying") if missing else value
