"""A study's hyper-parameter search with optuna (`search.kind = "optuna"`): trials drawn
by a seeded TPE sampler one after another, each an ordinary variant trained in its own
workdir `<study_dir>/<name_prefix>trial<k>`, its evaluations reported to a median
pruner as the run logs them, and a trial the pruner judges bad stopped after that
evaluation's checkpoint. The optuna study lives in `<study_dir>/optuna.db` (SQLite), so an
interrupted search resumes: finished trials are kept, a trial killed mid-run resumes
from its checkpoint with its parameters, and new trials are drawn until `search.trials`
have ended (complete, pruned or failed).

`run_search` is what the study runner calls; `trial_variants`, `trial_outcomes` and
`report_section` are what the report reads back."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from affect_jax.errors import InputError
from affect_jax.study.variants import (
  Variant,
  format_value,
  is_optuna_search,
  read_run_record,
  searched_settings_text,
  seed_run_name,
  settings_text,
  study_seeds,
  training_evaluations,
  variant_config,
  variant_from_dict,
  variant_workdir,
  write_run_record,
)

try:
  import optuna
except ImportError as missing:  # an optional extra; only an optuna search needs it
  raise InputError("search.kind 'optuna' needs optuna: pip install "
                   "'affect-jax[study]'") from missing

log = logging.getLogger(__name__)
STORAGE_FILE = "optuna.db"  # in the study directory
STUDY_NAME = "search"
SETTINGS_ATTR = "search_settings"  # the study's user attribute: what it searches
FAILURE_ATTR = "failure"
CATEGORICAL_TYPES = (type(None), bool, int, float, str)
TrialState = optuna.trial.TrialState
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ------------------------------------------------------------------ the search space

def is_range(values) -> bool:
  return isinstance(values, dict)


def distribution(key: str, values) -> optuna.distributions.BaseDistribution:
  """A space entry's values: a list of choices, or a range {"low", "high", "log"}
  (integer bounds: integers; otherwise floats; log: sampled log-uniformly)."""
  where = f"search.space {key!r}"
  if is_range(values):
    unknown = set(values) - {"low", "high", "log"}
    if unknown or not {"low", "high"} <= set(values):
      raise InputError(f"{where}: a range is {{'low': .., 'high': .., 'log': bool}}, "
                       f"got {values}")
    low, high, log_scale = values["low"], values["high"], bool(values.get("log"))
    if not low < high or (log_scale and low <= 0):
      raise InputError(f"{where}: needs low < high (and low > 0 with log), got {values}")
    if isinstance(low, int) and isinstance(high, int):
      return optuna.distributions.IntDistribution(low, high, log=log_scale)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log_scale)
  choices = tuple(values)
  if not choices:
    raise InputError(f"{where}: no values to choose from")
  odd = [c for c in choices if not isinstance(c, CATEGORICAL_TYPES)]
  if odd:
    raise InputError(f"{where}: optuna chooses among None, bool, int, float and str "
                     f"values; got {odd}")
  return optuna.distributions.CategoricalDistribution(choices)


def search_distributions(search) -> dict[str, optuna.distributions.BaseDistribution]:
  return {key: distribution(key, values) for key, _, values in search.space}


def describe_values(values) -> str:
  if is_range(values):
    scale = "log-uniform" if values.get("log") else "uniform"
    return f"{scale} in [{format_value(values['low'])}, {format_value(values['high'])}]"
  return "∈ {" + ", ".join(format_value(v) for v in values) + "}"


def search_settings(search) -> dict:
  """What makes two invocations the same search (not the number of trials: raising it
  extends a finished search)."""
  return {"base_variant": search.base_variant, "metric": search.metric,
          "name_prefix": search.name_prefix, "seed": int(search.seed),
          "space": [[key, abbreviation, dict(values) if is_range(values) else list(values)]
                    for key, abbreviation, values in search.space],
          "startup_trials": startup_trials(search), "pruner": pruner_settings(search)}


def startup_trials(search) -> int:
  """Trials drawn at random before TPE models the results (optuna's default: 10)."""
  return int(search.get("startup_trials", 10))


def pruner_settings(search) -> dict:
  kind = search.get("pruner", "median")
  if kind not in ("median", "none"):
    raise InputError(f"search.pruner must be median or none, got {kind!r}")
  return {"kind": kind, "startup_trials": int(search.get("pruner_startup_trials", 5)),
          "warmup_steps": int(search.get("pruner_warmup_steps", 0))}


def make_pruner(search) -> optuna.pruners.BasePruner:
  """The median rule: a trial stops at an evaluation whose score is below the median of
  the earlier trials' scores at that step, once `startup_trials` trials have ended and
  from step `warmup_steps` on."""
  settings = pruner_settings(search)
  if settings["kind"] == "none":
    return optuna.pruners.NopPruner()
  return optuna.pruners.MedianPruner(n_startup_trials=settings["startup_trials"],
                                     n_warmup_steps=settings["warmup_steps"])


def trial_sampler(search, number: int) -> optuna.samplers.TPESampler:
  """The sampler of trial `number`, seeded by the search's seed and the number: a
  trial's parameters depend on the seed and the trials before it only, so a resumed
  search draws what an uninterrupted one would have."""
  seed = int(np.random.SeedSequence([int(search.seed), number]).generate_state(1)[0])
  return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(search))


