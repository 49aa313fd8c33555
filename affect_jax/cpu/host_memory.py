"""Host memory reuse between XLA:CPU executions (glibc's malloc settings).

XLA:CPU allocates the temporaries of one execution as a single block (240 MB for the
ResNet-18 train step at batch 32) and frees it afterwards. glibc serves blocks above 32
MB with a fresh mmap every time, so every step touches 240 MB of new pages: 58,600
page faults and 0.13 s of kernel time in a 1.34 s step on this project's CPU
(docs/PERFORMANCE.md). With one malloc arena, no mmap and no trimming, the freed block
stays in the heap and the next step reuses it: no faults, 1.34 -> 1.20 s per step.
(PyTorch does not pay this: its eager ops allocate blocks of at most 26 MB, which
glibc keeps.)

glibc reads these settings only when a process starts, so the command-line entry
points call ``reexec_with_heap_reuse()`` before they import JAX: it re-executes the
same command once with the settings added to GLIBC_TUNABLES, then gives its child
processes the original environment back. The cost is that freed memory is not
returned to the system while the process lives (its peak stays resident), and malloc
has one lock for all threads. ``AFFECT_JAX_HEAP_REUSE=0`` turns
it off (also for debuggers, which the exec would restart); it does nothing on other C
libraries and systems, or where JAX_PLATFORMS names accelerators only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                   "glibc.malloc.trim_threshold=1099511627776")
APPLIED_MARK = "AFFECT_JAX_HEAP_REUSE_APPLIED"
USER_TUNABLES = "AFFECT_JAX_USER_GLIBC_TUNABLES"  # the user's own, restored after exec
SWITCH = "AFFECT_JAX_HEAP_REUSE"
_applied_tunables: str | None = None  # what this process started with, once re-executed


def applied_tunables() -> str | None:
  """The GLIBC_TUNABLES this process was re-executed with (None: not re-executed)."""
  return _applied_tunables


def environment_with_heap_reuse(environ) -> dict | None:
  """The environment to re-execute with, or None where nothing is to be done (turned
  off, already applied, not glibc, or JAX told to use an accelerator only). The user's
  own GLIBC_TUNABLES come last, so they win where they name the same setting."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if (environ.get(SWITCH, "1") == "0" or environ.get(APPLIED_MARK)
      or (platforms and "cpu" not in platforms.split(","))
      or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
    return None
  user = environ.get("GLIBC_TUNABLES")
  tunables = [*MALLOC_TUNABLES, *filter(None, [user])]
  return {**environ, "GLIBC_TUNABLES": ":".join(tunables), APPLIED_MARK: "1",
          **({USER_TUNABLES: user} if user else {})}


def restore_user_environment(environ) -> None:
  """After the re-execution glibc has read the settings: give child processes (input
  workers, compilers, subprocess runs) the user's environment back. An entry point
  started as a child (a study's training runs) then applies the settings to itself."""
  environ.pop(APPLIED_MARK, None)
  user = environ.pop(USER_TUNABLES, None)
  if user is None:
    environ.pop("GLIBC_TUNABLES", None)
  else:
    environ["GLIBC_TUNABLES"] = user


def reexec_with_heap_reuse() -> None:
  """Replaces this process by the same command with the malloc settings (same PID,
  arguments and environment otherwise), once; returns where nothing is to be done, or
  where the exec fails (then with glibc's defaults)."""
  global _applied_tunables
  if os.environ.get(APPLIED_MARK):  # this is the re-executed process
    _applied_tunables = os.environ.get("GLIBC_TUNABLES")
    restore_user_environment(os.environ)
    return
  environ = environment_with_heap_reuse(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
  except OSError as error:
    print(f"affect_jax.cpu.host_memory: could not re-execute with malloc settings ({error});"
          " going on with glibc's defaults", file=sys.stderr)


# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


@functools.cache
def reuse_freed_memory() -> bool:
  """The same malloc settings set in this process through mallopt (no re-execution):
  one arena, no mmap, no trimming (a threshold of -1 is SIZE_MAX to glibc). Once per
  process; False where the C library is not glibc or AFFECT_JAX_HEAP_REUSE=0."""
  if (os.environ.get(SWITCH, "1") == "0" or platform.system() != "Linux"
      or platform.libc_ver()[0] != "glibc"):
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
  logging.getLogger(__name__).info("glibc malloc: freed memory kept for reuse (%s)",
                                   "applied" if applied else "refused")
  return applied
