"""Where XLA spends the trainer's train (or eval) step: a jax.profiler trace of a few
steps, every executed HLO operation's time summed by kind, one JSON line.

  taskset -c 0 python benchmarks/profile_train_step.py --batch_size 32 [--mode eval] \
      --out benchmarks/results/profile_train_step.jsonl

The step is the trainer's own (`step_functions.compile_train_step`: default config,
ResNet-18, float32, 112x112, the implementation "auto" resolves to on this mesh and
that implementation's compile options, as the trainer compiles it;
--implementation and --dtype pick others, e.g. "xla" in bfloat16, what an accelerator
runs, to count the operations a GPU step would launch).
On XLA:CPU the per-operation events need `--xla_cpu_enable_xprof_traceme=true`, which
this script adds to XLA_FLAGS. Each event is mapped to the JAX operation that produced
it through the compiled HLO's `op_name` metadata and put in one kind:
convolution (XLA convolutions, any back end), onednn_forward / onednn_input_grad /
onednn_kernel_grad (the "cpu" implementation's oneDNN convolutions, FFI calls), matmul
(dots: im2col convolutions, heads), max_pool (reduce-window and what XLA expands
select-and-scatter into: iotas, a broadcast and a variadic reduce-window of the padded
input's shape, the scatter), layout (transpose and copy fusions), bn_reduction
(reductions under a BatchNorm), collective (all-reduce) and elementwise (every other
fusion: BN normalisation, ReLU, residual adds, the optimizer update, the non-finite
check). Also the --top (12) costliest
operations. Times are per step (the mean over --steps). `hlo_ops_executed` counts the
distinct HLO operations that ran (by kind in `hlo_ops_executed_by_kind`): about the
kernels a GPU would launch per step (XLA:CPU splits one operation into many parallel
tasks, so its trace events are not counted; XLA:GPU fuses differently, so on a CPU it is
an estimate of the order, not a GPU's count). Trace events that are no HLO operation
(the runtime's own: thread-pool waits, buffer allocation) are left out of the kinds and
summed in `runtime_ms_per_step`. `onednn_overlapped_ms_per_step`: time in
which two oneDNN calls ran at once on different threads (each would start its own
OpenMP team: oversubscription on a many-core host), and `onednn_threads` the XLA
threads that called oneDNN.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts its threads (see affect_jax.host_setup)
  from affect_jax import host_setup
  host_setup.prepare_before_jax()

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax import data_parallel  # noqa: E402
from affect_jax.model import implementation, multitask  # noqa: E402
from affect_jax.train import optimizers, step_functions, train_state  # noqa: E402
from configs import default  # noqa: E402

HLO_OP = re.compile(r'^\s*%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')
HLO_RESULT_TYPE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \(?(\w+)[\[(]')
CUSTOM_CALL_TARGET = re.compile(r'^\s*%?([\w.\-]+) = .*?custom_call_target="([^"]*)"')
ONEDNN_TARGET_PREFIX = "affect_onednn_conv_"
KIND_BY_OP_NAME = (  # first match wins
    ("max_pool", ("reduce_window", "select_and", "max_pool")),
    ("convolution", ("conv_general_dilated",)),
    ("matmul", ("dot_general",)),
    ("collective", ("psum", "all_reduce", "pmean")),
)


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name of its metadata."""
  names = {}
  for line in hlo_text.splitlines():
    match = HLO_OP.match(line)
    if match:
      names.setdefault(match.group(1), match.group(2))
    target = CUSTOM_CALL_TARGET.match(line)
    if target and target.group(2).startswith(ONEDNN_TARGET_PREFIX):
      # The FFI call's op_name says only "ffi_call"; its target says which pass it is.
      names[target.group(1)] = f"{names.get(target.group(1), '')}:{target.group(2)}"
  return names


