"""A study's variants and what their workdirs hold: the variants of a study config
(its list and its search's trials), their runs (one per seed of `config.seeds`), the
order and shards the runs train in, each one's config and workdir, and the records a
report or a rerun reads back (checkpoints, training evaluations and losses, the
runner's run record and command log)."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
from typing import Any, Sequence

import numpy as np

from affect_jax.errors import InputError
from affect_jax.eval.writers import drop_superseded, read_metrics, read_scalars


class UnknownOverrideError(InputError, KeyError):
  """A variant's override names a config field that does not exist."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0])

RUN_RECORD = "study_run.json"  # in each variant's workdir
COMMANDS_LOG = "study_commands.txt"  # in the study directory
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
  # A run of one seed of a variant (`study_runs`): `family` is the variant's name, and
  # `name` its workdir below the study directory, `<family>/seed<k>`.
  seed: int | None = None
  family: str = ""

  @property
  def variant_name(self) -> str:
    return self.family or self.name


def variant_from_dict(spec: dict) -> Variant:
  return Variant(name=spec["name"], overrides=tuple(spec.get("overrides", {}).items()),
                 init_from_variant=spec.get("init_from_variant", ""),
                 description=spec.get("description", ""), group=spec.get("group", ""))


def format_value(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def is_optuna_search(search) -> bool:
  """An optuna search with trials to run: its trials are drawn one by one as the search
  runs (optuna_search), not planned ahead as grid and random trials are."""
  return bool(search) and search.get("kind") == "optuna" and bool(search.trials)


def search_variants(search, variants: Sequence[Variant]) -> list[Variant]:
  """Trials of the hyper-parameter search, each a variant on top of search.base_variant.

  Random search draws distinct points of the grid with a seeded generator, so every
  machine (and every re-run) plans the same trials; names spell out the values.
  """
  if not search or not search.trials or is_optuna_search(search):
    return []  # optuna draws its trials as the search runs
  by_name = {v.name: v for v in variants}
  if search.base_variant not in by_name:
    raise InputError(f"search.base_variant {search.base_variant!r} is not a variant")
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
    raise InputError(f"search.kind must be random or grid, got {search.kind!r}")
  trials = []
  for index in chosen:
    point = grid[index]
    name = search.name_prefix + "_".join(
        f"{abbreviation}{format_value(value)}"
        for abbreviation, value in zip(abbreviations, point))
    description = settings_text(zip(keys, point))
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
    raise InputError(f"variant names must be unique; repeated: {duplicates}")
  for v in variants:
    if v.init_from_variant and v.init_from_variant not in names:
      raise InputError(f"{v.name}: init_from_variant {v.init_from_variant!r} is not a "
                       "variant of this study")
  return variants


def study_seeds(study_config) -> tuple[int, ...]:
  """The seeds every variant runs with; () for one run per variant at the base seed,
  in `<study_dir>/<name>` (a study config without `seeds`)."""
  seeds = tuple(int(seed) for seed in (study_config.get("seeds") or ()))
  if len(set(seeds)) != len(seeds):
    raise InputError(f"seeds must be distinct, got {seeds}")
  return seeds


def seed_run_name(name: str, seed: int) -> str:
  return f"{name}/seed{seed}"


def seed_runs(variants: Sequence[Variant], seeds: Sequence[int]) -> list[Variant]:
  """Each variant once per seed, seed by seed (every variant at the first seed, then at
  the next: a study stopped early, or given more seeds later, has whole seeds): `seed`
  set to the run's seed, and a warm start from the run of the same seed of its
  source."""
  if not seeds:
    return list(variants)
  for v in variants:
    if any(key == "seed" for key, _ in v.overrides):
      raise InputError(f"{v.name}: overrides seed, which config.seeds sets for every "
                       "run; drop the override (or set config.seeds = ())")
  return [dataclasses.replace(
              v, name=seed_run_name(v.name, seed), seed=seed, family=v.name,
              overrides=v.overrides + (("seed", seed),),
              init_from_variant=(seed_run_name(v.init_from_variant, seed)
                                 if v.init_from_variant else ""))
          for seed in seeds for v in variants]


def study_runs(study_config) -> list[Variant]:
  """What the runner trains: every variant (and search trial) once per seed."""
  return seed_runs(study_variants(study_config), study_seeds(study_config))


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
      raise InputError("init_from_variant forms a cycle among "
                       f"{[v.name for v in remaining]}")
    ordered.append(ready)
    done.add(ready.name)
    remaining.remove(ready)
  return ordered


def with_dependencies(variants: Sequence[Variant], selected: Sequence[str]
                      ) -> list[Variant]:
  """The selected variants plus everything they warm-start from, in the study's order.
  A variant's name selects all its seed runs; `name/seed<k>` one of them."""
  by_name = {v.name: v for v in variants}
  families: dict[str, list[str]] = {}
  for v in variants:
    if v.family:
      families.setdefault(v.family, []).append(v.name)
  unknown = [n for n in selected if n not in by_name and n not in families]
  if unknown:
    names = sorted({v.variant_name for v in variants})
    runs = " (or one run of one: <variant>/seed<k>)" if families else ""
    raise InputError(f"unknown variants {unknown}; the study has {names}{runs}")
  wanted: set[str] = set()
  for name in [run for n in selected for run in families.get(n, [n])]:
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
  far), so every shard runs without waiting for another. Chains are dealt variant by
  variant, so that a variant's seeds spread over the shards (dealt seed by seed, every
  seed's runs would split the same way, and each variant would be one machine's); each
  shard then runs its share seed by seed."""
  if not 0 <= shard_index < shard_count:
    raise InputError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
  by_name = {v.name: v for v in variants}
  chains: dict[str, list[Variant]] = {}
  for v in variants:
    chains.setdefault(dependency_root(v, by_name), []).append(v)
  family_order: dict[str, int] = {}
  for v in variants:
    family_order.setdefault(v.variant_name, len(family_order))
  loads = [0] * shard_count
  mine = set()
  for chain in sorted(chains.values(),
                      key=lambda chain: family_order[chain[0].variant_name]):
    shard = loads.index(min(loads))
    loads[shard] += len(chain)
    if shard == shard_index:
      mine.update(v.name for v in chain)
  return order_by_dependencies([v for v in variants if v.name in mine])


def plan_study(study_config, names: Sequence[str] | None = None, shard_index: int = 0,
               shard_count: int = 1) -> list[Variant]:
  """What this invocation trains, in order: runs of variants (one per seed)."""
  variants = study_runs(study_config)
  if names:
    variants = with_dependencies(variants, names)
  return shard_variants(order_by_dependencies(variants), shard_index, shard_count)


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
        raise UnknownOverrideError(f"override {key!r}: the config has no {parent!r}")
      node = node[parent]
    if leaf not in node:
      raise UnknownOverrideError(f"override {key!r}: the config has no field {leaf!r}")
    node[leaf] = value
  return config


def config_value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def settings_text(settings) -> str:
  """(key, value) pairs as 'key=value, ...'."""
  return ", ".join(f"{key}={format_value(value)}" for key, value in settings)


def searched_settings_text(config, search) -> str:
  """The values a run's config takes at the keys of search.space: 'key=value, ...'."""
  return settings_text((key, config_value(config, key)) for key, _, _ in search.space)


