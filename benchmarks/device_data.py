"""Device-resident data (affect_jax.data.device_resident) against the host input
pipeline: batches per second of augmented training batches, same run, interleaved.

  taskset -c 0 python benchmarks/device_data.py --data_dir runs/demo/tfds \
      --out benchmarks/results/device_data.jsonl

host:   pipeline.train_dataset (grain, in-process, one core) + data_parallel.device_batch
        (the copy onto the mesh): what the training loop waits for per step today.
device: device_resident.compile_draw_batch on a split loaded once by
        load_split_to_device (sharded over the devices): index draw, gather and
        augmentation inside jit.
On this CPU both run on the same core, so the figure compares the work per batch; on
a GPU the device path runs on the accelerator and the host pipeline drops out of the
step. Also reports the time to load the split (decode + upload) and its bytes.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax import data_parallel  # noqa: E402
from affect_jax.data import augment, device_resident, pipeline, records  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="affwild2/union")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = bench_common.parse_args(parser)
  source = records.open_data_source(args.dataset, "train", args.data_dir)
  mesh = data_parallel.create_mesh()
  start = time.perf_counter()
  dataset = device_resident.load_split_to_device(source, mesh)
  jax.block_until_ready(dataset)
  load_s = time.perf_counter() - start
  for policy in ("none", "basic", "strong"):
    draw = device_resident.compile_draw_batch(mesh, dataset,
                                              global_batch_size=args.batch_size,
                                              seed=0, augment=policy)
    jax.block_until_ready(draw(dataset, 0))
    host = pipeline.as_iterator(pipeline.train_dataset(
        source, global_batch_size=args.batch_size, seed=0,
        augment=augment.AugmentConfig.from_policy(policy)))
    next(host)
    step = [1]

    def run_device():
      for _ in range(args.batches):
        batch = draw(dataset, step[0])
        step[0] += 1
      jax.block_until_ready(batch)

    def run_host():
      for _ in range(args.batches):
        batch = data_parallel.device_batch(next(host), mesh)
      jax.block_until_ready(batch)

    load_before = bench_common.load()
    times = {"host": [], "device": []}
    for round_index in range(args.rounds):
      order = ("host", "device") if round_index % 2 == 0 else ("device", "host")
      for name in order:
        times[name].append(bench_common.timed(run_host if name == "host" else run_device))
    row = bench_common.machine()
    row.update({"benchmark": "device_data", "policy": policy, "records": len(source),
                "batch_size": args.batch_size, "device": jax.devices()[0].device_kind,
                "split_gb": round(device_resident.split_nbytes(len(source)) / 1e9, 3),
                "load_split_s": round(load_s, 1), "load_before": load_before})
    for name, values in times.items():
      row[f"{name}_images_per_s"] = round(args.batch_size * args.batches
                                          / bench_common.median(values))
    row["device_speedup_over_host"] = round(bench_common.median(
        [h / d for h, d in zip(times["host"], times["device"])]), 2)
    row["load_after"] = bench_common.load()
    bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
