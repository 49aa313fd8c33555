"""Process set-up that must happen before JAX starts its threads: on a host that can run
JAX on its CPU only, the CPU backend's malloc settings (affect_jax.cpu.host_memory).

glibc's malloc settings must be in place before XLA's thread pools first allocate:
set later, the threads keep arenas that map every step's temporaries afresh
(benchmarks/heap_reuse.py: the same page faults as no settings at all). So the
commands call `prepare_before_jax(config.model.implementation)` before anything touches
the devices, and it acts only where the run can only be a CPU run: JAX_PLATFORMS names
the CPU alone, or no accelerator plugin (a CUDA/ROCm PJRT plugin, libtpu) is installed.
A host with an accelerator, and any run with implementation "xla", imports nothing of
affect_jax.cpu here and keeps glibc's defaults.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os


def accelerator_plugin_installed() -> bool:
  """Whether JAX could find a GPU or TPU backend here (without starting JAX)."""
  return (bool(importlib.metadata.entry_points(group="jax_plugins"))
          or importlib.util.find_spec("libtpu") is not None)


def cpu_only_host(environ=None) -> bool:
  """Whether JAX can only run on this host's CPU."""
  platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
  if platforms:
    return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
  return not accelerator_plugin_installed()


def prepare_before_jax(implementation: str = "auto") -> bool:
  """The CPU implementation's malloc settings, where this run can only be a CPU run
  with the "cpu" formulation ("auto" or "cpu" on a CPU-only host); True where set."""
  if implementation == "xla" or not cpu_only_host():
    return False
  from affect_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
  return host_memory.reuse_freed_memory()
