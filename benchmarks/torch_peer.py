"""affect-jax's multi-task ResNet-18 step against the same network in PyTorch, same run.

  python benchmarks/torch_peer.py --batch_sizes 32,64 --rounds 3 --steps 2 \
      --out benchmarks/results/torch_peer.jsonl

For every batch size: the JAX train and eval steps (affect_jax.train.step_functions:
compile_train_step / compile_eval_step, NHWC, float32, SGD Nesterov, the default
config's losses) in the implementation "auto" resolves to, as the trainer compiles them
(`jax`: with that implementation's compile options, on CPU "cpu" with
compile_options.CPU_COMPILER_OPTIONS, XLA's own convolutions on Eigen instead of
YNNPACK) and with XLA's default options
(`jax_xla_defaults`; since the "cpu" implementation's convolutions run on oneDNN, the
two differ only in the kernel gradients left to XLA; see docs/PERFORMANCE.md), and the
PyTorch peer
(benchmarks/torch_resnet.py, eager, NCHW and channels_last) are timed in interleaved
rounds; medians, the JAX/PyTorch ratio against the faster PyTorch layout,
and FLOP utilisation against a float32 matmul peak measured in the same run in each
framework. FLOPs come from an analytic count of the convolutions and dense layers
(utilisation) and from XLA's cost analysis of the compiled steps (reported; it does
not see the oneDNN FFI calls). One JSON line per batch size.
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
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
import torch_resnet  # noqa: E402
from affect_jax import data_parallel  # noqa: E402
from affect_jax.model import implementation, multitask  # noqa: E402
from affect_jax.train import optimizers, step_functions, train_state  # noqa: E402
from configs import default  # noqa: E402


def resnet_flops(image_size: int, width: int = 64, stage_sizes=(2, 2, 2, 2),
                 heads: int = 8 + 12 + 2) -> float:
  """Forward FLOPs (2 x multiply-adds) of the convolutions and heads for one image."""
  flops = 0.0
  size = (image_size + 2 * 3 - 7) // 2 + 1
  flops += 2 * size * size * 7 * 7 * 3 * width
  size = (size + 2 - 3) // 2 + 1  # max-pool
  in_planes = width
  for stage, blocks in enumerate(stage_sizes):
    planes = width * 2 ** stage
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      out = (size + 2 - 3) // stride + 1
      flops += 2 * out * out * 9 * in_planes * planes  # conv1
      flops += 2 * out * out * 9 * planes * planes  # conv2
      if stride != 1 or in_planes != planes:
        flops += 2 * out * out * in_planes * planes  # 1x1 downsample
      size, in_planes = out, planes
  return flops + 2 * in_planes * heads


def matmul_peaks(n: int = 4096, repeats: int = 3) -> dict:
  """float32 GFLOP/s of an n x n matmul, JAX and torch interleaved, best of `repeats`."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  ja = jnp.asarray(a)
  jdot = jax.jit(lambda x: x @ x)
  jdot(ja).block_until_ready()
  ta = torch.from_numpy(a)
  torch.mm(ta, ta)
  jax_times, torch_times = [], []
  for _ in range(repeats):
    jax_times.append(bench_common.timed(lambda: jdot(ja).block_until_ready()))
    torch_times.append(bench_common.timed(lambda: torch.mm(ta, ta)))
  flops = 2.0 * n ** 3
  return {"matmul_n": n, "jax_matmul_gflops": round(flops / min(jax_times) / 1e9, 1),
          "torch_matmul_gflops": round(flops / min(torch_times) / 1e9, 1)}


class JaxContender:
  def __init__(self, batch_numpy, batch_size, image_size, dtype="float32",
               compiler_options=None):
    """The default config's model in the implementation "auto" resolves to on this
    mesh; compiler_options: None, that implementation's (the trainer's); {} XLA's
    defaults."""
    config = default.get_config()
    config.input.batch_size = batch_size
    config.input.image_size = image_size
    config.model.dtype = dtype
    self.mesh = data_parallel.create_mesh()
    self.implementation = implementation.implementation_for(config.model, self.mesh)
    self.compiler_options = (implementation.compiler_options(self.implementation)
                             if compiler_options is None else compiler_options)
    model = multitask.create_model(config.model, self.implementation)
    lr_fn = optimizers.create_learning_rate_fn(config)
    self.state = train_state.create_train_state(config, model, self.mesh, lr_fn)
    self.train_fn = step_functions.compile_train_step(
        self.mesh, self.compiler_options,
        settings=step_functions.loss_settings_from_config(config, None),
        learning_rate_fn=lr_fn, dtype=multitask.DTYPES[dtype], seed=0)
    self.eval_fn = step_functions.compile_eval_step(
        self.mesh, self.compiler_options, num_expr_classes=8,
        dtype=multitask.DTYPES[dtype])
    self.batch = data_parallel.device_batch(batch_numpy, self.mesh)
    start = time.perf_counter()
    self.train_compiled = self.train_fn.lower(self.state, self.batch).compile()
    self.eval_compiled = self.eval_fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start

  def train(self, steps):
    for _ in range(steps):
      self.state, metrics = self.train_compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def eval(self, steps):
    for _ in range(steps):
      out = self.eval_compiled(self.state, self.batch)
    jax.block_until_ready(out)


