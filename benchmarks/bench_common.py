"""Helpers shared by the benchmark scripts: machine description, load, medians, output.

Timings on a shared 2-core machine are noisy, so every script measures a contender and
its peer interleaved in rounds, reports medians and their ratio, and records the load
average (`os.getloadavg`, what `uptime` prints) before and after.
"""
from __future__ import annotations

import builtins
import importlib
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

from affect_jax.cpu import host_memory, onednn_conv


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REHEARSAL_ENV = "AFFECT_JAX_BENCH_REHEARSAL"  # set by run_accelerator.sh --rehearse
DRY_RUN_ENV = "AFFECT_JAX_BENCH_DRY_RUN"  # set by run_accelerator.sh --dry-run


# Where today's modules lived before the package split: a revision from before it has
# them in these files (one file held several of them).
FORMER_PATHS = {
    "affect_jax/data/records.py": "affect_jax/input_pipeline.py",
    "affect_jax/data/augment.py": "affect_jax/input_pipeline.py",
    "affect_jax/data/pipeline.py": "affect_jax/input_pipeline.py",
    "affect_jax/model/resnet.py": "affect_jax/models.py",
    "affect_jax/model/implementation.py": "affect_jax/models.py",
    "affect_jax/model/multitask.py": "affect_jax/models.py",
    "affect_jax/cpu/layers.py": "affect_jax/models.py",
    "affect_jax/eval/metrics.py": "affect_jax/metrics.py",
}
# Modules that files of older revisions import by their former names.
FORMER_NAMES = {"affect_jax.onednn_conv": "affect_jax.cpu.onednn_conv",
                "affect_jax.mesh_types": "affect_jax.cpu.varying"}


def _git(*args) -> bytes:
  return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True).stdout


def _file_at(commit: str, path: str) -> str:
  """`path` if `commit` has it, else the file it lived in before the package split."""
  present = subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=ROOT,
                           capture_output=True).returncode == 0
  return path if present else FORMER_PATHS.get(path, path)


def _from_import(package, item: str):
  """What `from package import item` binds: an attribute, else a submodule."""
  if hasattr(package, item):
    return getattr(package, item)
  return importlib.import_module(f"{package.__name__}.{item}")


def merged(*modules) -> types.SimpleNamespace:
  """One namespace of the modules' names, a later module's winning: the surface a
  benchmark compares, whether a revision keeps it in one file or several."""
  names = {}
  for module in modules:
    names.update((k, v) for k, v in vars(module).items() if not k.startswith("__"))
  return types.SimpleNamespace(**names)


def modules_at(paths, revision: str) -> tuple[types.SimpleNamespace, str]:
  """(the repository's files `paths`, named as in today's layout, as they were at git
  `revision`, loaded as modules of their own and merged (see `merged`), the revision's
  short hash): the "before" peer of a same-run before/after. A revision from before
  the package split has them in their former files (FORMER_PATHS). The loaded files
  import one another as they were at the revision (inside functions too), and the rest
  of the library as it is now. OSError or CalledProcessError where git or the revision
  is not there (a copy of the tree without .git)."""
  commit = _git("rev-parse", "--short", revision).decode().strip()
  files = {os.path.splitext(p)[0].replace("/", "."): _file_at(commit, p) for p in paths}
  loaded = {}

  def load(path):
    if path not in loaded:
      stem = os.path.splitext(os.path.basename(path))[0]
      module = types.ModuleType(f"{stem}_at_{commit}")
      module.__builtins__ = {**builtins.__dict__, "__import__": revision_import}
      sys.modules[module.__name__] = module  # dataclasses look their module up there
      loaded[path] = module
      source = _git("show", f"{commit}:{path}")
      exec(compile(source, f"{path}@{commit}", "exec"), module.__dict__)  # noqa: S102
    return loaded[path]

  def resolve(name):
    """The module an import of `name` gets in the loaded files; None: the usual one."""
    if name in files:
      return load(files[name])
    return importlib.import_module(FORMER_NAMES[name]) if name in FORMER_NAMES else None

  def revision_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and fromlist:  # `from name import ...`
      module = resolve(name)
      if module is not None:
        return module
      found = {item: resolve(f"{name}.{item}") for item in fromlist}
      if any(found.values()):
        package = importlib.import_module(name)
        return types.SimpleNamespace(**{item: found[item] or _from_import(package, item)
                                        for item in fromlist})
    return builtins.__import__(name, globals, locals, fromlist, level)

  return merged(*map(load, dict.fromkeys(files.values()))), commit


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
          # host_memory's malloc settings (False: glibc's defaults, XLA:CPU's
          # temporaries page-faulted afresh every step) and the oneDNN convolutions.
          "heap_reuse": host_memory.applied(),
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
