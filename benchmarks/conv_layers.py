"""Where XLA:CPU spends a ResNet-18 step: every distinct convolution of the network at
112x112, forward and backward (input and weight gradients), timed in isolation in
XLA (lax.conv, NHWC/HWIO, as flax.linen.Conv lowers; XLA:CPU hands it to YNNPACK by
default), in XLA with YNNPACK off for convolutions (Eigen's convolution, chosen per
compile with `compiler_options`), in XLA as explicit patches and a matmul (im2col),
through the "cpu" implementation's oneDNN FFI handlers (affect_jax.cpu.onednn_conv), and
in PyTorch (oneDNN, channels_last), interleaved in rounds.

  taskset -c 0 python benchmarks/conv_layers.py --batch_size 32 \
      --out benchmarks/results/conv_layers.jsonl

One JSON line per layer: milliseconds (median) and GFLOP/s per variant and direction,
and the count of such layers in ResNet-18, so that the rows add up to the step.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts its threads (see affect_jax.host_setup)
  from affect_jax import host_setup
  host_setup.prepare_before_jax()

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax.cpu import compile_options, onednn_conv  # noqa: E402

# (name, input spatial size, in channels, out channels, kernel, stride, padding, count
# of such convs in ResNet-18)
LAYERS = [
    ("stem_7x7", 112, 3, 64, 7, 2, 3, 1),
    ("layer1_3x3", 28, 64, 64, 3, 1, 1, 4),
    ("layer2_0_conv1", 28, 64, 128, 3, 2, 1, 1),
    ("layer2_3x3", 14, 128, 128, 3, 1, 1, 3),
    ("layer2_0_down", 28, 64, 128, 1, 2, 0, 1),
    ("layer3_0_conv1", 14, 128, 256, 3, 2, 1, 1),
    ("layer3_3x3", 7, 256, 256, 3, 1, 1, 3),
    ("layer3_0_down", 14, 128, 256, 1, 2, 0, 1),
    ("layer4_0_conv1", 7, 256, 512, 3, 2, 1, 1),
    ("layer4_3x3", 4, 512, 512, 3, 1, 1, 3),
    ("layer4_0_down", 7, 256, 512, 1, 2, 0, 1),
    # Not in the network at 112x112: layer4 at 56x56 inputs (2x2 maps).
    ("layer4_3x3_at_56px", 2, 512, 512, 3, 1, 1, 0),
]


def xla_conv(x, w, stride, pad):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col_conv(x, w, stride, pad):
  """The same convolution as k*k strided slices concatenated on channels, then a matmul."""
  kh, kw, cin, cout = w.shape
  b, h, wd, _ = x.shape
  oh = (h + 2 * pad - kh) // stride + 1
  ow = (wd + 2 * pad - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  patches = [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
             for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
  y = patches.reshape(b * oh * ow, kh * kw * cin) @ w.reshape(kh * kw * cin, cout)
  return y.reshape(b, oh, ow, cout)


# The "cpu" implementation's XLA:CPU option: convolutions to Eigen instead of YNNPACK.
EIGEN_CONVOLUTIONS = compile_options.CPU_COMPILER_OPTIONS


def onednn_conv2d(x, w, stride, pad):
  """The "cpu" implementation's convolution (oneDNN through XLA FFI handlers; kernel
  gradients of maps of at most 64 pixels on XLA, as in the model)."""
  return onednn_conv.conv2d(x, w, (stride, stride), ((pad, pad), (pad, pad)))


def jax_fns(conv, x, w, stride, pad, compiler_options=None):
  def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=compiler_options or {})

  fwd = compiled(lambda x, w: conv(x, w, stride, pad), x, w)
  y = fwd(x, w)
  dy = jnp.ones_like(y)
  grad_x = compiled(lambda x, w, dy: jax.vjp(lambda x: conv(x, w, stride, pad), x)[1](dy),
                    x, w, dy)
  grad_w = compiled(lambda x, w, dy: jax.vjp(lambda w: conv(x, w, stride, pad), w)[1](dy),
                    x, w, dy)
  return {"fwd": lambda: fwd(x, w).block_until_ready(),
          "grad_input": lambda: jax.block_until_ready(grad_x(x, w, dy)),
          "grad_weight": lambda: jax.block_until_ready(grad_w(x, w, dy))}


def torch_fns(x, w, stride, pad):
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)
  y = F.conv2d(xt, wt, stride=stride, padding=pad)
  dy = torch.ones_like(y).contiguous(memory_format=torch.channels_last)

  def backward(mask):
    return torch.ops.aten.convolution_backward(
        dy, xt, wt, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, mask)

  return {"fwd": lambda: F.conv2d(xt, wt, stride=stride, padding=pad),
          "grad_input": lambda: backward([True, False, False]),
          "grad_weight": lambda: backward([False, True, False])}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--layers", default="")
  parser.add_argument("--variants", default="xla,xla_eigen,im2col,onednn,torch")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  chosen = set(args.layers.split(",")) if args.layers else None
  for name, size, cin, cout, k, stride, pad, count in LAYERS:
    if chosen and name not in chosen:
      continue
    load_before = bench_common.load()
    x = jnp.asarray(rng.standard_normal((args.batch_size, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.05)
    out_size = (size + 2 * pad - k) // stride + 1
    flops = 2.0 * args.batch_size * out_size * out_size * k * k * cin * cout
    builders = {
        "xla": lambda: jax_fns(xla_conv, x, w, stride, pad),
        "xla_eigen": lambda: jax_fns(xla_conv, x, w, stride, pad, EIGEN_CONVOLUTIONS),
        "im2col": lambda: jax_fns(im2col_conv, x, w, stride, pad),
        "onednn": lambda: jax_fns(onednn_conv2d, x, w, stride, pad, EIGEN_CONVOLUTIONS),
        "torch": lambda: torch_fns(x, w, stride, pad)}
    variants = {v: builders[v]() for v in args.variants.split(",")}
    for fns in variants.values():  # warm-up and compile
      for fn in fns.values():
        fn()
    times = {(v, d): [] for v in variants for d in ("fwd", "grad_input", "grad_weight")}
    for round_index in range(args.rounds):
      order = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
      for direction in ("fwd", "grad_input", "grad_weight"):
        for variant in order:
          times[(variant, direction)].append(
              bench_common.timed(variants[variant][direction], args.repeats))
    row = bench_common.machine()
    row.update({"benchmark": "conv_layers", "layer": name, "count_in_resnet18": count,
                "batch_size": args.batch_size, "input": [size, size, cin],
                "output": [out_size, out_size, cout], "kernel": k, "stride": stride,
                "gflop": round(flops / 1e9, 3), "load_before": load_before})
    for (variant, direction), values in times.items():
      seconds = bench_common.median(values)
      row[f"{variant}_{direction}_ms"] = round(seconds * 1e3, 2)
      row[f"{variant}_{direction}_gflops"] = round(flops / seconds / 1e9, 1)
    for variant in variants:
      row[f"{variant}_total_ms"] = round(sum(
          row[f"{variant}_{d}_ms"] for d in ("fwd", "grad_input", "grad_weight")
          if not (d == "grad_input" and name == "stem_7x7")), 2)
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