# ------------------------------------------------------------------ the optuna study

def storage_path(study_dir: str) -> str:
  return os.path.join(os.path.abspath(study_dir), STORAGE_FILE)


def storage(study_dir: str) -> optuna.storages.RDBStorage:
  return optuna.storages.RDBStorage(f"sqlite:///{storage_path(study_dir)}")


def open_study(search, study_dir: str) -> optuna.Study:
  """The search's optuna study, created on first use; one recorded with other search
  settings is refused (its trials answer another question)."""
  os.makedirs(study_dir, exist_ok=True)
  study = optuna.create_study(storage=storage(study_dir), study_name=STUDY_NAME,
                              direction="maximize", pruner=make_pruner(search),
                              load_if_exists=True)
  settings = search_settings(search)
  recorded = study.user_attrs.get(SETTINGS_ATTR)
  if recorded is None:
    study.set_user_attr(SETTINGS_ATTR, settings)
  elif recorded != settings:
    changed = "; ".join(f"{key}: {recorded.get(key)!r} -> {settings.get(key)!r}"
                        for key in sorted(settings.keys() | recorded.keys())
                        if recorded.get(key) != settings.get(key))
    raise InputError(f"{storage_path(study_dir)} holds a search with other settings "
                     f"({changed}); delete it and the trials' workdirs, or use another "
                     "--study_dir")
  return study


def loaded_study(study_dir: str) -> optuna.Study | None:
  """The study as recorded, for reading; None before the search has started."""
  if not os.path.exists(storage_path(study_dir)):
    return None
  try:
    return optuna.load_study(study_name=STUDY_NAME, storage=storage(study_dir))
  except KeyError:  # the file exists, the study was never created in it
    return None


# ------------------------------------------------------------------ trials as variants

def trial_name(search, number: int) -> str:
  return f"{search.name_prefix}trial{number}"


def base_variant(study_config) -> Variant:
  for spec in study_config.variants:
    if spec["name"] == study_config.search.base_variant:
      return variant_from_dict(spec)
  raise InputError(f"search.base_variant {study_config.search.base_variant!r} is not "
                   "a variant")


def trial_variant(study_config, number: int, params: dict[str, Any],
                  outcome: str = "") -> Variant:
  """Trial `number` as a variant: the base variant's overrides plus the trial's values,
  at the study's first seed (and warm-started from that seed's run of the base's
  source) when config.seeds lists any; `outcome` (pruned, failed) joins the
  description the report shows."""
  search = study_config.search
  base = base_variant(study_config)
  point = tuple((key, params[key]) for key, _, _ in search.space)
  seeds = study_seeds(study_config)
  source = base.init_from_variant
  if seeds:
    point += (("seed", seeds[0]),)
    source = seed_run_name(source, seeds[0]) if source else ""
  described = settings_text((key, value) for key, value in point if key != "seed")
  description = f"{base.name} with {described} (optuna trial {number})"
  if outcome and outcome != "complete":
    description += f", {outcome}"
  return Variant(name=trial_name(search, number), overrides=base.overrides + point,
                 init_from_variant=source, description=description,
                 group="search")


def describe_outcome(trial: optuna.trial.FrozenTrial) -> str:
  """'complete', 'pruned at step k', 'failed: why' or 'running or interrupted'."""
  if trial.state == TrialState.COMPLETE:
    return "complete"
  if trial.state == TrialState.PRUNED:
    steps = sorted(trial.intermediate_values)
    return f"pruned at step {steps[-1]}" if steps else "pruned"
  if trial.state == TrialState.FAIL:
    return "failed: " + trial.user_attrs.get(FAILURE_ATTR, "no value")
  return "running or interrupted"


def trial_outcomes(study_config, study_dir: str) -> dict[str, str]:
  """{trial variant's name: describe_outcome}, in trial order; {} before the search."""
  study = loaded_study(study_dir)
  if study is None or not is_optuna_search(study_config.get("search")):
    return {}
  return {trial_name(study_config.search, t.number): describe_outcome(t)
          for t in study.get_trials(deepcopy=False)}


