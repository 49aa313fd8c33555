"""Training and eval throughput (images/s) of the multi-task ResNet-18 step on this
machine's devices, for several batch sizes and image sizes.

  python benchmarks/train_step_throughput.py --batch_sizes 32,64 --image_sizes 112

Prints one JSON line per setting; append them to a results file with `>>`.
"""
import argparse
import json
import platform
import time

import jax
import numpy as np

from affect_jax import train
from configs import default


def synthetic_batch(rng, size, image_size):
  return {
      "image": rng.integers(0, 256, (size, image_size, image_size, 3), dtype=np.uint8),
      "expression": rng.integers(0, 8, size).astype(np.int32),
      "expression_mask": np.ones(size, np.float32),
      "au": (rng.random((size, 12)) < 0.3).astype(np.float32),
      "au_mask": np.ones((size, 12), np.float32),
      "valence_arousal": rng.uniform(-1, 1, (size, 2)).astype(np.float32),
      "va_mask": np.ones(size, np.float32),
  }


def measure(batch_size, image_size, dtype, steps, warmup=2):
  config = default.get_config()
  config.input.batch_size = batch_size
  config.input.image_size = image_size
  config.model.dtype = dtype
  mesh = train.create_mesh()
  model = train.create_model(config.model)
  lr_fn = train.create_learning_rate_fn(config)
  state = train.create_train_state(config, model, mesh, lr_fn)
  step = train.compile_train_step(mesh, settings=train.loss_settings_from_config(
      config, None), learning_rate_fn=lr_fn, dtype=train.DTYPES[dtype], seed=0)
  evaluate = train.compile_eval_step(mesh, num_expr_classes=8, dtype=train.DTYPES[dtype])
  batch = train.device_batch(synthetic_batch(np.random.default_rng(0), batch_size,
                                             image_size), mesh)
  result = {}
  for name, fn in (("train", lambda s: step(s, batch)[0]),
                   ("eval", lambda s: (evaluate(s, batch), s)[1])):
    for _ in range(warmup):
      state = jax.block_until_ready(fn(state))
    start = time.perf_counter()
    for _ in range(steps):
      state = fn(state)
    jax.block_until_ready(state)
    result[f"{name}_images_per_s"] = round(batch_size * steps /
                                           (time.perf_counter() - start), 1)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_sizes", default="32,64")
  parser.add_argument("--image_sizes", default="112")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  for image_size in map(int, args.image_sizes.split(",")):
    for batch_size in map(int, args.batch_sizes.split(",")):
      row = {"date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
             "devices": jax.device_count(), "host": platform.processor() or
             platform.machine(), "jax": jax.__version__, "batch_size": batch_size,
             "image_size": image_size, "dtype": args.dtype}
      row.update(measure(batch_size, image_size, args.dtype, args.steps))
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
