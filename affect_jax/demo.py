"""The demo, end to end on a CPU: synthetic release -> TFDS build -> multi-task training
-> evaluation -> checkpoint -> report.

  python -m affect_jax.demo --workdir runs/demo

Each stage is skipped when its output already exists, so a re-run (or a run killed and
started again) picks up where it stopped; training resumes from its last checkpoint.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts: glibc reads malloc settings at start-up
  from affect_jax import host_memory
  host_memory.reexec_with_heap_reuse()

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("affect_jax.demo")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--num_videos", type=int, default=40)
  parser.add_argument("--frames_per_video", type=int, default=150)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps (default: configs/demo.py's)")
  return parser.parse_args(argv)


def make_release(release_dir: str, args) -> dict:
  from tfds_affwild2 import synthetic  # pylint: disable=g-import-not-at-top
  truth_path = os.path.join(release_dir, "ground_truth.json")
  if os.path.exists(truth_path):
    with open(truth_path) as f:
      return json.load(f)
  return synthetic.generate_release(release_dir, seed=args.seed,
                                    num_videos=args.num_videos,
                                    frames_per_video=args.frames_per_video)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  from affect_jax import cli_logging, report, train  # pylint: disable=g-import-not-at-top
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from tfds_affwild2 import build  # pylint: disable=g-import-not-at-top
  cli_logging.quiet_library_logs()
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
  trainer = train.Trainer(config, train_dir)
  final_state = train.train_and_evaluate(config, train_dir, trainer)
  train_seconds = time.perf_counter() - train_started

  log.info("4/4 evaluation of the best checkpoint and report")
  state = train.restore_for_eval(trainer, current=final_state)
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
  sys.exit(main())