def trial_variants(study_config, study_dir: str) -> list[Variant]:
  """The trials drawn so far, as variants (what the report lists beside the config's
  variants); [] before the search."""
  study = loaded_study(study_dir)
  if study is None or not is_optuna_search(study_config.get("search")):
    return []
  return [trial_variant(study_config, t.number, t.params, describe_outcome(t))
          for t in study.get_trials(deepcopy=False)]


# ------------------------------------------------------------------ running trials

def frozen_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
  """Trial `number` as stored now (numbers count a study's trials from 0)."""
  return study.get_trials(deepcopy=False)[number]


def final_score(workdir: str, metric: str, num_train_steps: int) -> float | None:
  """The trial's objective: the metric at its final step's evaluation."""
  for evaluation in training_evaluations(workdir):
    if evaluation["step"] == num_train_steps and metric in evaluation:
      return float(evaluation[metric])
  return None


def reporting_train_fn(trial: optuna.trial.Trial, metric: str, train_fn: Callable,
                       pruned_at: list[int]) -> Callable:
  """train_fn(config, workdir) with every evaluation reported to the trial, and the run
  stopped (after that step's checkpoint) when the pruner says so; the final step's
  evaluation is never pruned (the run is complete)."""
  reported = set(frozen_trial(trial.study, trial.number).intermediate_values)

  def train(config, workdir):
    def on_evaluation(step: int, scores: dict) -> bool:
      if metric not in scores:
        logged = sorted(k for k, v in scores.items() if isinstance(v, float))
        raise InputError(f"search.metric {metric!r} is not among the scores a run "
                         f"logs: {logged}")
      # A run resumed from an earlier checkpoint evaluates again steps its killed
      # session reported (with the same scores: resumed runs equal uninterrupted ones).
      if step not in reported:
        trial.report(float(scores[metric]), step)
        reported.add(step)
      if step < config.num_train_steps and trial.should_prune():
        pruned_at.append(step)
        return True
      return False

    return train_fn(config, workdir, on_evaluation=on_evaluation)

  return train


def note_outcome(workdir: str, outcome: str) -> None:
  """The trial's outcome in its run record, on its last session (which the runner
  records as finished: the run ended without an error)."""
  record = read_run_record(workdir)
  if record and record.get("sessions"):
    record["sessions"][-1]["outcome"] = outcome
    record["search_outcome"] = outcome
    write_run_record(workdir, record)


def end_trial(study: optuna.Study, trial: optuna.trial.Trial, workdir: str, *,
              value: float | None = None, state: TrialState | None = None,
              failure: str = "") -> str:
  """Tells the study how the trial ended (its value, or a pruned or failed state with
  the failure's reason) and returns describe_outcome of it, noted in the trial's
  workdir unless complete."""
  if failure:
    trial.set_user_attr(FAILURE_ATTR, failure)
  study.tell(trial, value, state=state)
  outcome = describe_outcome(frozen_trial(study, trial.number))
  if outcome != "complete":
    note_outcome(workdir, outcome)
  return outcome


def run_trial(study_config, study_dir: str, study: optuna.Study,
              trial: optuna.trial.Trial, run_variant_fn: Callable,
              train_fn: Callable) -> str:
  """Trains (or resumes) one trial's variant and tells the study how it ended."""
  search = study_config.search
  frozen = frozen_trial(study, trial.number)
  variant = trial_variant(study_config, trial.number, frozen.params)
  workdir = variant_workdir(study_dir, variant.name)
  num_train_steps = variant_config(study_config, variant, study_dir).num_train_steps
  reported = sorted(frozen.intermediate_values)
  if reported and reported[-1] < num_train_steps and trial.should_prune():
    # Killed after the pruner stopped it, before the study heard how it ended.
    return end_trial(study, trial, workdir, state=TrialState.PRUNED)
  from affect_jax.train import guards  # pylint: disable=g-import-not-at-top
  pruned_at: list[int] = []
  try:
    run_variant_fn(study_config, variant, study_dir,
                   reporting_train_fn(trial, search.metric, train_fn, pruned_at))
  except guards.NonFiniteLossError as error:  # a diverging setting: a search's result
    log.warning("%s failed: %s", variant.name, error)
    return end_trial(study, trial, workdir, state=TrialState.FAIL,
                     failure="non-finite loss")
  if pruned_at:
    return end_trial(study, trial, workdir, state=TrialState.PRUNED)
  value = final_score(workdir, search.metric, num_train_steps)
  if value is None:
    raise InputError(f"{variant.name}: no {search.metric} logged at step "
                     f"{num_train_steps} in {workdir}")
  if not math.isfinite(value):
    return end_trial(study, trial, workdir, state=TrialState.FAIL,
                     failure=f"non-finite {search.metric}")
  return end_trial(study, trial, workdir, value=value)


