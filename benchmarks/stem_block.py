"""The "cpu" implementation's training BN and stem max-pool against their predecessors,
timed alone (forward + backward, float32, one core), interleaved in one run.

  taskset -c 0 python benchmarks/stem_block.py --rounds 7 \
      --out benchmarks/results/stem_block.jsonl

Rows:
  batch_norm   BN + ReLU fwd+bwd on the stem's map (32x56x56x64) and layer1's
               (32x28x28x64): flax's nn.BatchNorm + jax.nn.relu differentiated by
               autodiff ("flax") against layers.batch_norm_train ("closed_form");
  stem_block   the stem (7x7/2 convolution, BN + ReLU, 3x3/2 max-pool) fwd+bwd with
               the pool as reduce_window (nn.max_pool, what "xla" runs), as separable
               strided slices differentiated by autodiff (cpu/layers.py at
               --before_rev, 9e5a2c9, then models.py, loaded from git), as
               layers.max_pool_3x3_stride_2 (index-routed), and as a plain stride-2
               subsample (no pool: the floor).
All compiled with the "cpu" implementation's compile options, the trainer's on a CPU
(implementation.compiler_options).
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts its threads (see affect_jax.host_setup)
  from affect_jax import host_setup
  host_setup.prepare_before_jax()

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax.cpu import layers  # noqa: E402
from affect_jax.model import implementation, resnet  # noqa: E402

EPSILON = 1e-5


def pools(before_rev: str) -> dict:
  return {
      "reduce_window": lambda y: nn.max_pool(y, (3, 3), strides=(2, 2),
                                             padding=resnet.PAD_1),
      "separable": bench_common.modules_at(["affect_jax/cpu/layers.py"],
                                           before_rev)[0].max_pool_3x3_stride_2,
      "index_routed": layers.max_pool_3x3_stride_2,
      "subsample_floor": lambda y: y[:, ::2, ::2],
  }


def flax_bn_relu(x, scale, bias):
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
  y, _ = nn.BatchNorm(use_running_average=False, epsilon=EPSILON).apply(
      variables, x, mutable=["batch_stats"])
  return jax.nn.relu(y)


def closed_form_bn_relu(x, scale, bias):
  return layers.batch_norm_train(x, scale, bias, EPSILON, None, True, x.dtype)[0]


BATCH_NORMS = {"flax": flax_bn_relu, "closed_form": closed_form_bn_relu}


def stem_loss(pool, bn_relu, kernel, scale, bias, images):
  y = lax.conv_general_dilated(images, kernel, (2, 2), resnet.PAD_3,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(pool(bn_relu(y, scale, bias)) ** 2)


def interleaved(fns: dict, args, rounds: int) -> dict:
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for round_index in range(rounds):
    for name in (list(fns) if round_index % 2 == 0 else list(fns)[::-1]):
      times[name].append(bench_common.timed(lambda fn=fns[name]: jax.block_until_ready(
          fn(*args))))
  return {name: round(1000 * bench_common.median(t), 2) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--before_rev", default="9e5a2c9",
                      help="git revision whose CPU layers have the separable max-pool")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  options = implementation.compiler_options("cpu")
  jit = functools.partial(jax.jit, compiler_options=options)
  base = bench_common.machine()
  base.update({"benchmark": "stem_block", "batch_size": args.batch_size,
               "dtype": "float32", "jax": jax.__version__, "compiler_options": options})

  for label, shape in (("stem", (args.batch_size, 56, 56, 64)),
                       ("layer1", (args.batch_size, 28, 28, 64))):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
    bias = jnp.asarray(rng.normal(size=shape[-1]) * 0.1, jnp.float32)
    fns = {name: jit(lambda x, s, b, f=f: jax.vjp(f, x, s, b)[1](g))
           for name, f in BATCH_NORMS.items()}
    row = dict(base, load_before=bench_common.load(), row="batch_norm", map=label,
               shape=list(shape))
    row["fwd_bwd_ms"] = interleaved(fns, (x, scale, bias), args.rounds)
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)

  images = jnp.asarray(rng.normal(size=(args.batch_size, 112, 112, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(7, 7, 3, 64)) * 0.1, jnp.float32)
  scale, bias = jnp.ones((64,), jnp.float32), jnp.zeros((64,), jnp.float32)
  fns = {name: jit(jax.grad(functools.partial(stem_loss, pool, closed_form_bn_relu),
                            argnums=(0, 1, 2)))
         for name, pool in pools(args.before_rev).items()}
  row = dict(base, load_before=bench_common.load(), row="stem_block",
             bn="closed_form")
  row["fwd_bwd_ms"] = interleaved(fns, (kernel, scale, bias, images), args.rounds)
  row["load_after"] = bench_common.load()
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
