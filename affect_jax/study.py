"""A study: a grid of named variants of one base config, trained one after another, each
in its own workdir, and one report comparing them (table, CSV, plots).

  python -m affect_jax.study --config configs/study.py --study_dir runs/study \
      --config.base.dataset.data_dir=runs/demo/tfds [--variants a,b] \
      [--shard_index 0 --shard_count 2] [--report_only] [--report_dir docs/study]

A finished variant (its final step evaluated and checkpointed) is skipped; an interrupted
one resumes from its latest checkpoint (train_and_evaluate does that by itself). A variant
that warm-starts from another (`init_from_variant`) runs after it, and a shard always holds
whole dependency chains, so machines never wait for each other. The runner keeps
`<workdir>/study_run.json`: the variant's settings and the wall time of every session.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts: glibc reads malloc settings at start-up
  from affect_jax import host_memory
  host_memory.reexec_with_heap_reuse()

import copy
import dataclasses
import datetime
import itertools
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from affect_jax.metric_writer import read_metrics

log = logging.getLogger(__name__)
RUN_RECORD = "study_run.json"
COMMANDS_LOG = "study_commands.txt"
# Settings a finished or interrupted variant may be run again with: paths that differ
# between machines and study directories, and settings that change how a run goes but
# not what it computes (resumed runs equal uninterrupted ones; eval scores are exact
# whatever the eval batch).
IGNORED_SETTINGS = ("dataset.data_dir", "init_from.path", "input.worker_count",
                    "input.worker_buffer_size", "input.eval_batch_size",
                    "checkpoint.asynchronous", "checkpoint.keep", "log_every_steps",
                    "checkpoint_every_steps")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: tuple[tuple[str, Any], ...] = ()  # (dotted config key, value)
  init_from_variant: str = ""  # warm-start from this variant's finished workdir
  description: str = ""
  group: str = ""


def variant_from_dict(spec: dict) -> Variant:
  return Variant(name=spec["name"], overrides=tuple(spec.get("overrides", {}).items()),
                 init_from_variant=spec.get("init_from_variant", ""),
                 description=spec.get("description", ""), group=spec.get("group", ""))


# ---------------------------------------------------------------------------- planning

def format_value(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def search_variants(search, variants: Sequence[Variant]) -> list[Variant]:
  """Trials of the hyper-parameter search, each a variant on top of search.base_variant.

  Random search draws distinct points of the grid with a seeded generator, so every
  machine (and every re-run) plans the same trials; names spell out the values.
  """
  if not search or not search.trials:
    return []
  by_name = {v.name: v for v in variants}
  if search.base_variant not in by_name:
    raise ValueError(f"search.base_variant {search.base_variant!r} is not a variant")
  base = by_name[search.base_variant]
  keys = [key for key, _, _ in search.space]
  abbreviations = [abbreviation for _, abbreviation, _ in search.space]
  grid = list(itertools.product(*[values for _, _, values in search.space]))
  if search.kind == "grid":
    chosen = range(len(grid))
  elif search.kind == "random":
    rng = np.random.default_rng(search.seed)
    count = min(search.trials, len(grid))
    chosen = sorted(rng.choice(len(grid), size=count, replace=False).tolist())
  else:
    raise ValueError(f"search.kind must be random or grid, got {search.kind!r}")
  trials = []
  for index in chosen:
    point = grid[index]
    name = search.name_prefix + "_".join(
        f"{abbreviation}{format_value(value)}"
        for abbreviation, value in zip(abbreviations, point))
    description = ", ".join(f"{key}={format_value(value)}"
                            for key, value in zip(keys, point))
    trials.append(Variant(name=name, overrides=base.overrides + tuple(zip(keys, point)),
                          init_from_variant=base.init_from_variant,
                          description=f"{base.name} with {description}", group="search"))
  return trials


def study_variants(study_config) -> list[Variant]:
  """The config's variants followed by the search's trials; names must be unique."""
  variants = [variant_from_dict(spec) for spec in study_config.variants]
  variants += search_variants(study_config.get("search"), variants)
  names = [v.name for v in variants]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"variant names must be unique; repeated: {duplicates}")
  for v in variants:
    if v.init_from_variant and v.init_from_variant not in names:
      raise ValueError(f"{v.name}: init_from_variant {v.init_from_variant!r} is not a "
                       "variant of this study")
  return variants


def order_by_dependencies(variants: Sequence[Variant]) -> list[Variant]:
  """Each variant after the one it warm-starts from; otherwise the given order."""
  remaining = list(variants)
  names = {v.name for v in variants}
  done: set[str] = set()
  ordered = []
  while remaining:
    ready = next((v for v in remaining if not v.init_from_variant
                  or v.init_from_variant in done or v.init_from_variant not in names),
                 None)
    if ready is None:
      raise ValueError("init_from_variant forms a cycle among "
                       f"{[v.name for v in remaining]}")
    ordered.append(ready)
    done.add(ready.name)
    remaining.remove(ready)
  return ordered


def with_dependencies(variants: Sequence[Variant], selected: Sequence[str]
                      ) -> list[Variant]:
  """The selected variants plus everything they warm-start from, in the study's order."""
  by_name = {v.name: v for v in variants}
  unknown = [n for n in selected if n not in by_name]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; the study has {sorted(by_name)}")
  wanted: set[str] = set()
  for name in selected:
    while name and name not in wanted:
      wanted.add(name)
      name = by_name[name].init_from_variant
  return [v for v in variants if v.name in wanted]


