"""Helpers shared by the benchmark scripts: machine description, load, medians, output.

Timings on a shared 2-core machine are noisy, so every script measures a contender and
its peer interleaved in rounds, reports medians and their ratio, and records the load
average (`os.getloadavg`, what `uptime` prints) before and after.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import numpy as np

from affect_jax import host_memory, onednn_conv


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REHEARSAL_ENV = "AFFECT_JAX_BENCH_REHEARSAL"  # set by run_accelerator.sh --rehearse
DRY_RUN_ENV = "AFFECT_JAX_BENCH_DRY_RUN"  # set by run_accelerator.sh --dry-run


def module_at(path: str, revision: str) -> tuple[types.ModuleType, str]:
  """(the repository's file `path` as it was at git `revision`, loaded as a module of
  its own, the revision's short hash): the "before" peer of a same-run before/after.
  OSError or CalledProcessError where git or the revision is not there (a copy of the
  tree without .git)."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, check=True,
                          capture_output=True).stdout
  commit = git("rev-parse", "--short", revision).decode().strip()
  source = git("show", f"{commit}:{path}")
  module = types.ModuleType(f"{os.path.splitext(os.path.basename(path))[0]}_at_{commit}")
  sys.modules[module.__name__] = module  # dataclasses look their module up there
  exec(compile(source, f"{path}@{commit}", "exec"), module.__dict__)  # noqa: S102
  return module, commit


def parse_args(parser):
  """`parser.parse_args()`; under run_accelerator.sh --dry-run, print the parsed
  arguments as a JSON line (`dry_run`: the script's name) and exit: the script's
  full-size commands are checked against each benchmark's own parser without running."""
  args = parser.parse_args()
  if os.environ.get(DRY_RUN_ENV) == "1":
    print(json.dumps({"dry_run": os.path.basename(sys.argv[0]), **vars(args)}))
    sys.exit(0)
  return args


def xla_cost(compiled, key: str = "flops") -> float | None:
  """One figure of XLA's cost analysis of a compiled step ("flops", "bytes accessed"),
  None where the back end gives none. It counts what XLA compiled, not FFI calls."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis[key]) if analysis and key in analysis else None


def load_config(path: str):
  """The ml_collections config of the file `path` (its `get_config()`); a relative
  path not found from the working directory is read from the repository's root."""
  if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
  """Date, CPU, cores of the machine and cores this process may run on (`taskset -c 0`
  pins a run to one core: XLA's thread pool and torch's OpenMP both size themselves
  from the affinity mask, which makes a 1-thread against 1-thread comparison that
  suffers less from other processes' load than 2 threads against 2). Rows of
  `run_accelerator.sh --rehearse` say so (`rehearsal`): their figures mean nothing."""
  rehearsal = {"rehearsal": True} if os.environ.get(REHEARSAL_ENV) == "1" else {}
  return {**rehearsal, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
          "cores": os.cpu_count(), "cores_used": len(os.sched_getaffinity(0)),
          "python": platform.python_version(),
          # host_memory's malloc settings (None: glibc's defaults, XLA:CPU's temporaries
          # page-faulted afresh every step) and the oneDNN convolutions (onednn_conv).
          "glibc_tunables": host_memory.applied_tunables(),
          "onednn_convolutions": onednn_conv.load().available}


def median(values) -> float:
  return float(statistics.median(values))


def timed(fn, repeats: int = 1) -> float:
  """Seconds per call of fn (which must block until its work is done)."""
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def emit(row: dict, out: str | None) -> None:
  line = json.dumps(row)
  print(line, flush=True)
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "a") as f:
      f.write(line + "\n")


def synthetic_batch(rng, size, image_size):
  """A fully labelled random batch in the training convention (uint8 images)."""
  return {
      "image": rng.integers(0, 256, (size, image_size, image_size, 3), dtype=np.uint8),
      "expression": rng.integers(0, 8, size).astype(np.int32),
      "expression_mask": np.ones(size, np.float32),
      "au": (rng.random((size, 12)) < 0.3).astype(np.float32),
      "au_mask": np.ones((size, 12), np.float32),
      "valence_arousal": rng.uniform(-1, 1, (size, 2)).astype(np.float32),
      "va_mask": np.ones(size, np.float32),
  }
