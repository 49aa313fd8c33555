"""Process set-up that must happen before JAX starts its threads: on a host that can run
JAX on its CPU only, the CPU backend's malloc settings (affect_jax.cpu.host_memory).

glibc's malloc settings must be in place before XLA's thread pools first allocate:
set later, the threads keep arenas that map every step's temporaries afresh
(benchmarks/heap_reuse.py: the same page faults as no settings at all). So the
commands call `prepare_before_jax(config.model.implementation)` before anything touches
the devices, and it acts only where the run can only be a CPU run: JAX_PLATFORMS names
the CPU alone, or no accelerator is present (a CUDA/ROCm PJRT plugin or libtpu installed
AND the devices they drive in /dev: a test or AOT-compile install of libtpu on a CPU
machine is no accelerator).
A host with an accelerator, and any run with implementation "xla", imports nothing of
affect_jax.cpu here and keeps glibc's defaults.
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd")  # CUDA, ROCm
TPU_DEVICE_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def _any_file(patterns) -> bool:
  return any(glob.glob(pattern) for pattern in patterns)


def accelerator_present() -> bool:
  """Whether JAX could start a GPU or TPU backend here (without starting JAX): a
  plugin for it is installed and its devices exist."""
  gpu = (bool(importlib.metadata.entry_points(group="jax_plugins"))
         and _any_file(GPU_DEVICE_FILES))
  tpu = importlib.util.find_spec("libtpu") is not None and _any_file(TPU_DEVICE_FILES)
  return gpu or tpu


def cpu_only_host(environ=None) -> bool:
  """Whether JAX can only run on this host's CPU."""
  platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
  if platforms:
    return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
  return not accelerator_present()


def prepare_before_jax(implementation: str = "auto") -> bool:
  """The CPU implementation's malloc settings, where this run can only be a CPU run
  with the "cpu" formulation ("auto" or "cpu" on a CPU-only host); True where set."""
  if implementation == "xla" or not cpu_only_host():
    return False
  from affect_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
  return host_memory.reuse_freed_memory()
