"""Train and eval throughput (images/s) of the multi-task ResNet-18 step on this
machine's devices, with FLOP utilisation against a matmul peak measured in the same run;
CPU, GPU or TPU.

  python benchmarks/train_step_throughput.py --batch_sizes 128,256 --dtypes bfloat16 \
      --implementations xla,cpu --device_data --out benchmarks/results/accelerator.jsonl

For each (dtype, implementation, batch size): the trainer's compiled steps
(step_functions.compile_train_step / compile_eval_step over a Mesh of all devices) on
a fixed synthetic batch, and with --device_data also the full step fed by
affect_jax.data.device_resident (a synthetic split resident on the devices, batches
drawn and augmented on device: what a device-resident epoch costs). Each step is
compiled with its implementation's compile options on a CPU (as the trainer compiles),
with XLA's defaults elsewhere. "auto" is resolved as the trainer resolves it; "xla" and
"cpu" are built as asked, so that the XLA:CPU formulation can be timed on an
accelerator too (the trainer runs it on CPUs only; there it keeps XLA's convolutions,
its oneDNN handlers being CPU code). FLOPs per image come from
XLA's cost analysis of the compiled train step; the peak is a large square matmul in
the same dtype; `epoch_s_s_affwild2` is 142,000 frames / train images/s.
One JSON line per setting.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts its threads (see affect_jax.host_setup)
  from affect_jax import host_setup
  host_setup.prepare_before_jax()

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax import data_parallel  # noqa: E402
from affect_jax.cpu import onednn_conv  # noqa: E402
from affect_jax.data import device_resident  # noqa: E402
from affect_jax.model import implementation, multitask  # noqa: E402
from affect_jax.data_parallel import AXIS  # noqa: E402
from affect_jax.train import feeds, optimizers, step_functions, train_state  # noqa: E402

S_AFFWILD2_TRAIN_FRAMES = 142_000


def matmul_peak_tflops(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(bench_common.timed(lambda: f(a).block_until_ready(), 3) for _ in range(3))
  return 2.0 * n ** 3 / best / 1e12


def synthetic_device_split(mesh, num_records, image_size):
  """A random uint8 split and labels on the mesh, sharded over the data axis as
  device_resident.load_split_to_device places a split (no decoding)."""
  rows = num_records // mesh.devices.size
  count = rows * mesh.devices.size
  host = bench_common.synthetic_batch(np.random.default_rng(1), count, image_size)
  host["record_index"] = np.arange(count, dtype=np.int32)
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  arrays = {k: jax.device_put(v, sharded) for k, v in host.items()}
  images = arrays.pop("image")
  return device_resident.DeviceDataset(
      images=images, labels=arrays, valid=jax.device_put(np.ones(count, bool), sharded),
      num_records=count, rows_per_device=rows, shortest_shard=rows)


def network_for(requested: str, mesh) -> str:
  """The implementation a setting builds: "auto" resolved for `mesh` as the trainer
  resolves it, "xla" and "cpu" as asked (on any platform)."""
  if requested == "cpu":
    return requested
  platform = implementation.mesh_platform(mesh)
  return implementation.resolve_implementation(requested, platform)


def compiler_options_for(network: str, mesh) -> dict:
  """The implementation's compile options on a CPU mesh, as the trainer compiles; XLA's
  defaults on others (those of "cpu" are XLA:CPU options)."""
  if implementation.mesh_platform(mesh) != "cpu":
    return {}
  return implementation.compiler_options(network)


def measure(base_config, mesh, batch_size, image_size, dtype, network, steps, rounds,
            use_device_data, augment):
  config = base_config.copy_and_resolve_references()  # each setting edits its own
  config.input.batch_size = batch_size
  config.input.image_size = image_size
  config.model.dtype = dtype
  model = multitask.create_model(config.model, network)
  lr_fn = optimizers.create_learning_rate_fn(config)
  state = train_state.create_train_state(config, model, mesh, lr_fn)
  options = compiler_options_for(network, mesh)
  start = time.perf_counter()
  step_fn = step_functions.compile_train_step(
      mesh, options, settings=step_functions.loss_settings_from_config(config, None),
      learning_rate_fn=lr_fn, dtype=multitask.DTYPES[dtype], seed=0)
  eval_fn = step_functions.compile_eval_step(mesh, options, num_expr_classes=8,
                                             dtype=multitask.DTYPES[dtype])
  batch = data_parallel.device_batch(bench_common.synthetic_batch(
      np.random.default_rng(0), batch_size, image_size), mesh)
  train_compiled = step_fn.lower(state, batch).compile()
  eval_compiled = eval_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run_train():
    for _ in range(steps):
      holder["state"], metrics = train_compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  def run_eval():
    for _ in range(steps):
      out = eval_compiled(holder["state"], batch)
    jax.block_until_ready(out)

  runs = {"train": run_train, "eval": run_eval}
  if use_device_data:
    split = synthetic_device_split(mesh, max(4 * batch_size, 4096), image_size)
    counter = [0]
    if feeds.fuse_draw_and_step(mesh):  # one program, as the trainer runs it there
      fused = step_functions.compile_resident_train_step(
          mesh, device_resident.draw_settings(mesh, split, global_batch_size=batch_size,
                                              seed=0, augment=augment), options,
          settings=step_functions.loss_settings_from_config(config, None),
          learning_rate_fn=lr_fn, dtype=multitask.DTYPES[dtype], seed=0)

      def run_device_data_train():
        for _ in range(steps):
          holder["state"], metrics, _ = fused(holder["state"], split, counter[0])
          counter[0] += 1
        jax.block_until_ready(metrics)
    else:
      draw = device_resident.compile_draw_batch(mesh, split, global_batch_size=batch_size,
                                                seed=0, augment=augment)

      def run_device_data_train():
        for _ in range(steps):
          device_batch = draw(split, counter[0])
          counter[0] += 1
          holder["state"], metrics = step_fn(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    runs["train_device_data"] = run_device_data_train
  for fn in runs.values():
    fn()  # warm-up (and compilation of the float-image train step)
  times = {name: [] for name in runs}
  for round_index in range(rounds):
    for name in (list(runs) if round_index % 2 == 0 else list(runs)[::-1]):
      times[name].append(bench_common.timed(runs[name]) / steps)
  result = {"compiler_options": options, "compile_s": round(compile_s, 1)}
  flops = bench_common.xla_cost(train_compiled)
  eval_flops = bench_common.xla_cost(eval_compiled)
  result["xla_train_gflop_per_image"] = flops and round(flops / batch_size / 1e9, 4)
  result["xla_eval_gflop_per_image"] = eval_flops and round(
      eval_flops / batch_size / 1e9, 4)
  for name, values in times.items():
    rate = batch_size / bench_common.median(values)
    result[f"{name}_images_per_s"] = round(rate, 1)
    per_image = flops if name.startswith("train") else eval_flops
    if per_image:
      result[f"{name}_tflops"] = round(rate * per_image / batch_size / 1e12, 3)
  result["epoch_s_s_affwild2"] = round(S_AFFWILD2_TRAIN_FRAMES
                                       / result["train_images_per_s"], 1)
  if use_device_data:
    result["epoch_s_s_affwild2_device_data"] = round(
        S_AFFWILD2_TRAIN_FRAMES / result["train_device_data_images_per_s"], 1)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/default.py",
                      help="model and losses (default: the full ResNet-18)")
  parser.add_argument("--batch_sizes", default="32,64")
  parser.add_argument("--image_sizes", default="112")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--implementations", default="auto")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--device_data", action="store_true")
  parser.add_argument("--augment", default="basic")
  parser.add_argument("--matmul_n", type=int, default=0,
                      help="0: 8192 on accelerators, 2048 on CPU")
  parser.add_argument("--out", default=None)
  args = bench_common.parse_args(parser)
  mesh = data_parallel.create_mesh()
  if implementation.mesh_platform(mesh) != "cpu":  # before anything loads them
    os.environ[onednn_conv.DISABLE_VARIABLE] = "0"  # CPU code: "cpu" keeps XLA's convs
  base_config = bench_common.load_config(args.config)
  matmul_n = args.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
  for dtype in args.dtypes.split(","):
    peak = matmul_peak_tflops(multitask.DTYPES[dtype], matmul_n)
    for requested in args.implementations.split(","):
      network = network_for(requested, mesh)
      for image_size in map(int, args.image_sizes.split(",")):
        for batch_size in map(int, args.batch_sizes.split(",")):
          row = bench_common.machine()
          row.update({"benchmark": "train_step_throughput",
                      "device": jax.devices()[0].device_kind,
                      "devices": jax.device_count(), "jax": jax.__version__,
                      "backend": jax.default_backend(), "batch_size": batch_size,
                      "config": args.config, "image_size": image_size, "dtype": dtype,
                      "implementation": network,
                      "matmul_n": matmul_n, "matmul_peak_tflops": round(peak, 2),
                      "load_before": bench_common.load()})
          row.update(measure(base_config, mesh, batch_size, image_size, dtype, network,
                             args.steps, args.rounds, args.device_data, args.augment))
          row["train_utilisation_of_matmul_peak"] = row.get("train_tflops") and round(
              row["train_tflops"] / peak, 3)
          row["load_after"] = bench_common.load()
          bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
