"""`affect-jax temporal`: trains, evaluates or predicts with a temporal model over the
frame embeddings of a trained run.

  affect-jax temporal --config configs/temporal.py --workdir runs/temporal \\
      --config.frame_run.workdir=runs/mtl --config.frame_run.data_dir=DATA
  affect-jax temporal --mode eval --workdir runs/temporal [--step N]
  affect-jax temporal --mode predict --workdir runs/temporal --source tfds:validation \\
      --out OUT
  affect-jax temporal --mode compare --workdir runs/temporal [--replicates 1000]

train computes the embeddings of both splits once (under <workdir>/embeddings/), then
trains, resuming from the workdir's latest checkpoint. predict embeds the source's
frames with the frame run's checkpoint the temporal model was trained on (under
OUT/embeddings/), then writes predictions.csv (one row per face frame, AU threshold
0.5) and summary.json (with exact scores for a labelled split). compare scores the
temporal model and its frame model on every frame of the eval split's videos: each
score's difference with a 95% paired bootstrap interval over the videos.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

from absl import flags

from affect_jax import cli, cli_logging, host_setup

log = logging.getLogger(__name__)

CONFIG_HELP = ("The temporal config (configs/temporal.py; default for eval and predict: "
               "the run's config.json); --config.x=value overrides a field.")


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "The temporal run's folder.",
                      flag_values=flag_values)
  flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "compare"],
                    "train (resuming), eval (a checkpoint), predict (a source's "
                    "frames) or compare (with the frame model).",
                    flag_values=flag_values)
  flags.DEFINE_integer("replicates", 1000, "compare: bootstrap replicates.",
                       flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Checkpoint step for eval and predict (default: "
                       "the best, else the latest).", flag_values=flag_values)
  flags.DEFINE_string("source", None, "predict: tfds:SPLIT, folder:PATH or list:PATH.",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "predict: the output folder.",
                      flag_values=flag_values)
  flags.DEFINE_multi_string("image_root", [], "predict with list:PATH: a "
                            "cropped_aligned folder (repeat for several).",
                            flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def train(config, workdir: str) -> int:
  from affect_jax.temporal import loop  # pylint: disable=g-import-not-at-top
  loop.train_and_evaluate(config, workdir)
  return 0


def evaluate(config, workdir: str, step: int | None) -> int:
  from affect_jax.eval.writers import MetricWriter  # pylint: disable=g-import-not-at-top
  from affect_jax.temporal import loop  # pylint: disable=g-import-not-at-top
  from affect_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  trainer = loop.TemporalTrainer(config, workdir)
  step = checkpoints.checkpoint_step(trainer.manager, f"{workdir}/checkpoints", step)
  state = checkpoints.restore_checkpoint(trainer.manager, step, trainer.abstract_state())
  scores, _ = trainer.evaluate(state)
  writer = MetricWriter(workdir)
  writer.write_scores(step, config.frame_run.eval_split, scores, mode="eval")
  writer.close()
  print(json.dumps({k: v for k, v in scores.items() if isinstance(v, float)}, indent=2))
  return 0


def predict(config, workdir: str, flag_values) -> int:
  from affect_jax.temporal import prediction  # pylint: disable=g-import-not-at-top
  if not flag_values.source or not flag_values.out:
    print("error: --mode predict needs --source and --out", file=sys.stderr)
    return cli.USAGE_ERROR
  summary = prediction.run_prediction(
      config, workdir, flag_values.source, flag_values.out, step=flag_values.step,
      image_roots=flag_values.image_root)
  print(json.dumps(summary, indent=2))
  return 0


def compare(config, workdir: str, flag_values) -> int:
  from affect_jax.temporal import prediction  # pylint: disable=g-import-not-at-top
  from affect_jax.temporal.compare import format_difference  # pylint: disable=g-import-not-at-top
  results = prediction.compare_with_frame_model(config, workdir, step=flag_values.step,
                                                replicates=flag_values.replicates)
  for result in results:
    print(format_difference(result, ("temporal", "frame")))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  flag_values, _ = cli.parse_flags(argv, define_flags, __doc__, config=CONFIG_HELP)
  cli_logging.start_console_logging()
  host_setup.prepare_before_jax()
  from affect_jax.inference import restore  # pylint: disable=g-import-not-at-top
  workdir = flag_values.workdir
  if flag_values.mode == "train":
    if flag_values.config is None:
      print("error: train needs --config (e.g. configs/temporal.py)", file=sys.stderr)
      return cli.USAGE_ERROR
    return train(flag_values.config, workdir)
  config = restore.load_config(workdir, flag_values.config)
  if flag_values.mode == "eval":
    return evaluate(config, workdir, flag_values.step)
  if flag_values.mode == "compare":
    return compare(config, workdir, flag_values)
  return predict(config, workdir, flag_values)


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
