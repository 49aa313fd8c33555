"""A study: a grid of named variants of one base config, trained one after another, each
in its own workdir, and one report comparing them (table, CSV, plots).

  affect-jax study --config configs/study.py --study_dir runs/study \\
      --config.base.dataset.data_dir=runs/demo/tfds [--variants a,b] \\
      [--shard_index 0 --shard_count 2] [--report_only] [--report_dir docs/study]

(or `python -m affect_jax.study.runner ...`).

Each variant runs once per seed of `config.seeds`, in `<study_dir>/<variant>/seed<k>`
(without seeds: once, in `<study_dir>/<variant>`); the rules below hold per run. The runs
of the variants in `config.temporal.variants` are followed by a temporal head over
their frame embeddings (`affect-jax temporal`), trained from `config.temporal.base` in
`<study_dir>/<variant>_temporal/seed<k>`.

A finished variant (its final step evaluated and checkpointed) is skipped; an interrupted
one resumes from its latest checkpoint (train_and_evaluate does that by itself). A variant
that warm-starts from another (`init_from_variant`) runs after it, and a shard always holds
whole dependency chains, so machines never wait for each other. The runner keeps
`<workdir>/study_run.json`: the variant's settings and the wall time of every session."""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from typing import Callable, Sequence

from absl import flags

from affect_jax import cli, cli_logging, errors, host_setup
from affect_jax.study.report import write_study_report
from affect_jax.study.variants import (
  Variant,
  changed_settings,
  checkpoint_steps,
  comparable_settings,
  is_finished,
  is_optuna_search,
  plan_study,
  read_run_record,
  record_command,
  study_runs,
  temporal_config,
  temporal_runs,
  variant_config,
  variant_workdir,
  write_run_record,
)

log = logging.getLogger(__name__)


def check_unchanged(variant: Variant, record: dict | None, settings: dict) -> None:
  if record is None:
    return
  changes = changed_settings(record.get("settings", {}), settings)
  if changes:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in
                      ((k, *v) for k, v in sorted(changes.items())))
    raise errors.InputError(f"{variant.name}: its workdir was trained with other "
                            f"settings ({shown}); delete the workdir or use another "
                            "--study_dir")


def run_variant(study_config, variant: Variant, study_dir: str,
                train_fn: Callable | None = None) -> str:
  """Trains one variant to its final step unless it is there: 'skipped' or 'trained'."""
  config = variant_config(study_config, variant, study_dir)
  workdir = variant_workdir(study_dir, variant.name)
  settings = comparable_settings(config)
  record = read_run_record(workdir)
  check_unchanged(variant, record, settings)
  if is_finished(workdir, config.num_train_steps):
    return "skipped"
  if variant.init_from_variant and not dependency_finished(study_config, variant,
                                                          study_dir):
    raise errors.InputError(f"{variant.name} warm-starts from "
                            f"{variant.init_from_variant}, which has not finished; run "
                            "it first")
  if train_fn is None:
    from affect_jax.train import loop  # pylint: disable=g-import-not-at-top
    train_fn = loop.train_and_evaluate
  record = record or {"variant": variant.name, "description": variant.description,
                      "group": variant.group, "overrides": dict(variant.overrides),
                      "init_from_variant": variant.init_from_variant,
                      "settings": settings, "sessions": []}
  train_recording_sessions(config, workdir, record, train_fn)
  return "trained"


def run_temporal(study_config, frame_run: Variant, run: Variant, study_dir: str,
                 train_fn: Callable | None = None) -> str:
  """The temporal head `run` over a finished frame run's embeddings: 'skipped' or
  'trained'. Its own config.json refuses a resume with other settings."""
  config = temporal_config(study_config, frame_run, study_dir)
  workdir = variant_workdir(study_dir, run.name)
  if is_finished(workdir, config.num_train_steps):
    return "skipped"
  if train_fn is None:
    from affect_jax.temporal import loop  # pylint: disable=g-import-not-at-top
    train_fn = loop.train_and_evaluate
  record = read_run_record(workdir) or {
      "variant": run.name, "description": run.description, "group": run.group,
      "frame_run": frame_run.name, "settings": comparable_settings(config),
      "sessions": []}
  train_recording_sessions(config, workdir, record, train_fn)
  return "trained"


def train_recording_sessions(config, workdir: str, record: dict, train_fn: Callable
                             ) -> None:
  """train_fn(config, workdir), its session (start and end step, outcome, wall time,
  machine) appended to the workdir's run record, an interruption's too."""
  for session in record["sessions"]:
    if session.get("outcome") == "running":
      session["outcome"] = "killed (no end time)"
  steps = checkpoint_steps(workdir)
  session = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
             "start_step": steps[-1] if steps else 0, "seconds": None,
             "outcome": "running", "machine": describe_machine()}
  record["sessions"].append(session)
  write_run_record(workdir, record)
  started = time.perf_counter()
  try:
    train_fn(config, workdir)
    session["outcome"] = "finished"
  except BaseException as error:  # KeyboardInterrupt too: the session's time counts
    session["outcome"] = f"interrupted ({type(error).__name__})"
    raise
  finally:
    session["seconds"] = round(time.perf_counter() - started, 3)
    steps = checkpoint_steps(workdir)
    session["end_step"] = steps[-1] if steps else 0
    write_run_record(workdir, record)


