"""The train and eval commands: train a model, or evaluate a checkpoint of a run.

  affect-jax train --config configs/default.py --workdir runs/mtl \\
      --config.dataset.data_dir=DATA --config.optimizer.learning_rate=0.05
  affect-jax eval --config configs/default.py --workdir runs/mtl [--step N] [--split S]

`python -m affect_jax.main [--mode eval] ...` runs the same commands.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import flags

from affect_jax import cli, cli_logging, host_setup

TRAIN_DOC = """affect-jax train: trains a model, resuming from the workdir's latest checkpoint
(else the config's init_from, else from scratch).

  affect-jax train --config configs/default.py --workdir runs/mtl \\
      --config.dataset.data_dir=DATA --config.optimizer.learning_rate=0.05
  # on every host of a TPU pod or SLURM allocation:
  affect-jax train --config configs/default.py --workdir gs://bucket/run --distributed
"""
EVAL_DOC = """affect-jax eval: evaluates a checkpoint of a run (the best, else the latest,
unless --step) on the config's eval split (unless --split).

  affect-jax eval --config configs/default.py --workdir runs/mtl \\
      --config.dataset.data_dir=DATA [--step N] [--split validation]
"""
CONFIG_HELP = "The run's config file (configs/*.py); --config.x=value overrides a field."


def define_run_flags(flag_values: flags.FlagValues) -> None:
  """The flags of both commands: the workdir and how processes join a multi-host run."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.",
                      flag_values=flag_values)
  flags.DEFINE_bool("distributed", False, "Several processes: call "
                    "jax.distributed.initialize(), which detects Cloud TPU pods, SLURM "
                    "and other clusters; --coordinator_address etc. set it explicitly.",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index.",
                       flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def define_eval_flags(flag_values: flags.FlagValues) -> None:
  define_run_flags(flag_values)
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the best, else "
                       "the latest).", flag_values=flag_values)
  flags.DEFINE_string("split", None, "The split (default: the config's eval split).",
                      flag_values=flag_values)


def define_mode_flags(flag_values: flags.FlagValues) -> None:
  define_eval_flags(flag_values)
  flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resuming if possible) "
                    "or eval (a checkpoint; --step, --split).", flag_values=flag_values)


def initialize_distributed(flag_values: flags.FlagValues) -> None:
  """Joins the other processes of a multi-host run, before any device is touched."""
  if not (flag_values.distributed or flag_values.coordinator_address):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                             num_processes=flag_values.num_processes,
                             process_id=flag_values.process_id)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def run(flag_values: flags.FlagValues, mode: str) -> int:
  cli_logging.start_console_logging()
  host_setup.prepare_before_jax(flag_values.config.model.get("implementation", "auto"))
  initialize_distributed(flag_values)
  from affect_jax.train import loop  # pylint: disable=g-import-not-at-top
  if mode == "train":
    loop.train_and_evaluate(flag_values.config, flag_values.workdir)
  else:
    loop.evaluate_checkpoint(flag_values.config, flag_values.workdir,
                             flag_values.step, flag_values.split)
  return 0


def train_main(argv: Sequence[str] | None = None) -> int:
  flag_values, _ = cli.parse_flags(argv, define_run_flags, TRAIN_DOC,
                                   config=CONFIG_HELP, config_required=True)
  return run(flag_values, "train")


def eval_main(argv: Sequence[str] | None = None) -> int:
  flag_values, _ = cli.parse_flags(argv, define_eval_flags, EVAL_DOC,
                                   config=CONFIG_HELP, config_required=True)
  return run(flag_values, "eval")


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m affect_jax.main`: train, or with --mode eval evaluate."""
  flag_values, _ = cli.parse_flags(argv, define_mode_flags, __doc__,
                                   config=CONFIG_HELP, config_required=True)
  return run(flag_values, flag_values.mode)


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