def dependency_root(variant: Variant, by_name: dict[str, Variant]) -> str:
  while variant.init_from_variant in by_name:
    variant = by_name[variant.init_from_variant]
  return variant.name


def shard_variants(variants: Sequence[Variant], shard_index: int, shard_count: int
                   ) -> list[Variant]:
  """This shard's variants. Whole dependency chains go to one shard (the emptiest so
  far, in the study's order), so every shard runs without waiting for another."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
  by_name = {v.name: v for v in variants}
  chains: dict[str, list[Variant]] = {}
  for v in variants:
    chains.setdefault(dependency_root(v, by_name), []).append(v)
  loads = [0] * shard_count
  mine = set()
  for chain in chains.values():
    shard = loads.index(min(loads))
    loads[shard] += len(chain)
    if shard == shard_index:
      mine.update(v.name for v in chain)
  return order_by_dependencies([v for v in variants if v.name in mine])


def plan_study(study_config, names: Sequence[str] | None = None, shard_index: int = 0,
               shard_count: int = 1) -> list[Variant]:
  """What this invocation trains, in order."""
  variants = study_variants(study_config)
  if names:
    variants = with_dependencies(variants, names)
  return shard_variants(order_by_dependencies(variants), shard_index, shard_count)


# ------------------------------------------------------------------------------ configs

def variant_workdir(study_dir: str, name: str) -> str:
  return os.path.join(os.path.abspath(study_dir), name)


def apply_overrides(config, overrides: Sequence[tuple[str, Any]]):
  """A copy of config with dotted-key overrides; an unknown key is an error, not a new
  field (a typo would otherwise train the base config under a misleading name)."""
  config = copy.deepcopy(config)
  for key, value in overrides:
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      if parent not in node:
        raise KeyError(f"override {key!r}: the config has no {parent!r}")
      node = node[parent]
    if leaf not in node:
      raise KeyError(f"override {key!r}: the config has no field {leaf!r}")
    node[leaf] = value
  return config


def config_value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def variant_config(study_config, variant: Variant, study_dir: str):
  config = apply_overrides(study_config.base, variant.overrides)
  if variant.init_from_variant:
    config.init_from.path = variant_workdir(study_dir, variant.init_from_variant)
  return config


def comparable_settings(config) -> dict:
  """The config as flat JSON values, without IGNORED_SETTINGS."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = json.loads(json.dumps(value))

  walk(config, "")
  return {k: v for k, v in flat.items() if k not in IGNORED_SETTINGS}


def changed_settings(recorded: dict, current: dict) -> dict:
  """{key: (recorded, current)} over the keys both know: a field added to the code's
  config since the variant ran is not a change of that variant."""
  return {k: (recorded[k], current[k]) for k in recorded.keys() & current.keys()
          if recorded[k] != current[k]}


# ------------------------------------------------------------------------------ running

