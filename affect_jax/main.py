"""Command line: train, or evaluate a checkpoint.

  python -m affect_jax.main --config configs/default.py --workdir runs/mtl \
      --config.dataset.data_dir=DATA --config.optimizer.learning_rate=0.05
  python -m affect_jax.main --config configs/default.py --workdir runs/mtl --mode eval
"""
if __name__ == "__main__":  # before JAX starts: glibc reads malloc settings at start-up
  from affect_jax import host_memory
  host_memory.reexec_with_heap_reuse()

import logging

from absl import app, flags
from ml_collections import config_flags

from affect_jax import cli_logging, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming if possible), "
                  "or evaluate a checkpoint.")
flags.DEFINE_integer("step", None, "With --mode eval: the checkpoint step (default: "
                     "the best, else the latest).")
flags.DEFINE_string("split", None, "With --mode eval: the split (default: the config's "
                    "eval split).")
flags.DEFINE_bool("distributed", False, "Several processes: call "
                  "jax.distributed.initialize(), which detects Cloud TPU pods, SLURM "
                  "and other clusters; --coordinator_address etc. set it explicitly.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run, before any device is touched."""
  if not (FLAGS.distributed or FLAGS.coordinator_address):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes,
                             process_id=FLAGS.process_id)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  cli_logging.quiet_library_logs()
  initialize_distributed()
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step, FLAGS.split)


if __name__ == "__main__":
  app.run(main)
