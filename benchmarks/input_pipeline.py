"""Input pipeline throughput: images/s on one core for JPEG decode + augment + batch,
per augmentation policy, from a built `affwild2` TFDS dataset (in-process, no workers,
so the figure is per core).

  python benchmarks/input_pipeline.py --data_dir runs/demo/tfds --batches 60

Prints one JSON line per policy.
"""
import argparse
import json
import time

from affect_jax import input_pipeline as ip


def measure(source, policy: str, batch_size: int, batches: int) -> float:
  ds = ip.train_dataset(source, global_batch_size=batch_size, seed=0,
                        augment=ip.AugmentConfig.from_policy(policy))
  iterator = ip.as_iterator(ds)
  next(iterator)  # opens files, warms caches
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batch_size * batches / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="affwild2/union")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=60)
  args = parser.parse_args()
  source = ip.open_data_source(args.dataset, "train", args.data_dir)
  for policy in ("none", "basic", "strong"):
    rate = measure(source, policy, args.batch_size, args.batches)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "policy": policy,
                      "batch_size": args.batch_size,
                      "images_per_s_per_core": round(rate)}), flush=True)


if __name__ == "__main__":
  main()