def dependency_finished(study_config, variant: Variant, study_dir: str) -> bool:
  dependency = {v.name: v for v in study_runs(study_config)}[variant.init_from_variant]
  config = variant_config(study_config, dependency, study_dir)
  return is_finished(variant_workdir(study_dir, dependency.name), config.num_train_steps)


def describe_machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "devices": len(devices), "cpu_count": os.cpu_count()}


def run_study(study_config, study_dir: str, names: Sequence[str] | None = None,
              shard_index: int = 0, shard_count: int = 1,
              train_fn: Callable | None = None,
              temporal_train_fn: Callable | None = None) -> dict[str, str]:
  """Trains this shard's runs in dependency order, each run of a variant in
  config.temporal.variants followed by its temporal head; {run name: 'skipped' |
  'trained'}."""
  plan = plan_study(study_config, names, shard_index, shard_count)
  outcomes = {}
  for number, variant in enumerate(plan, 1):
    source = (f", warm start from {variant.init_from_variant}"
              if variant.init_from_variant else "")
    log.info("[%d/%d] %s: %s%s", number, len(plan), variant.name, variant.description,
             source)
    outcomes[variant.name] = run_variant(study_config, variant, study_dir, train_fn)
    log.info("[%d/%d] %s: %s", number, len(plan), variant.name, outcomes[variant.name])
    for run in temporal_runs(study_config, [variant]):
      outcomes[run.name] = run_temporal(study_config, variant, run, study_dir,
                                        temporal_train_fn)
      log.info("[%d/%d] %s: %s", number, len(plan), run.name, outcomes[run.name])
  search = study_config.get("search")
  if is_optuna_search(search) and not names and shard_index == 0:
    from affect_jax.study import optuna_search  # pylint: disable=g-import-not-at-top
    outcomes.update(optuna_search.run_search(study_config, study_dir, run_variant,
                                             train_fn))
  return outcomes


def enable_compilation_cache(study_dir: str) -> None:
  """Variants share programs (every eval step of a three-task model, most train steps):
  a persistent cache turns their repeated compilations into loads."""
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.path.abspath(study_dir), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("study_dir", None, "Folder of the variants' workdirs.",
                      flag_values=flag_values)
  flags.DEFINE_string("variants", "", "Comma-separated variants to run, every seed "
                      "of each (or runs: name/seed<k>), with the ones they warm-start "
                      "from; default: all.", flag_values=flag_values)
  flags.DEFINE_integer("shard_index", 0, "This machine's shard, in [0, shard_count).",
                       flag_values=flag_values)
  flags.DEFINE_integer("shard_count", 1, "Machines sharing the study.",
                       flag_values=flag_values)
  flags.DEFINE_bool("report_only", False, "Write the report from the workdirs; train "
                    "nothing.", flag_values=flag_values)
  flags.DEFINE_bool("report", True, "Write the report after training; --noreport for "
                    "one of several invocations sharing a study (shards, seeds added "
                    "side by side), whose report is written once, with --report_only.",
                    flag_values=flag_values)
  flags.DEFINE_bool("list", False, "Print what this shard would run, in order; train "
                    "nothing.", flag_values=flag_values)
  flags.DEFINE_string("report_dir", None, "Where the report goes (default: "
                      "<study_dir>/report).", flag_values=flag_values)
  flags.DEFINE_string("title", "Study: uni-task vs multi-task affect models",
                      "The report's title.", flag_values=flag_values)
  flags.mark_flag_as_required("study_dir", flag_values=flag_values)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  flag_values, _ = cli.parse_flags(argv, define_flags, __doc__,
                                   config="Study configuration file (configs/study.py); "
                                   "--config.x=value overrides a field.",
                                   config_required=True)
  cli_logging.start_console_logging()
  host_setup.prepare_before_jax()  # before JAX starts its threads
  study_config = flag_values.config
  study_dir = os.path.abspath(flag_values.study_dir)
  names = [n for n in flag_values.variants.split(",") if n]
  if flag_values.list:
    for variant in plan_study(study_config, names, flag_values.shard_index,
                              flag_values.shard_count):
      print(f"{variant.name:32s} {variant.group:15s} {variant.description}")
    return 0
  if flag_values.report_only and not flag_values.report:
    raise errors.InputError("--report_only writes the report: drop --noreport")
  if flag_values.report_only and not os.path.isdir(study_dir):
    raise errors.InputError(f"--study_dir {flag_values.study_dir} does not exist: "
                            "nothing to report")
  enable_compilation_cache(study_dir)  # the report predicts with every run too
  if not flag_values.report_only:
    record_command(study_dir, ["", *argv])  # the command's own arguments
    run_study(study_config, study_dir, names, flag_values.shard_index,
              flag_values.shard_count)
    if not flag_values.report:
      return 0
  paths = write_study_report(study_config, study_dir, flag_values.report_dir,
                             title=flag_values.title)
  log.info("report: %s", paths["report.md"])
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