def run_search(study_config, study_dir: str, run_variant_fn: Callable,
               train_fn: Callable | None = None) -> dict[str, str]:
  """Runs the search to `search.trials` ended trials: first those a killed invocation
  left running (resumed with their parameters), then new ones. run_variant_fn(
  study_config, variant, study_dir, train_fn) trains one variant (the runner's
  run_variant: workdir, run record, skip and resume rules); train_fn(config, workdir,
  on_evaluation) is loop.train_and_evaluate unless given. Returns {trial's variant
  name: 'complete' | 'pruned at step k' | 'failed: why'}."""
  search = study_config.search
  if train_fn is None:
    from affect_jax.train import loop  # pylint: disable=g-import-not-at-top
    train_fn = loop.train_and_evaluate
  study = open_study(search, study_dir)
  distributions = search_distributions(search)
  outcomes = {}
  for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    # optuna's handle of a stored trial; ask() makes new ones only.
    trial = optuna.trial.Trial(study, frozen._trial_id)  # pylint: disable=protected-access
    name = trial_name(search, frozen.number)
    log.info("search: resuming %s", name)
    outcomes[name] = run_trial(study_config, study_dir, study, trial, run_variant_fn,
                               train_fn)
  while len(study.get_trials(deepcopy=False, states=ENDED)) < search.trials:
    number = len(study.get_trials(deepcopy=False))
    study.sampler = trial_sampler(search, number)
    trial = study.ask(distributions)
    name = trial_name(search, trial.number)
    log.info("search: %s with %s", name, settings_text(trial.params.items()))
    outcomes[name] = run_trial(study_config, study_dir, study, trial, run_variant_fn,
                               train_fn)
    log.info("search: %s %s", name, outcomes[name])
  return outcomes


# ------------------------------------------------------------------ the report

def count(number: int, noun: str) -> str:
  return f"{number} {noun}{'' if number == 1 else 's'}"


def report_section(study_config, study_dir: str, results: Sequence) -> list[str]:
  """The report's "Hyper-parameter search" section for an optuna search: how trials were
  drawn and pruned, then the base variant and the trials ranked by the metric (complete
  ones first; a pruned trial's score is that of the step it stopped at). `results` are
  the report's per-variant results (.variant, .config, .score(key))."""
  search = study_config.search
  outcomes = trial_outcomes(study_config, study_dir)
  if not outcomes:
    return []
  ended = [o for o in outcomes.values() if o != "running or interrupted"]
  pruning = pruner_settings(search)
  pruner_text = ("no pruning" if pruning["kind"] == "none" else
                 "median pruner (a trial stops at an evaluation scoring below the "
                 "median of the completed trials at that step, once "
                 f"{count(pruning['startup_trials'], 'trial')} have completed, from step "
                 f"{pruning['warmup_steps']} on)")
  counts = {kind: sum(o.startswith(kind) for o in ended)
            for kind in ("complete", "pruned", "failed")}
  lines = [
      "## Hyper-parameter search", "",
      f"optuna search, TPE sampler (seed {search.seed}, the first "
      f"{count(startup_trials(search), 'trial')} drawn at random), {pruner_text}: "
      f"{len(ended)} of {search.trials} trials ended ({counts['complete']} complete, "
      f"{counts['pruned']} pruned, {counts['failed']} failed) over "
      + ", ".join(f"`{k}` {describe_values(values)}" for k, _, values in search.space)
      + f", each on top of `{search.base_variant}`; objective: {search.metric} at the "
      "final step. The study is stored in `optuna.db` in the study directory.", ""]
  base = search.base_variant
  ranked = [r for r in results
            if r.variant.name in outcomes or r.variant.name == base
            or getattr(r.variant, "family", "") == base]

  def order(result):
    outcome = outcomes.get(result.variant.name, "complete")
    value = result.score(search.metric)
    return (outcome != "complete", value is None, -(value or 0.0))

  lines += [f"| rank | variant | trial | settings | {search.metric} |",
            "|---|---|---|---|---|"]
  for rank, result in enumerate(sorted(ranked, key=order), 1):
    values = searched_settings_text(result.config, search)
    value = result.score(search.metric)
    outcome = outcomes.get(result.variant.name, "base variant")
    lines.append(f"| {rank} | `{result.variant.name}` | {outcome} | {values} | "
                 f"{'' if value is None else f'{value:.4f}'} |")
  return lines + [""]
