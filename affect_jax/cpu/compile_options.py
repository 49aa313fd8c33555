"""XLA:CPU compile options of the "cpu" implementation's steps.

XLA:CPU hands convolutions, dots and reductions to YNNPACK by default; its convolution
kernel gradients are 2-4x slower than Eigen's here, so CPU steps keep YNNPACK for the
reductions and dots only (train step 1.2x; docs/PERFORMANCE.md). The option is a debug
option: it is probed once and left out where a jaxlib does not know it (an unknown
option is a compile error).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  cpu = jax.devices("cpu")[0]
  probe = jax.jit(lambda x: x + 1, compiler_options=dict(options))
  try:
    probe.lower(jax.ShapeDtypeStruct(
        (), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))).compile()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError and kin)
    log.info("XLA:CPU compile options %s not supported here (%s); using defaults",
             dict(options), str(e).splitlines()[0][:200])
    return False
  return True


def step_compiler_options() -> dict:
  """CPU_COMPILER_OPTIONS where this jaxlib accepts them, else none."""
  options = tuple(sorted(CPU_COMPILER_OPTIONS.items()))
  return dict(options) if _accepted(options) else {}
