"""The demo, end to end on a CPU: synthetic release -> TFDS build -> multi-task training
-> evaluation -> checkpoint -> report.

  affect-jax demo --workdir runs/demo      (or python -m affect_jax.demo)

Each stage is skipped when its output already exists, so a re-run (or a run killed and
started again) picks up where it stopped; training resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Sequence

from absl import flags

from affect_jax import cli, cli_logging, errors, host_setup

log = logging.getLogger("affect_jax.demo")


def define_flags(flag_values: flags.FlagValues) -> None:
  # The bounds are the synthetic release's: a value outside them is a usage error here,
  # not a traceback from the release writer.
  flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its output.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_videos", 40, "Videos of the synthetic release.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("frames_per_video", 150, "Frames of each synthetic video.",
                       lower_bound=5, flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "The synthetic release's seed.", lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_integer("steps", None, "Training steps (default: configs/demo.py's).",
                       lower_bound=1, flag_values=flag_values)


def make_release(release_dir: str, args) -> dict:
  from tfds_affwild2 import synthetic  # pylint: disable=g-import-not-at-top
  truth_path = os.path.join(release_dir, "ground_truth.json")
  if os.path.exists(truth_path):
    with open(truth_path) as f:
      return json.load(f)
  return synthetic.generate_release(release_dir, seed=args.seed,
                                    num_videos=args.num_videos,
                                    frames_per_video=args.frames_per_video)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse_flags(argv, define_flags, __doc__)
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise errors.InputError(f"--workdir {args.workdir} is a file, not a folder")
  cli_logging.start_console_logging()
  host_setup.prepare_before_jax()  # before JAX starts its threads
  from affect_jax.eval import report  # pylint: disable=g-import-not-at-top
  from affect_jax.train import loop  # pylint: disable=g-import-not-at-top
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from tfds_affwild2 import build  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(args.workdir)
  started = time.perf_counter()

  log.info("1/4 synthetic release -> %s/release", workdir)
  truth = make_release(os.path.join(workdir, "release"), args)
  log.info("1/4 done: %s", {s: v.get("frames") for s, v in truth["splits"].items()})

  log.info("2/4 TFDS build -> %s/tfds", workdir)
  builder = build.build_dataset(os.path.join(workdir, "release"),
                                os.path.join(workdir, "tfds"), "union")
  print(build.format_summary(dict(builder.info.metadata["summary"])))

  config = demo_config.get_config()
  config.dataset.data_dir = os.path.join(workdir, "tfds")
  if args.steps:
    config.num_train_steps = args.steps
  train_dir = os.path.join(workdir, "train")
  log.info("3/4 multi-task training, %d steps -> %s", config.num_train_steps, train_dir)
  train_started = time.perf_counter()
  trainer = loop.Trainer(config, train_dir)
  final_state = loop.train_and_evaluate(config, train_dir, trainer)
  train_seconds = time.perf_counter() - train_started

  log.info("4/4 evaluation of the best checkpoint and report")
  state = trainer.restore_for_eval(current=final_state)
  scores, collected = trainer.evaluate(state, collect_outputs=True)
  path = report.write_report(
      os.path.join(workdir, "report"), scores, collected,
      num_expr_classes=config.model.num_expr_classes,
      title="affect-jax demo: multi-task ResNet-18 on the synthetic release",
      details={"checkpoint step": int(state.step),
               "training steps": config.num_train_steps,
               "global batch": config.input.batch_size,
               "training frames": builder.info.splits["train"].num_examples,
               "validation frames": builder.info.splits["validation"].num_examples,
               "training wall time (s)": f"{train_seconds:.0f}",
               "demo wall time (s)": f"{time.perf_counter() - started:.0f}"})
  with open(os.path.join(workdir, "report", "scores.json"), "w") as f:
    json.dump(scores, f, indent=1)
  log.info("report: %s", path)
  print(open(path).read())
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
