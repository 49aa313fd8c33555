"""Train and eval throughput (images/s) of the multi-task ResNet-18 step on this
machine's devices, with FLOP utilisation against a matmul peak measured in the same run;
CPU, GPU or TPU.

  python benchmarks/train_step_throughput.py --batch_sizes 128,256 --dtypes bfloat16 \
      --implementations xla,cpu --device_data --out benchmarks/results/accelerator.jsonl

For each (dtype, implementation, batch size): the trainer's compiled steps
(train.compile_train_step / compile_eval_step over a Mesh of all devices) on a fixed
synthetic batch, and with --device_data also the full step fed by
affect_jax.device_data (a synthetic split resident on the devices, batches drawn and
augmented on device: what a device-resident epoch costs). FLOPs per image come from
XLA's cost analysis of the compiled train step; the peak is a large square matmul in
the same dtype; `epoch_s_s_affwild2` is 142,000 frames / train images/s.
One JSON line per setting.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts: glibc reads malloc settings at start-up
  from affect_jax import host_memory
  host_memory.reexec_with_heap_reuse()

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax import device_data, models, train  # noqa: E402

S_AFFWILD2_TRAIN_FRAMES = 142_000


def matmul_peak_tflops(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(bench_common.timed(lambda: f(a).block_until_ready(), 3) for _ in range(3))
  return 2.0 * n ** 3 / best / 1e12


def synthetic_device_split(mesh, num_records, image_size):
  """A random uint8 split and labels, replicated on the mesh (no decoding)."""
  host = bench_common.synthetic_batch(np.random.default_rng(1), num_records, image_size)
  host["record_index"] = np.arange(num_records, dtype=np.int32)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  arrays = {k: jax.device_put(v, replicated) for k, v in host.items()}
  images = arrays.pop("image")
  return device_data.DeviceDataset(images=images, labels=arrays)


def measure(base_config, batch_size, image_size, dtype, implementation, steps, rounds,
            use_device_data, augment):
  config = base_config.copy_and_resolve_references()  # each setting edits its own
  config.input.batch_size = batch_size
  config.input.image_size = image_size
  config.model.dtype = dtype
  mesh = train.create_mesh()
  model = train.create_model(config.model).clone(implementation=implementation)
  lr_fn = train.create_learning_rate_fn(config)
  state = train.create_train_state(config, model, mesh, lr_fn)
  start = time.perf_counter()
  step_fn = train.compile_train_step(
      mesh, settings=train.loss_settings_from_config(config, None), learning_rate_fn=lr_fn,
      dtype=train.DTYPES[dtype], seed=0)
  eval_fn = train.compile_eval_step(mesh, num_expr_classes=8, dtype=train.DTYPES[dtype])
  batch = train.device_batch(bench_common.synthetic_batch(np.random.default_rng(0), batch_size,
                                             image_size), mesh)
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
    draw = device_data.compile_draw_batch(mesh, global_batch_size=batch_size, seed=0,
                                          augment=augment)
    counter = [0]

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
  result = {"compile_s": round(compile_s, 1)}
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
  base_config = bench_common.load_config(args.config)
  matmul_n = args.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
  for dtype in args.dtypes.split(","):
    peak = matmul_peak_tflops(train.DTYPES[dtype], matmul_n)
    for implementation in args.implementations.split(","):
      for image_size in map(int, args.image_sizes.split(",")):
        for batch_size in map(int, args.batch_sizes.split(",")):
          row = bench_common.machine()
          row.update({"benchmark": "train_step_throughput",
                      "device": jax.devices()[0].device_kind,
                      "devices": jax.device_count(), "jax": jax.__version__,
                      "backend": jax.default_backend(), "batch_size": batch_size,
                      "config": args.config, "image_size": image_size, "dtype": dtype,
                      "implementation": models.resolve_implementation(implementation),
                      "matmul_n": matmul_n, "matmul_peak_tflops": round(peak, 2),
                      "load_before": bench_common.load()})
          row.update(measure(base_config, batch_size, image_size, dtype, implementation,
                             args.steps, args.rounds, args.device_data, args.augment))
          row["train_utilisation_of_matmul_peak"] = row.get("train_tflops") and round(
              row["train_tflops"] / peak, 3)
          row["load_after"] = bench_common.load()
          bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