def checkpoint_steps(workdir: str) -> list[int]:
  """Finalized checkpoint steps (Orbax renames a checkpoint to its step when complete)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def training_evaluations(workdir: str) -> list[dict]:
  """The evaluations train_and_evaluate logged (not later `--mode eval` runs)."""
  return [m for m in read_metrics(workdir) if m.get("mode", "train") == "train"]


def is_finished(workdir: str, num_train_steps: int) -> bool:
  """Final step evaluated and checkpointed (a warm start needs the checkpoint)."""
  evaluated = any(m["step"] == num_train_steps for m in training_evaluations(workdir))
  return evaluated and num_train_steps in checkpoint_steps(workdir)


def read_run_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, RUN_RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_run_record(workdir: str, record: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RUN_RECORD)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous record


def wall_time_seconds(record: dict | None) -> tuple[float | None, bool]:
  """(seconds over the recorded sessions, whether every session was recorded). A session
  killed outright (SIGKILL) has no end time and adds nothing."""
  if not record or not record.get("sessions"):
    return None, False
  sessions = record["sessions"]
  seconds = sum(s["seconds"] for s in sessions if s.get("seconds") is not None)
  return seconds, all(s.get("seconds") is not None for s in sessions)


def check_unchanged(variant: Variant, record: dict | None, settings: dict) -> None:
  if record is None:
    return
  changes = changed_settings(record.get("settings", {}), settings)
  if changes:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in
                      ((k, *v) for k, v in sorted(changes.items())))
    raise ValueError(f"{variant.name}: its workdir was trained with other settings "
                     f"({shown}); delete the workdir or use another --study_dir")


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
    raise RuntimeError(f"{variant.name} warm-starts from {variant.init_from_variant}, "
                       "which has not finished; run it first")
  if train_fn is None:
    from affect_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  record = record or {"variant": variant.name, "description": variant.description,
                      "group": variant.group, "overrides": dict(variant.overrides),
                      "init_from_variant": variant.init_from_variant,
                      "settings": settings, "sessions": []}
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
  return "trained"


def dependency_finished(study_config, variant: Variant, study_dir: str) -> bool:
  dependency = {v.name: v for v in study_variants(study_config)}[variant.init_from_variant]
  config = variant_config(study_config, dependency, study_dir)
  return is_finished(variant_workdir(study_dir, dependency.name), config.num_train_steps)


def describe_machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "devices": len(devices), "cpu_count": os.cpu_count()}


def run_study(study_config, study_dir: str, names: Sequence[str] | None = None,
              shard_index: int = 0, shard_count: int = 1,
              train_fn: Callable | None = None) -> dict[str, str]:
  """Trains this shard's variants in dependency order; {name: 'skipped' | 'trained'}."""
  plan = plan_study(study_config, names, shard_index, shard_count)
  outcomes = {}
  for number, variant in enumerate(plan, 1):
    source = (f", warm start from {variant.init_from_variant}"
              if variant.init_from_variant else "")
    log.info("[%d/%d] %s: %s%s", number, len(plan), variant.name, variant.description,
             source)
    outcomes[variant.name] = run_variant(study_config, variant, study_dir, train_fn)
    log.info("[%d/%d] %s: %s", number, len(plan), variant.name, outcomes[variant.name])
  return outcomes


# ------------------------------------------------------------------------------- report

SCORE_COLUMNS = (("p_va", "P_VA"), ("ccc_valence", "CCC_v"), ("ccc_arousal", "CCC_a"),
                 ("expr_f1", "EXPR F1"), ("au_f1", "AU F1"), ("p_mtl", "P_MTL"))
TASK_SCORE = {"expression": "expr_f1", "au": "au_f1", "va": "p_va"}
ALL_TASKS = ("expression", "au", "va")
CSV_FIELDS = ("variant", "group", "selection", "step", "final_step", "finished",
              *(key for key, _ in SCORE_COLUMNS), "wall_time_s")


@dataclasses.dataclass
class VariantResult:
  variant: Variant
  config: Any
  workdir: str
  evaluations: list[dict]  # every training-time evaluation, in logged order
  evaluation: dict | None  # the one the report uses
  finished: bool
  wall_time_s: float | None
  wall_time_complete: bool

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.config.model.tasks)

  def score(self, key: str) -> float | None:
    """A logged score; P_MTL only for a model of all three tasks (for a uni-task model
    the logged p_mtl is its one task score, which is not comparable)."""
    if self.evaluation is None or key not in self.evaluation:
      return None
    if key == "p_mtl" and set(self.tasks) != set(ALL_TASKS):
      return None
    return float(self.evaluation[key])


