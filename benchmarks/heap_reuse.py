"""glibc malloc settings for XLA:CPU's per-step temporaries, four ways: glibc's defaults;
the settings read at process start from GLIBC_TUNABLES (what a re-execution gives); set
with mallopt before JAX starts (what CPU runs do: affect_jax.host_setup); and set with
mallopt after JAX's thread pools exist (too late: their arenas keep mapping afresh).

  python benchmarks/heap_reuse.py --batch_size 32 --steps 8 --rounds 3 \
      --out benchmarks/results/heap_reuse.jsonl

Each mode runs the trainer's "cpu" train step in a child process of its own (glibc
reads tunables at process start), the modes interleaved over rounds; a child reports
its median step time and its minor page faults per step (the cost the settings remove:
a fresh mmap of the step's temporaries every step). One JSON line with every mode's
medians and the ratios to the start-up settings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402

START_UP_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                     "glibc.malloc.trim_threshold=1099511627776")
MODES = ("defaults", "start_up_tunables", "mallopt_at_start", "mallopt_late")


def child_environment(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["AFFECT_JAX_HEAP_REUSE"] = "1" if mode.startswith("mallopt") else "0"
  env["HEAP_REUSE_MODE"] = mode
  if mode == "start_up_tunables":
    env["GLIBC_TUNABLES"] = START_UP_TUNABLES
  return env


def run_child(args) -> dict:
  """Times the train step in this process; the mode is set by the parent."""
  if os.environ.get("HEAP_REUSE_MODE") == "mallopt_at_start":  # before JAX starts
    from affect_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reuse_freed_memory()
  import jax  # pylint: disable=g-import-not-at-top
  from affect_jax import data_parallel  # pylint: disable=g-import-not-at-top
  from affect_jax.model import implementation, multitask  # pylint: disable=g-import-not-at-top
  from affect_jax.train import optimizers, step_functions, train_state  # pylint: disable=g-import-not-at-top

  config = bench_common.load_config(args.config)
  config.input.batch_size = args.batch_size
  mesh = data_parallel.create_mesh(jax.devices()[:1])
  if os.environ.get("HEAP_REUSE_MODE") == "mallopt_late":  # after JAX's threads exist
    from affect_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reuse_freed_memory()
  model = multitask.create_model(config.model, "cpu")
  lr_fn = optimizers.create_learning_rate_fn(config)
  state = train_state.create_train_state(config, model, mesh, lr_fn)
  step = step_functions.compile_train_step(
      mesh, implementation.compiler_options("cpu"),
      settings=step_functions.loss_settings_from_config(config, None),
      learning_rate_fn=lr_fn, dtype=multitask.DTYPES[config.model.dtype], seed=0)
  batch = data_parallel.device_batch(bench_common.synthetic_batch(
      np.random.default_rng(0), args.batch_size, config.input.image_size), mesh)
  for _ in range(2):  # compile and warm up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(args.steps):
    def one():
      nonlocal state
      state, out = step(state, batch)
      jax.block_until_ready(out)
    times.append(bench_common.timed(one))
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  return {"step_s": bench_common.median(times), "page_faults_per_step":
          faults / args.steps}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(run_child(args)))
    return
  results = {mode: [] for mode in MODES}
  load_before = bench_common.load()
  for round_index in range(args.rounds):
    order = MODES if round_index % 2 == 0 else MODES[::-1]
    for mode in order:
      output = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--child", "--config", args.config,
           "--batch_size", str(args.batch_size), "--steps", str(args.steps)],
          env=child_environment(mode), cwd=bench_common.ROOT, check=True,
          capture_output=True, text=True).stdout
      results[mode].append(json.loads(output.strip().splitlines()[-1]))
  row = {"benchmark": "heap_reuse", **bench_common.machine(), "batch_size":
         args.batch_size, "steps": args.steps, "rounds": args.rounds,
         "load_before": load_before, "load_after": bench_common.load()}
  for mode, values in results.items():
    row[f"{mode}_step_s"] = round(bench_common.median(
        [v["step_s"] for v in values]), 4)
    row[f"{mode}_page_faults_per_step"] = round(bench_common.median(
        [v["page_faults_per_step"] for v in values]))
  for mode in ("defaults", "mallopt_at_start", "mallopt_late"):
    row[f"{mode}_over_start_up_tunables"] = round(
        row[f"{mode}_step_s"] / row["start_up_tunables_step_s"], 3)
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
