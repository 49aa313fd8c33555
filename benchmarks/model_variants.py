"""Before/after of the XLA:CPU formulations of the network (affect_jax/cpu/layers.py and
affect_jax/model/), on the whole train and eval steps, against the PyTorch peer,
measured interleaved in one run.

  taskset -c 0 python benchmarks/model_variants.py --batch_size 32 \
      --out benchmarks/results/model_variants.jsonl

Contenders (all the default config's ResNet-18 MTL step, float32, 112x112):
  xla            MultiTaskNet(implementation="xla"): flax nn.Conv + nn.max_pool, the
                 formulation before this change (and the one kept for GPU/TPU);
  cpu            MultiTaskNet(implementation="cpu"): convolutions on oneDNN (FFI
                 handlers; tiny maps as im2col matmuls), strided 1x1 shortcuts as
                 matmuls; when training, BN with a closed-form
                 backward pass and the stem's max-pool with an index-routed gradient
                 (older rows: a first custom max-pool gradient, "cpu_maxpool", then a
                 separable max-pool and flax's BN);
  *_eigen        the same, compiled with the "cpu" implementation's compile options,
                 as the trainer compiles CPU steps (implementation.compiler_options:
                 compile_options.CPU_COMPILER_OPTIONS, XLA:CPU's debug option
                 xla_cpu_experimental_ynn_fusion_type=
                 LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
                 i.e. the default less convolutions, which go to Eigen); the others
                 are compiled with XLA's defaults;
  cpu_eigen_at_REV  "cpu_eigen" with the network's modules (MODEL_FILES; before the
                 package split, affect_jax/models.py) as they were at git revision
                 REV (--before_rev, e.g. 9e5a2c9: flax BN and the separable max-pool
                 before TrainBatchNorm and the index-routed max-pool): a same-run
                 before/after of a change to the network;
  cpu_eigen_xla_kgrad_upto_N  "cpu_eigen" with the kernel gradients of convolutions
                 with at most N output pixels on XLA instead of oneDNN
                 (onednn_conv.XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS; 0: all on oneDNN);
  cpu_vmap1      "cpu", with the step mapped by jax.vmap(axis_size=1) instead of
                 jax.shard_map when the mesh has one device (a step_functions.py
                 change: no all-reduce of the gradients, which XLA:CPU runs as a
                 45 MB copy);
  torch          benchmarks/torch_resnet.py, channels_last.
One JSON line per mode (train, eval) with medians, ratios to "xla" and to torch.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts its threads (see affect_jax.host_setup)
  from affect_jax import host_setup
  host_setup.prepare_before_jax()

import argparse
import dataclasses
import functools
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
import torch_peer  # noqa: E402
from affect_jax import data_parallel  # noqa: E402
from affect_jax.cpu import onednn_conv  # noqa: E402
from affect_jax.model import implementation, multitask  # noqa: E402
from affect_jax.train import optimizers, step_functions, train_state  # noqa: E402
from configs import default  # noqa: E402

# The network's modules, in today's layout, for cpu_eigen_at_REV.
MODEL_FILES = ("affect_jax/model/resnet.py", "affect_jax/model/implementation.py",
               "affect_jax/cpu/layers.py", "affect_jax/model/multitask.py")


def compile_train_step_vmap1(mesh, compiler_options=None, **step_kwargs):
  """The train step for a one-device mesh without shard_map: vmap over a batch axis of
  size 1 gives the named axis (psum, pmean, axis_index) without any collective."""
  if mesh.devices.size != 1:
    raise ValueError("only for a one-device mesh")
  step = functools.partial(step_functions.train_step, **step_kwargs)
  mapped = jax.vmap(step, in_axes=(None, 0), axis_name=data_parallel.AXIS, axis_size=1)

  def single(state, batch):
    new_state, metrics = mapped(state, jax.tree.map(lambda x: x[None], batch))
    return jax.tree.map(lambda x: x[0], (new_state, metrics))

  return jax.jit(single, donate_argnums=(0,), compiler_options=compiler_options or {})


def same_model_from(module, model):
  """`model` (a MultiTaskNet) rebuilt with another module's MultiTaskNet: the fields both
  versions have (a field only the old one has keeps its default)."""
  cls = module.MultiTaskNet
  return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)
                if f.init and f.name not in ("parent", "name") and hasattr(model, f.name)})


class Contender:
  def __init__(self, batch_numpy, batch_size, network: str, *,
               vmap1=False, eigen_convolutions=False, models_module=None,
               xla_kernel_grad_max_pixels=None):
    """network: the implementation ("xla" or "cpu") the model is built in."""
    config = default.get_config()
    config.input.batch_size = batch_size
    mesh = data_parallel.create_mesh()
    model = multitask.create_model(config.model, network)
    if models_module is not None:
      model = same_model_from(models_module, model)
    lr_fn = optimizers.create_learning_rate_fn(config)
    self.state = train_state.create_train_state(config, model, mesh, lr_fn)
    kwargs = dict(settings=step_functions.loss_settings_from_config(config, None),
                  learning_rate_fn=lr_fn, dtype=np.float32, seed=0)
    compile_step = (compile_train_step_vmap1 if vmap1
                    else step_functions.compile_train_step)
    self.batch = data_parallel.device_batch(batch_numpy, mesh)
    # *_eigen: the "cpu" implementation's compile options (Eigen convolutions), what the
    # trainer compiles CPU steps with; the other contenders get XLA's defaults.
    options = implementation.compiler_options("cpu") if eigen_convolutions else {}
    threshold = onednn_conv.XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS
    if xla_kernel_grad_max_pixels is not None:  # read when the step is traced
      onednn_conv.XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS = xla_kernel_grad_max_pixels
    try:
      self.train_fn = compile_step(mesh, compiler_options=options, **kwargs).lower(
          self.state, self.batch).compile()
    finally:
      onednn_conv.XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS = threshold
    self.eval_fn = step_functions.compile_eval_step(
        mesh, compiler_options=options, num_expr_classes=8, dtype=np.float32
    ).lower(self.state, self.batch).compile()

  def train(self, steps):
    for _ in range(steps):
      self.state, metrics = self.train_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def eval(self, steps):
    for _ in range(steps):
      out = self.eval_fn(self.state, self.batch)
    jax.block_until_ready(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--contenders",
                      default="xla,cpu,cpu_vmap1,xla_eigen,cpu_eigen,torch")
  parser.add_argument("--before_rev", default="9e5a2c9",
                      help="git revision of the network for cpu_eigen_at_REV")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  batch_numpy = bench_common.synthetic_batch(np.random.default_rng(0), args.batch_size, 112)
  load_before = bench_common.load()
  builders = {
      "xla": lambda: Contender(batch_numpy, args.batch_size, "xla"),
      "cpu": lambda: Contender(batch_numpy, args.batch_size, "cpu"),
      "xla_eigen": lambda: Contender(batch_numpy, args.batch_size, "xla",
                                     eigen_convolutions=True),
      "cpu_eigen": lambda: Contender(batch_numpy, args.batch_size, "cpu",
                                     eigen_convolutions=True),
      "cpu_vmap1": lambda: Contender(batch_numpy, args.batch_size, "cpu", vmap1=True),
      "torch": lambda: torch_peer.TorchContender(batch_numpy, channels_last=True),
      f"cpu_eigen_at_{args.before_rev}": lambda: Contender(
          batch_numpy, args.batch_size, "cpu", eigen_convolutions=True,
          models_module=bench_common.modules_at(MODEL_FILES, args.before_rev)[0]),
  }
  names = args.contenders.split(",")
  for name in names:
    if name.startswith("cpu_eigen_xla_kgrad_upto_"):
      pixels = int(name.rsplit("_", 1)[1])
      builders[name] = lambda pixels=pixels: Contender(
          batch_numpy, args.batch_size, "cpu", eigen_convolutions=True,
          xla_kernel_grad_max_pixels=pixels)
  contenders = {name: builders[name]() for name in names}
  for contender in contenders.values():
    contender.train(1)
    contender.eval(1)
  for mode in ("train", "eval"):
    times = {name: [] for name in names}
    eval_names = [n for n in names if mode == "train" or n != "cpu_vmap1"]
    for round_index in range(args.rounds):
      order = eval_names if round_index % 2 == 0 else eval_names[::-1]
      for name in order:
        fn = getattr(contenders[name], mode)
        times[name].append(bench_common.timed(lambda: fn(args.steps)) / args.steps)
    row = bench_common.machine()
    row.update({"benchmark": "model_variants", "mode": mode,
                "batch_size": args.batch_size, "image_size": 112, "dtype": "float32",
                "rounds": args.rounds, "load_before": load_before})
    medians = {n: bench_common.median(times[n]) for n in eval_names}
    for name in eval_names:
      row[f"{name}_images_per_s"] = round(args.batch_size / medians[name], 2)
      row[f"{name}_images_per_s_best"] = round(args.batch_size / min(times[name]), 2)
      row[f"{name}_s_per_step_all"] = [round(t, 3) for t in times[name]]
      for peer in ("xla", "torch", f"cpu_eigen_at_{args.before_rev}"):
        if name != peer and peer in medians:
          # Paired: the ratio within each round (same load), then the median over
          # rounds; and the ratio of the best times (interference only slows down).
          row[f"{name}_speed_vs_{peer}"] = round(bench_common.median(
              [p / t for p, t in zip(times[peer], times[name])]), 3)
          row[f"{name}_speed_vs_{peer}_best"] = round(min(times[peer]) / min(times[name]), 3)
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