def select_evaluation(evaluations: Sequence[dict], selection: str, best_metric: str
                      ) -> dict | None:
  """'last': the evaluation of the highest step (the latest logged, if a resumed run
  evaluated a step twice). 'best': the highest best_metric, the earliest on ties."""
  if not evaluations:
    return None
  if selection == "last":
    top = max(m["step"] for m in evaluations)
    return [m for m in evaluations if m["step"] == top][-1]
  if selection == "best":
    scored = [m for m in evaluations if best_metric in m]
    if not scored:
      return None
    return max(scored, key=lambda m: (m[best_metric], -m["step"]))
  raise ValueError(f"report.selection must be last or best, got {selection!r}")


def collect_results(study_config, study_dir: str) -> list[VariantResult]:
  """Every variant of the study that has a workdir, in the study's order."""
  selection = study_config.report.selection
  results = []
  for variant in order_by_dependencies(study_variants(study_config)):
    workdir = variant_workdir(study_dir, variant.name)
    if not os.path.isdir(workdir):
      continue
    config = variant_config(study_config, variant, study_dir)
    evaluations = training_evaluations(workdir)
    seconds, complete = wall_time_seconds(read_run_record(workdir))
    results.append(VariantResult(
        variant=variant, config=config, workdir=workdir, evaluations=evaluations,
        evaluation=select_evaluation(evaluations, selection,
                                     config.checkpoint.best_metric),
        finished=is_finished(workdir, config.num_train_steps),
        wall_time_s=seconds, wall_time_complete=complete))
  return results


def best_per_column(results: Sequence[VariantResult]) -> dict[str, set[str]]:
  """{score key: names of the variants with its highest value}."""
  best = {}
  for key, _ in SCORE_COLUMNS:
    values = {r.variant.name: r.score(key) for r in results if r.score(key) is not None}
    if values:
      top = max(values.values())
      best[key] = {name for name, value in values.items() if value == top}
  return best


def format_wall_time(result: VariantResult) -> str:
  if result.wall_time_s is None:
    return "n/a"
  if not result.wall_time_complete and not result.wall_time_s:
    return "running or killed"
  minutes, seconds = divmod(round(result.wall_time_s), 60)
  return f"{'≥' if not result.wall_time_complete else ''}{minutes}:{seconds:02d}"


def format_steps(result: VariantResult) -> str:
  step = result.evaluation["step"] if result.evaluation else 0
  return str(step) if result.finished else f"{step} (of {result.config.num_train_steps})"