def result_types(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its result's element type (the first, for a tuple): every
  instruction of the compiled program, so trace events that are not one (the runtime's
  own) can be told apart."""
  types = {}
  for line in hlo_text.splitlines():
    match = HLO_RESULT_TYPE.match(line)
    if match:
      types.setdefault(match.group(1), match.group(2))
  return types


def kind_of(event: str, op_name: str, result_type: str = "") -> str:
  if ONEDNN_TARGET_PREFIX in op_name:  # onednn_forward, onednn_input_grad, ...
    return "onednn_" + op_name.split(ONEDNN_TARGET_PREFIX)[1]
  if event.startswith(("transpose", "copy")) or "transpose_copy" in event:
    return "layout"
  if event.startswith("all-reduce"):
    return "collective"
  for kind, needles in KIND_BY_OP_NAME:
    if any(n in op_name for n in needles):
      return kind
  if event.startswith(("convolution", "conv_general_dilated")):
    return "convolution"
  if event.startswith("dot"):  # e.g. im2col kernel gradients, named by their transpose
    return "matmul"
  if event.startswith("wrapped_") and not op_name:
    # Operations XLA:CPU makes itself carry no op_name: the expansion of select-and-
    # scatter (the max-pool gradient: iotas, a broadcast of the padded input's shape, a
    # variadic reduce-window, the scatter), but also the tree reductions of the step's
    # non-finite check (boolean results) and converts.
    if (result_type == "pred"
        or event.startswith(("wrapped_convert", "wrapped_is-finite"))):
      return "elementwise"
    return "max_pool"
  if "reduce" in op_name and ("bn" in op_name or "BatchNorm" in op_name):
    return "bn_reduction"
  return "elementwise"


def traced_op_events(step, state, batch, steps: int) -> tuple[list, object]:
  """The executed HLO operations' trace events over `steps` steps (dicts with name,
  tid, ts and dur in microseconds), and the final state."""
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(steps):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
  path = sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [event for event in events
          if event.get("ph") == "X"
          and not event.get("name", "").startswith(("$", "end: "))
          and "ThunkExecutor" not in event["name"] and "PjRt" not in event["name"]
          and not event["name"].startswith(("PjitFunction", "ParseArguments"))], state


def cross_thread_overlap_us(events) -> float:
  """Microseconds during which two of `events` on different threads ran at once
  (summed over pairs): concurrent oneDNN calls would each start an OpenMP team."""
  ordered = sorted(events, key=lambda e: e["ts"])
  overlap = 0.0
  for i, first in enumerate(ordered):
    first_end = first["ts"] + first["dur"]
    for second in ordered[i + 1:]:
      if second["ts"] >= first_end:
        break
      if second["tid"] != first["tid"]:
        overlap += min(first_end, second["ts"] + second["dur"]) - second["ts"]
  return overlap


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=112)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--mode", choices=("train", "eval"), default="train")
  parser.add_argument("--implementation", choices=implementation.IMPLEMENTATIONS,
                      default="auto")
  parser.add_argument("--dtype", choices=tuple(multitask.DTYPES), default="float32")
  parser.add_argument("--top", type=int, default=12, help="costliest operations listed")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  config = default.get_config()
  config.input.batch_size = args.batch_size
  config.input.image_size = args.image_size
  config.model.dtype = args.dtype
  config.model.implementation = args.implementation
  dtype = multitask.DTYPES[args.dtype]
  mesh = data_parallel.create_mesh()
  resolved = implementation.implementation_for(config.model, mesh)
  options = implementation.compiler_options(resolved)
  model = multitask.create_model(config.model, resolved)
  lr_fn = optimizers.create_learning_rate_fn(config)
  state = train_state.create_train_state(config, model, mesh, lr_fn)
  batch = data_parallel.device_batch(bench_common.synthetic_batch(
      np.random.default_rng(0), args.batch_size, args.image_size), mesh)
  if args.mode == "train":
    compiled = step_functions.compile_train_step(
        mesh, options, settings=step_functions.loss_settings_from_config(config, None),
        learning_rate_fn=lr_fn, dtype=dtype, seed=0).lower(state, batch).compile()
    step = compiled  # (state, batch) -> (new state, metrics); it donates the state
  else:
    compiled = step_functions.compile_eval_step(
        mesh, options, num_expr_classes=8, dtype=dtype).lower(state, batch).compile()

    def step(state, batch):  # the train step's form: the state back, results waited for
      return state, jax.block_until_ready(compiled(state, batch))

  hlo_text = compiled.as_text()
  names, types = op_names(hlo_text), result_types(hlo_text)
  holder = [step(state, batch)[0]]  # the train step donates its state: keep the new one

  def untraced_step():
    holder[0] = jax.block_until_ready(step(holder[0], batch)[0])

  untraced_step()
  load_before = bench_common.load()
  seconds = bench_common.timed(untraced_step)
  events, _ = traced_op_events(step, holder[0], batch, args.steps)
  times, runtime_us = collections.Counter(), 0.0  # HLO operations; the runtime's own
  for event in events:
    if event["name"] in types:
      times[event["name"]] += event.get("dur", 0)
    else:
      runtime_us += event.get("dur", 0)
  onednn_events = [e for e in events if ONEDNN_TARGET_PREFIX in names.get(e["name"], "")]
  by_kind, count_by_kind = collections.Counter(), collections.Counter()
  for event, micros in times.items():
    kind = kind_of(event, names.get(event, ""), types[event])
    by_kind[kind] += micros
    count_by_kind[kind] += 1
  per_step_ms = {k: round(v / args.steps / 1000, 1) for k, v in by_kind.most_common()}
  memory = compiled.memory_analysis()
  row = bench_common.machine()
  row.update({"benchmark": "profile_train_step", "mode": args.mode,
              "batch_size": args.batch_size,
              "image_size": args.image_size, "dtype": args.dtype,
              "implementation": resolved, "compiler_options": options,
              "jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "load_before": load_before, "step_ms_untraced": round(1000 * seconds, 1),
              "op_ms_per_step": round(sum(times.values()) / args.steps / 1000, 1),
              "op_ms_per_step_by_kind": per_step_ms,
              "runtime_ms_per_step": round(runtime_us / args.steps / 1000, 1),
              # What XLA compiled, per image: its cost analysis counts every
              # operation's operands and results (not FFI calls); the temporaries are
              # the step's working memory (saved activations and more).
              "xla_gflop_per_image": round(
                  (bench_common.xla_cost(compiled) or 0) / args.batch_size / 1e9, 3),
              "xla_mb_accessed_per_image": round(
                  (bench_common.xla_cost(compiled, "bytes accessed") or 0)
                  / args.batch_size / 1e6, 1),
              "temp_gb": memory and round(memory.temp_size_in_bytes / 1e9, 3),
              "hlo_ops_executed": len(times),
              "hlo_ops_executed_by_kind": dict(count_by_kind.most_common()),
              "onednn_threads": len({e["tid"] for e in onednn_events}),
              "onednn_overlapped_ms_per_step": round(
                  cross_thread_overlap_us(onednn_events) / args.steps / 1000, 1),
              "costliest_ops_ms": [
                  [event, names.get(event, "")[-80:], round(v / args.steps / 1000, 1)]
                  for event, v in times.most_common(args.top)],
              "load_after": bench_common.load()})
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