def variant_config(study_config, variant: Variant, study_dir: str):
  config = apply_overrides(study_config.base, variant.overrides)
  if variant.init_from_variant:
    config.init_from.path = variant_workdir(study_dir, variant.init_from_variant)
  return config


TEMPORAL_SUFFIX = "_temporal"


def temporal_runs(study_config, frame_runs: Sequence[Variant]) -> list[Variant]:
  """The temporal heads over the frame runs of the variants in
  config.temporal.variants: `<variant>_temporal[/seed<k>]`, one per frame run."""
  chosen = set(study_config.get("temporal", {}).get("variants", ()))
  runs = []
  for frame_run in frame_runs:
    if frame_run.variant_name not in chosen:
      continue
    family = frame_run.variant_name + TEMPORAL_SUFFIX
    runs.append(Variant(
        name=(seed_run_name(family, frame_run.seed) if frame_run.family else family),
        description=f"temporal head over {frame_run.name}'s frame embeddings",
        group="temporal", seed=frame_run.seed, family=family if frame_run.family else ""))
  return runs


def temporal_config(study_config, frame_run: Variant, study_dir: str):
  """config.temporal.base over the frame run's final checkpoint (the step the report
  scores the frame model at), with the frame run's seed, data and splits."""
  frame_config = variant_config(study_config, frame_run, study_dir)
  config = copy.deepcopy(study_config.temporal.base)
  config.seed = frame_config.seed
  config.frame_run.workdir = variant_workdir(study_dir, frame_run.name)
  config.frame_run.step = frame_config.num_train_steps
  config.frame_run.data_dir = frame_config.dataset.data_dir
  config.frame_run.train_split = frame_config.dataset.train_split
  config.frame_run.eval_split = frame_config.dataset.eval_split
  config.model.num_expr_classes = frame_config.model.num_expr_classes
  config.model.tasks = tuple(frame_config.model.tasks)
  # A uni-task frame run keeps its best checkpoint by its task's score; so does its head.
  config.checkpoint.best_metric = frame_config.checkpoint.best_metric
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


def checkpoint_steps(workdir: str) -> list[int]:
  """Finalized checkpoint steps (Orbax renames a checkpoint to its step when complete)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def training_evaluations(workdir: str) -> list[dict]:
  """The evaluations train_and_evaluate logged (not later `--mode eval` runs), one per
  step and split: a session resumed from an earlier checkpoint replaces the killed
  session's evaluations from its first evaluated step on."""
  logged = [m for m in read_metrics(workdir) if m.get("mode", "train") == "train"]
  splits = dict.fromkeys(m["split"] for m in logged)
  kept = [evaluation for split in splits for evaluation in drop_superseded(
      (m for m in logged if m["split"] == split), step=lambda m: m["step"])]
  return sorted(kept, key=lambda m: m["step"])


def training_losses(workdir: str, tag: str = "train/loss") -> list[tuple[int, float]]:
  """(step, value) of a training scalar the loop logged, in step order, one per step."""
  return read_scalars(workdir).get(tag, [])


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


def read_commands(study_dir: str) -> list[str]:
  path = os.path.join(study_dir, COMMANDS_LOG)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def record_command(study_dir: str, argv: Sequence[str]) -> None:
  os.makedirs(study_dir, exist_ok=True)
  with open(os.path.join(study_dir, COMMANDS_LOG), "a") as f:
    f.write("python -m affect_jax.study.runner " + " ".join(argv[1:]) + "\n")