def results_table(results: Sequence[VariantResult]) -> list[str]:
  best = best_per_column(results)
  header = ["variant", *(label for _, label in SCORE_COLUMNS), "steps", "wall time"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for result in results:
    cells = [f"`{result.variant.name}`"]
    for key, _ in SCORE_COLUMNS:
      value = result.score(key)
      text = "" if value is None else f"{value:.4f}"
      cells.append(f"**{text}**" if result.variant.name in best.get(key, ()) else text)
    cells += [format_steps(result), format_wall_time(result)]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("| best | " + " | ".join(
      ", ".join(f"`{n}`" for n in sorted(best.get(key, ()))) for key, _ in SCORE_COLUMNS)
      + " | | |")
  return lines


def csv_rows(results: Sequence[VariantResult], selection: str) -> list[dict]:
  rows = []
  for result in results:
    row = {"variant": result.variant.name, "group": result.variant.group,
           "selection": selection,
           "step": result.evaluation["step"] if result.evaluation else "",
           "final_step": result.config.num_train_steps, "finished": result.finished,
           "wall_time_s": "" if result.wall_time_s is None else result.wall_time_s}
    for key, _ in SCORE_COLUMNS:
      value = result.score(key)
      row[key] = "" if value is None else repr(value)  # repr: the logged float exactly
    rows.append(row)
  return rows


def uni_task_deltas(results: Sequence[VariantResult], baselines: dict[str, str]
                    ) -> list[str]:
  """Each multi-task variant's score on each task minus its uni-task baseline's, and
  P_MTL against the three uni-task models taken together."""
  by_name = {r.variant.name: r for r in results}
  uni = {task: by_name.get(name) for task, name in baselines.items()}
  if not any(uni.values()) or all(len(r.tasks) < 2 for r in results):
    return []
  header = [*(f"{TASK_SCORE[t]} − `{baselines[t]}`" for t in ALL_TASKS),
            "P_MTL − uni-task sum"]
  lines = ["| variant | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
  uni_sum = None
  if all(uni.get(t) and uni[t].score(TASK_SCORE[t]) is not None for t in ALL_TASKS):
    uni_sum = sum(uni[t].score(TASK_SCORE[t]) for t in ALL_TASKS)
  for result in results:
    if len(result.tasks) < 2:
      continue
    cells = []
    for task in ALL_TASKS:
      mine = result.score(TASK_SCORE[task])
      theirs = uni[task].score(TASK_SCORE[task]) if uni.get(task) else None
      cells.append("" if mine is None or theirs is None else f"{mine - theirs:+.4f}")
    p_mtl = result.score("p_mtl")
    cells.append("" if p_mtl is None or uni_sum is None else f"{p_mtl - uni_sum:+.4f}")
    lines.append(f"| `{result.variant.name}` | " + " | ".join(cells) + " |")
  if uni_sum is not None:
    lines += ["", f"The three uni-task models together ("
              + " + ".join(f"`{baselines[t]}`" for t in ALL_TASKS)
              + f") score {uni_sum:.4f} on the P_MTL scale, with three networks."]
  return lines


def seed_differences(results: Sequence[VariantResult], pair: Sequence[str]
                     ) -> list[str]:
  """How far two runs differing only in their seed are apart, score by score."""
  by_name = {r.variant.name: r for r in results}
  if len(pair) != 2 or not all(name in by_name for name in pair):
    return []
  first, second = (by_name[name] for name in pair)
  differences = [f"{label} {abs(first.score(key) - second.score(key)):.4f}"
                 for key, label in SCORE_COLUMNS
                 if first.score(key) is not None and second.score(key) is not None]
  return [f"Seed-to-seed differences (`{pair[0]}` vs `{pair[1]}`, the same settings): "
          + ", ".join(differences) + ". Differences between variants of this size are "
          "within the noise of a single run."]


def search_ranking(results: Sequence[VariantResult], search) -> list[str]:
  if not search or not search.trials:
    return []
  ranked = [r for r in results
            if r.variant.group == "search" or r.variant.name == search.base_variant]
  unscored = float("-inf")
  ranked = sorted(ranked, key=lambda r: -(unscored if r.score(search.metric) is None
                                          else r.score(search.metric)))
  lines = [f"| rank | variant | settings | {search.metric} |", "|---|---|---|---|"]
  for rank, result in enumerate(ranked, 1):
    values = ", ".join(f"{key}={format_value(config_value(result.config, key))}"
                       for key, _, _ in search.space)
    value = result.score(search.metric)
    lines.append(f"| {rank} | `{result.variant.name}` | {values} | "
                 f"{'' if value is None else f'{value:.4f}'} |")
  return lines


def variants_table(results: Sequence[VariantResult]) -> list[str]:
  lines = ["| variant | group | what changes | overrides of `base` |", "|---|---|---|---|"]
  for result in results:
    v = result.variant
    overrides = ", ".join(f"`{k}={format_value(val)}`" for k, val in v.overrides)
    if v.init_from_variant:
      overrides += (", " if overrides else "") + f"init from `{v.init_from_variant}`"
    lines.append(f"| `{v.name}` | {v.group} | {v.description} | {overrides} |")
  return lines


def setup_lines(study_config, results: Sequence[VariantResult]) -> list[str]:
  base = study_config.base
  machines = set()
  for result in results:
    record = read_run_record(result.workdir)
    for session in (record or {}).get("sessions", []):
      machine = session.get("machine")
      if machine:
        machines.add(f"{machine['devices']} x {machine['device_kind']} "
                     f"({machine['platform']}, {machine['cpu_count']} CPU cores)")
  return [
      f"- dataset: `{base.dataset.name}`, trained on `{base.dataset.train_split}`, "
      f"scored on `{base.dataset.eval_split}`",
      f"- model: ResNet stages {tuple(base.model.stage_sizes)}, "
      f"{base.model.num_filters} filters, {base.input.image_size}x"
      f"{base.input.image_size} input",
      f"- training: {base.num_train_steps} steps of {base.input.batch_size} images, "
      f"{base.optimizer.name} at {format_value(base.optimizer.learning_rate)} "
      f"({base.optimizer.schedule}, {base.optimizer.warmup_steps} warm-up steps), "
      f"augmentation `{base.input.augment}`, seed {base.seed}",
      f"- scores: {selection_text(study_config.report.selection)}",
      "- wall time: measured by the runner around each training session (compilation, "
      "training and evaluations), summed over sessions; ≥ marks a session killed "
      "before it could record its end",
      f"- machine: {'; '.join(sorted(machines)) or 'not recorded'}",
  ]


def selection_text(selection: str) -> str:
  if selection == "last":
    return "each variant's last evaluation (its final step once finished)"
  return ("each variant's best evaluation by its own `checkpoint.best_metric`, chosen on "
          "the validation split itself (optimistic)")


def read_training_losses(workdir: str, tag: str = "train/loss") -> list[tuple[int, float]]:
  """(step, value) of a training scalar from the run's TensorBoard event files (the
  trainer logs training losses there, evaluations to metrics.jsonl). A step logged
  again by a resumed session keeps its latest value."""
  import glob  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    position = 0
    # TFRecord framing: u64 length, u32 length CRC, payload, u32 payload CRC.
    while position + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[position:position + 8])
      payload = data[position + 12:position + 12 + length]
      position += 12 + length + 4
      if len(payload) < length:
        break  # a record cut short by a killed writer
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.tag == tag:
          values[(event.wall_time, event.step)] = value.simple_value
  latest = {}
  for (_, step), value in sorted(values.items()):
    latest[step] = value
  return sorted(latest.items())


def plot_scores(results: Sequence[VariantResult], path: str) -> None:
  """One horizontal bar chart per score; the best bar in each is drawn darker."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  best = best_per_column(results)
  fig, axes = plt.subplots(2, 3, figsize=(15, 0.32 * len(results) * 2 + 3))
  for ax, (key, label) in zip(axes.flat, SCORE_COLUMNS):
    shown = [r for r in results if r.score(key) is not None]
    names = [r.variant.name for r in shown]
    values = [r.score(key) for r in shown]
    colours = ["tab:red" if n in best.get(key, ()) else "tab:blue" for n in names]
    ax.barh(range(len(shown)), values, color=colours)
    ax.set_yticks(range(len(shown)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(label)
    for y, value in enumerate(values):
      ax.text(value, y, f" {value:.3f}", va="center", fontsize=7)
    ax.margins(x=0.2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(results: Sequence[VariantResult], path: str) -> None:
  """Training loss and validation scores against steps, every variant overlaid."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [("train/loss", "training loss (scales differ between losses)")]
  panels += [(key, f"validation {label}") for key, label in SCORE_COLUMNS
             if key not in ("ccc_valence", "ccc_arousal")]
  fig, grid = plt.subplots(2, 3, figsize=(16, 9))
  axes = grid.flat[:len(panels)]
  colours = plt.get_cmap("tab20")
  for index, result in enumerate(results):
    style = {"color": colours(index % 20), "label": result.variant.name,
             "ls": "--" if len(result.tasks) == 1 else "-"}
    losses = read_training_losses(result.workdir)
    if losses:
      axes[0].plot(*zip(*losses), lw=1, **style)
    for ax, (key, _) in zip(axes[1:], panels[1:]):
      points = [(m["step"], m[key]) for m in result.evaluations if key in m]
      if key == "p_mtl" and set(result.tasks) != set(ALL_TASKS):
        points = []
      if points:
        ax.plot(*zip(*points), marker="o", ms=3, **style)
  for ax, (_, title) in zip(axes, panels):
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  legend_panel = grid.flat[len(panels)]  # the sixth panel holds the legend
  legend_panel.axis("off")
  handles, labels = axes[0].get_legend_handles_labels()
  legend_panel.legend(handles, labels, loc="center", fontsize=9,
                      title="uni-task dashed, multi-task solid")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_commands(study_dir: str) -> list[str]:
  path = os.path.join(study_dir, COMMANDS_LOG)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def write_study_report(study_config, study_dir: str, report_dir: str | None = None,
                       title: str = "Study") -> dict[str, str]:
  """report.md, results.csv, scores.png and curves.png in report_dir (default
  <study_dir>/report); returns their paths."""
  import csv  # pylint: disable=g-import-not-at-top
  report_dir = report_dir or os.path.join(study_dir, "report")
  os.makedirs(report_dir, exist_ok=True)
  results = collect_results(study_config, study_dir)
  selection = study_config.report.selection
  paths = {name: os.path.join(report_dir, name)
           for name in ("report.md", "results.csv", "scores.png", "curves.png")}
  with open(paths["results.csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(csv_rows(results, selection))
  lines = [f"# {title}", "", *setup_lines(study_config, results), "",
           "## Scores", "",
           "Validation scores; the best of each column in bold. P_MTL = P_VA + EXPR F1 "
           "+ AU F1, shown for the three-task models only. Every number is in "
           "[results.csv](results.csv), copied from the variants' `metrics.jsonl`.", "",
           *results_table(results), ""]
  lines += seed_differences(results, study_config.report.get("seed_pair", ()))
  lines += [""]
  deltas = uni_task_deltas(results, dict(study_config.report.uni_task_baselines))
  if deltas:
    lines += ["## Multi-task minus uni-task", "",
              "Each multi-task variant's score on a task minus that of the uni-task "
              "model of the task (same steps, same data).", "", *deltas, ""]
  ranking = search_ranking(results, study_config.get("search"))
  if ranking:
    search = study_config.search
    lines += ["## Hyper-parameter search", "",
              f"{search.kind} search, {search.trials} trials (seed {search.seed}) over "
              + ", ".join(f"`{k}` ∈ {{{', '.join(format_value(v) for v in values)}}}"
                          for k, _, values in search.space)
              + f", each on top of `{search.base_variant}` (ranked with it by "
              f"{search.metric}).", "", *ranking, ""]
  plot_scores(results, paths["scores.png"])
  plot_curves(results, paths["curves.png"])
  lines += ["## Plots", "", "![scores per variant](scores.png)", "",
            "![training loss and validation curves](curves.png)", "",
            "## Variants", "", *variants_table(results), ""]
  commands = read_commands(study_dir)
  if commands:
    lines += ["## Commands", "", "Invocations of the runner on this study directory, "
              "in order:", "", "```", *commands, "```", ""]
  with open(paths["report.md"], "w") as f:
    f.write("\n".join(lines))
  return paths


# ---------------------------------------------------------------------- command line

def record_command(study_dir: str, argv: Sequence[str]) -> None:
  os.makedirs(study_dir, exist_ok=True)
  with open(os.path.join(study_dir, COMMANDS_LOG), "a") as f:
    f.write("python -m affect_jax.study " + " ".join(argv[1:]) + "\n")


def enable_compilation_cache(study_dir: str) -> None:
  """Variants share programs (every eval step of a three-task model, most train steps):
  a persistent cache turns their repeated compilations into loads."""
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.path.abspath(study_dir), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from affect_jax import cli_logging  # pylint: disable=g-import-not-at-top
  del argv
  logging.getLogger().setLevel(logging.INFO)
  cli_logging.quiet_library_logs()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  study_config = FLAGS.config
  study_dir = os.path.abspath(FLAGS.study_dir)
  names = [n for n in (FLAGS.variants or "").split(",") if n]
  if FLAGS.list:
    for variant in plan_study(study_config, names, FLAGS.shard_index, FLAGS.shard_count):
      print(f"{variant.name:32s} {variant.group:15s} {variant.description}")
    return 0
  if not FLAGS.report_only:
    record_command(study_dir, sys.argv)
    enable_compilation_cache(study_dir)
    run_study(study_config, study_dir, names, FLAGS.shard_index, FLAGS.shard_count)
  paths = write_study_report(study_config, study_dir, FLAGS.report_dir,
                             title=FLAGS.title)
  log.info("report: %s", paths["report.md"])
  return 0


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("study_dir", None, "Folder of the variants' workdirs.")
  flags.DEFINE_string("variants", "", "Comma-separated variants to run (with the ones "
                      "they warm-start from); default: all.")
  flags.DEFINE_integer("shard_index", 0, "This machine's shard, in [0, shard_count).")
  flags.DEFINE_integer("shard_count", 1, "Machines sharing the study.")
  flags.DEFINE_bool("report_only", False, "Write the report from the workdirs; train "
                    "nothing.")
  flags.DEFINE_bool("list", False, "Print what this shard would run, in order; train "
                    "nothing.")
  flags.DEFINE_string("report_dir", None, "Where the report goes (default: "
                      "<study_dir>/report).")
  flags.DEFINE_string("title", "Study: uni-task vs multi-task affect models",
                      "The report's title.")
  config_flags.DEFINE_config_file("config", None, "Study configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "study_dir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