class TorchContender:
  def __init__(self, batch_numpy, channels_last):
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = torch_resnet.MultiTaskResNet().to(memory_format=memory_format)
    self.train_step, self.eval_step = torch_resnet.make_steps(
        self.model, torch_resnet.make_optimizer(self.model))
    self.batch = torch_resnet.to_torch_batch(batch_numpy, channels_last)

  def train(self, steps):
    for _ in range(steps):
      self.train_step(self.batch)

  def eval(self, steps):
    for _ in range(steps):
      self.eval_step(self.batch)


def measure(batch_size, image_size, rounds, steps, peaks, out):
  batch_numpy = bench_common.synthetic_batch(np.random.default_rng(0), batch_size, image_size)
  load_before = bench_common.load()
  jax_contender = JaxContender(batch_numpy, batch_size, image_size)
  jax_defaults = JaxContender(batch_numpy, batch_size, image_size, compiler_options={})
  contenders = {"jax": jax_contender, "jax_xla_defaults": jax_defaults,
                "torch_nchw": TorchContender(batch_numpy, channels_last=False),
                "torch_channels_last": TorchContender(batch_numpy, channels_last=True)}
  for contender in contenders.values():  # warm-up: compile, allocate, tune
    contender.train(1)
    contender.eval(1)
  times = {f"{name}_{mode}": [] for name in contenders for mode in ("train", "eval")}
  names = list(contenders)
  for round_index in range(rounds):
    order = names if round_index % 2 == 0 else names[::-1]  # interleaved, alternated
    for mode in ("train", "eval"):
      for name in order:
        fn = getattr(contenders[name], mode)
        times[f"{name}_{mode}"].append(bench_common.timed(lambda: fn(steps)) / steps)
  row = bench_common.machine()
  row.update({"benchmark": "torch_peer", "model_implementation":
              jax_contender.implementation, "batch_size": batch_size,
              "image_size": image_size, "dtype": "float32", "rounds": rounds,
              "steps_per_round": steps, "jax": jax.__version__,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "load_before": load_before, "jax_compile_s": round(jax_contender.compile_s, 1)})
  row.update(peaks)
  flops_forward = resnet_flops(image_size)
  row["analytic_forward_gflop_per_image"] = round(flops_forward / 1e9, 4)
  train_xla = bench_common.xla_cost(jax_contender.train_compiled)
  eval_xla = bench_common.xla_cost(jax_contender.eval_compiled)
  row["xla_train_gflop_per_image"] = train_xla and round(train_xla / batch_size / 1e9, 4)
  row["xla_eval_gflop_per_image"] = eval_xla and round(eval_xla / batch_size / 1e9, 4)
  for mode, flops_per_image in (("train", 3 * flops_forward), ("eval", flops_forward)):
    for name in names:
      seconds = bench_common.median(times[f"{name}_{mode}"])
      rate = batch_size / seconds
      row[f"{name}_{mode}_images_per_s"] = round(rate, 1)
      row[f"{name}_{mode}_s_per_step_all"] = [round(t, 3) for t in times[f"{name}_{mode}"]]
      peak = peaks["torch_matmul_gflops" if name.startswith("torch") else
                   "jax_matmul_gflops"]
      gflops = rate * flops_per_image / 1e9
      row[f"{name}_{mode}_gflops"] = round(gflops, 1)
      row[f"{name}_{mode}_utilisation_of_matmul_peak"] = round(gflops / peak, 3)
    best_torch = max(row[f"torch_nchw_{mode}_images_per_s"],
                     row[f"torch_channels_last_{mode}_images_per_s"])
    for name in ("jax", "jax_xla_defaults"):
      row[f"{mode}_ratio_{name}_over_best_torch"] = round(
          row[f"{name}_{mode}_images_per_s"] / best_torch, 3)
  row["jax_compiler_options"] = jax_contender.compiler_options
  row["load_after"] = bench_common.load()
  bench_common.emit(row, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_sizes", default="32,64")
  parser.add_argument("--image_size", type=int, default=112)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  peaks = matmul_peaks()
  for batch_size in map(int, args.batch_sizes.split(",")):
    measure(batch_size, args.image_size, args.rounds, args.steps, peaks, args.out)


if __name__ == "__main__":
  main()
