"""Host memory reuse between XLA:CPU executions (glibc's malloc settings), for CPU runs.

XLA:CPU allocates the temporaries of one execution as a single block (240 MB for the
ResNet-18 train step at batch 32) and frees it afterwards. glibc serves blocks above its
mmap threshold with a fresh mmap every time, so every step touches all those pages anew
(tens of thousands of page faults per step, a tenth of the step's time on this project's
CPU: docs/PERFORMANCE.md). With one malloc arena, no mmap and no trimming, the freed
block stays in the heap and the next step reuses it.

``reuse_freed_memory()`` sets these with ``mallopt`` in the running process, once, before
JAX starts its threads (affect_jax.host_setup decides when: CPU-only hosts, "cpu"
runs): then they give the same step time and page faults as the same settings read from
GLIBC_TUNABLES at process start, with no re-execution (benchmarks/heap_reuse.py). The cost: freed memory is not returned to the system while
the process lives (its peak stays resident), and malloc has one lock for all threads.
``AFFECT_JAX_HEAP_REUSE=0`` turns it off; it does nothing on other C libraries.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

SWITCH = "AFFECT_JAX_HEAP_REUSE"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1),       # threads allocate from the one heap that keeps blocks
            (M_MMAP_MAX, 0),        # large blocks from the heap, not fresh mmaps
            (M_TRIM_THRESHOLD, -1))  # -1 is SIZE_MAX to glibc: never trim the heap

log = logging.getLogger(__name__)
_applied = False  # whether this process runs with SETTINGS


def applied() -> bool:
  """Whether reuse_freed_memory() set SETTINGS in this process."""
  return _applied


def is_glibc() -> bool:
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def reuse_freed_memory() -> bool:
  """Applies SETTINGS through mallopt, once per process; True where glibc took them
  all, False where turned off (AFFECT_JAX_HEAP_REUSE=0) or not glibc."""
  if os.environ.get(SWITCH, "1") == "0" or not is_glibc():
    return False
  global _applied
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  _applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
  log.info("glibc malloc: freed memory kept for reuse between steps (%s)",
           "applied" if _applied else "refused")
  return _applied
