"""A run folder holding a model at initialisation (no training): what the video
benchmark restores; speed does not depend on the weights.

  python benchmarks/video_run.py OUT_WORKDIR [--config configs/default.py]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("video_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_initialised_run(workdir: str, config) -> str:
  from affect_jax import data_parallel  # pylint: disable=g-import-not-at-top
  from affect_jax.model import implementation, multitask  # pylint: disable=g-import-not-at-top
  from affect_jax.train import checkpoints, optimizers, run_config, train_state  # pylint: disable=g-import-not-at-top
  mesh = data_parallel.create_mesh()
  model = multitask.create_model(config.model,
                                 implementation.implementation_for(config.model, mesh))
  state = train_state.create_train_state(config, model, mesh,
                                         optimizers.create_learning_rate_fn(config))
  os.makedirs(workdir, exist_ok=True)
  run_config.check_and_write_config(config, workdir)
  manager = checkpoints.create_checkpoint_manager(workdir, asynchronous=False)
  checkpoints.save_checkpoint(manager, 1, state, metrics={"p_mtl": 0.0})
  manager.wait_until_finished()
  manager.close()
  return workdir


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--config", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "default.py"))
  args = parser.parse_args()
  print(write_initialised_run(args.workdir, load_config(args.config)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
