"""Whole training steps fed by the host pipeline against device-resident data, and
whether the device waits for data: the trainer's own feeds (`Trainer.train_feed`) and
compiled step, same run, interleaved rounds.

  python benchmarks/train_feeds.py --data_dir runs/demo/tfds --config configs/demo.py \
      --out benchmarks/results/train_feeds.jsonl

For each feed: steps/s and images/s of the loop as loop.train_and_evaluate runs it
(get the batch, dispatch the step, read the previous step's finite flag one step late),
the mean time blocked getting a batch, and the fraction of steps at which the device
had already finished the previous step when the batch arrived (input-bound steps; see
writers.InputWaitMeter). Pass --worker_count to try grain worker processes.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts its threads (see affect_jax.host_setup)
  from affect_jax import host_setup
  host_setup.prepare_before_jax()

import argparse
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from affect_jax.eval.writers import InputWaitMeter  # noqa: E402
from affect_jax.train import loop  # noqa: E402


class FedLoop:
  """The training loop's per-step work for one feed, resumable across rounds."""

  def __init__(self, trainer: loop.Trainer, device_resident: bool):
    trainer.config.input.device_resident = device_resident
    self.trainer = trainer
    self.feed = trainer.train_feed()
    self.state = trainer.new_state()
    self.step = 0
    self.meter = InputWaitMeter()
    self.run(3)  # compile and warm up
    self.meter = InputWaitMeter()

  def run(self, steps: int) -> None:
    pending = None
    for _ in range(steps):
      self.step += 1
      started = time.perf_counter()
      batch, _ = self.feed.next_batch(self.step)
      self.meter.record(time.perf_counter() - started,
                        None if pending is None else pending.is_ready())
      self.state, step_metrics = self.trainer.train_fn(self.state, batch)
      if pending is not None:
        float(pending)
      pending = step_metrics["finite"]
    jax.block_until_ready(self.state)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--worker_count", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="model.dtype (default: the config's)")
  parser.add_argument("--out", default=None)
  args = bench_common.parse_args(parser)
  config = bench_common.load_config(args.config)
  config.dataset.data_dir = args.data_dir
  if args.worker_count is not None:
    config.input.worker_count = args.worker_count
  if args.dtype:
    config.model.dtype = args.dtype
  workdir = tempfile.mkdtemp()
  loops = {}
  for name, resident in (("host_pipeline", False), ("device_resident", True)):
    started = time.perf_counter()
    loops[name] = FedLoop(loop.Trainer(config.copy_and_resolve_references(), workdir),
                          resident)
    print(f"{name}: ready in {time.perf_counter() - started:.1f} s", flush=True)
  load_before = bench_common.load()
  times = {name: [] for name in loops}
  for round_index in range(args.rounds):
    names = list(loops) if round_index % 2 == 0 else list(loops)[::-1]
    for name in names:
      times[name].append(bench_common.timed(lambda: loops[name].run(args.steps)))
  row = bench_common.machine()
  row.update({"benchmark": "train_feeds", "config": args.config,
              "batch": config.input.batch_size, "image_size": config.input.image_size,
              "augment": config.input.augment, "worker_count": config.input.worker_count,
              "num_filters": config.model.num_filters, "dtype": config.model.dtype,
              "steps": args.steps,
              "jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "devices": jax.device_count(), "load_before": load_before})
  for name, values in times.items():
    seconds = bench_common.median(values) / args.steps
    row[f"{name}_steps_per_s"] = round(1 / seconds, 3)
    row[f"{name}_images_per_s"] = round(config.input.batch_size / seconds, 1)
    row.update({f"{name}_{k}": round(v, 3) for k, v in loops[name].meter.total().items()})
  row["device_resident_speedup"] = round(
      bench_common.median(times["host_pipeline"])
      / bench_common.median(times["device_resident"]), 3)
  row["load_after"] = bench_common.load()
  bench_common.emit(row, args.out)


if __name__ == "__main__":
  main()
