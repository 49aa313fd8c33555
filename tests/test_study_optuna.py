"""The optuna search of a study: seeded trials, pruning from the evaluations a run logs
(the run stopped after that evaluation's checkpoint), resume of an interrupted search,
the trials as the report lists them; and the trainer's evaluation hook on a real run.

The search tests train with a stand-in for train_and_evaluate that logs and checkpoints
as it does (scores a function of the learning rate), through the runner's run_variant."""
import json
import math
import os
import statistics
import types

import pytest

from affect_jax.errors import InputError
from affect_jax.eval import writers
from affect_jax.study import optuna_search, runner, variants
from affect_jax.study.runner import run_variant
from affect_jax.train import guards, loop
from configs import study_optuna

STEPS = 6
EVAL_EVERY = 2


def search_config(seed=0, trials=6):
  config = study_optuna.get_config()
  config.base.num_train_steps = STEPS
  config.base.eval_every_steps = EVAL_EVERY
  search = config.search
  search.seed = seed
  search.trials = trials
  search.space = (
      ("optimizer.learning_rate", "lr", {"low": 1e-5, "high": 1e-1, "log": True}),
      ("optimizer.weight_decay", "wd", (1e-4, 1e-2)))
  search.startup_trials = 2
  search.pruner_startup_trials = 2
  search.pruner_warmup_steps = 0
  return config


def fake_score(config, step):
  """Rises with the step, highest at a learning rate of 1e-3."""
  distance = abs(math.log10(config.optimizer.learning_rate) + 3)
  return step / STEPS * (4 - distance)


class FakeTraining:
  """train_and_evaluate's contract for a study: resume from the latest checkpoint, log
  each evaluation to metrics.jsonl, ask on_evaluation, checkpoint, stop when told.
  `interrupt=(variant, step)` raises KeyboardInterrupt after logging that step's
  evaluation, before its checkpoint (as Ctrl-C there)."""

  def __init__(self, interrupt=None, interrupt_when_stopped=False, diverge_above_wd=None,
               final_drop_for=None):
    self.interrupt = interrupt
    self.final_drop_for = final_drop_for  # this variant scores badly at its last step
    self.interrupt_when_stopped = interrupt_when_stopped  # a kill once told to stop
    self.diverge_above_wd = diverge_above_wd  # non-finite losses above this decay
    self.sessions = []  # (variant, start step)

  def __call__(self, config, workdir, on_evaluation=None):
    steps = variants.checkpoint_steps(workdir)
    start = steps[-1] if steps else 0
    name = os.path.basename(workdir)
    self.sessions.append((name, start))
    metrics = os.path.join(workdir, writers.METRICS_FILE)
    writers.drop_lines_after(metrics, start)
    if self.diverge_above_wd and config.optimizer.weight_decay > self.diverge_above_wd:
      raise guards.NonFiniteLossError("10 steps in a row with a non-finite loss")
    for step in range(start + EVAL_EVERY, config.num_train_steps + 1, EVAL_EVERY):
      scores = {"p_mtl": fake_score(config, step)}
      if name == self.final_drop_for and step == config.num_train_steps:
        scores["p_mtl"] -= 10
      writers.append_json_line(metrics, {"step": step, "split": "validation",
                                         "mode": "train", **scores})
      if self.interrupt == (name, step):
        raise KeyboardInterrupt
      stop = bool(on_evaluation and on_evaluation(step, scores))
      os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
      if stop and self.interrupt_when_stopped:
        raise KeyboardInterrupt  # checkpointed, before the study hears it was pruned
      if stop:
        break


def trial_points(study_dir):
  study = optuna_search.loaded_study(study_dir)
  return [(t.number, t.params, t.state.name, t.value)
          for t in study.get_trials(deepcopy=False)]


def params_of(study_dir):
  return [params for _, params, _, _ in trial_points(study_dir)]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
  """The search run once uninterrupted: (config, study_dir, outcomes, training)."""
  config = search_config()
  study_dir = str(tmp_path_factory.mktemp("optuna"))
  training = FakeTraining()
  outcomes = optuna_search.run_search(config, study_dir, run_variant, training)
  return config, study_dir, outcomes, training


def test_the_same_seed_draws_the_same_trials(searched, tmp_path):
  config, study_dir, _, _ = searched
  optuna_search.run_search(config, str(tmp_path / "again"), run_variant, FakeTraining())
  assert trial_points(str(tmp_path / "again")) == trial_points(study_dir)
  other = search_config(seed=1, trials=2)  # the first draws already differ
  optuna_search.run_search(other, str(tmp_path / "seed1"), run_variant, FakeTraining())
  assert params_of(str(tmp_path / "seed1")) != params_of(study_dir)[:2]


def test_a_trial_below_the_median_stops_after_that_evaluation(searched):
  config, study_dir, outcomes, training = searched
  study = optuna_search.loaded_study(study_dir)
  trials = study.get_trials(deepcopy=False)
  assert len(trials) == config.search.trials
  pruned = [t for t in trials if t.state.name == "PRUNED"]
  complete = [t for t in trials if t.state.name == "COMPLETE"]
  assert pruned and complete
  for trial in pruned:
    name = optuna_search.trial_name(config.search, trial.number)
    step = max(trial.intermediate_values)
    assert step < STEPS and outcomes[name] == f"pruned at step {step}"
    workdir = variants.variant_workdir(study_dir, name)
    # Stopped after that evaluation's checkpoint: the run is consistent, and unfinished.
    assert variants.checkpoint_steps(workdir) == list(range(EVAL_EVERY, step + 1,
                                                            EVAL_EVERY))
    assert [m["step"] for m in variants.training_evaluations(workdir)] == list(
        range(EVAL_EVERY, step + 1, EVAL_EVERY))
    record = variants.read_run_record(workdir)
    assert record["sessions"][-1]["outcome"] == f"pruned at step {step}"
    # The median rule over the trials that had ended before this one.
    earlier = [t.intermediate_values[step] for t in trials
               if t.number < trial.number and step in t.intermediate_values
               and t.state.name == "COMPLETE"]
    assert trial.intermediate_values[step] < statistics.median(earlier)
  for trial in complete:
    workdir = variants.variant_workdir(
        study_dir, optuna_search.trial_name(config.search, trial.number))
    final = variants.training_evaluations(workdir)[-1]
    assert final["step"] == STEPS and trial.value == final["p_mtl"]
    assert variants.is_finished(workdir, STEPS)
  assert len(training.sessions) == len(trials)  # one session each


def test_an_interrupted_search_resumes_where_it_stopped(searched, tmp_path):
  config, reference_dir, reference_outcomes, _ = searched
  study_dir = str(tmp_path / "interrupted")
  # Trial 1 is never pruned (two trials must end first): Ctrl-C at its step-4
  # evaluation, after its step-2 checkpoint.
  with pytest.raises(KeyboardInterrupt):
    optuna_search.run_search(config, study_dir, run_variant,
                             FakeTraining(interrupt=("search_trial1", 4)))
  assert [state for _, _, state, _ in trial_points(study_dir)] == ["COMPLETE", "RUNNING"]
  resumed = FakeTraining()
  outcomes = optuna_search.run_search(config, study_dir, run_variant, resumed)
  assert resumed.sessions[0] == ("search_trial1", 2)  # from its checkpoint
  assert "search_trial0" not in [name for name, _ in resumed.sessions]
  assert trial_points(study_dir) == trial_points(reference_dir)
  assert {**outcomes, "search_trial0": "complete"} == reference_outcomes
  record = variants.read_run_record(variants.variant_workdir(study_dir, "search_trial1"))
  assert [(s["outcome"], s["start_step"], s["end_step"]) for s in record["sessions"]] == [
      ("interrupted (KeyboardInterrupt)", 0, 2), ("finished", 2, STEPS)]
  # Run again: every trial has ended, nothing trains.
  again = FakeTraining()
  assert optuna_search.run_search(config, study_dir, run_variant, again) == {}
  assert again.sessions == []


def test_a_trial_killed_once_pruned_is_not_trained_again(searched, tmp_path):
  config, reference_dir, reference_outcomes, _ = searched
  study_dir = str(tmp_path / "killed_when_pruned")
  with pytest.raises(KeyboardInterrupt):
    optuna_search.run_search(config, study_dir, run_variant,
                             FakeTraining(interrupt_when_stopped=True))
  killed = trial_points(study_dir)[-1]
  assert killed[2] == "RUNNING"
  name = optuna_search.trial_name(config.search, killed[0])
  resumed = FakeTraining()
  outcomes = optuna_search.run_search(config, study_dir, run_variant, resumed)
  assert name not in [trained for trained, _ in resumed.sessions]
  assert outcomes[name] == reference_outcomes[name]
  assert outcomes[name].startswith("pruned at step")
  assert trial_points(study_dir) == trial_points(reference_dir)


def killed_after_the_run_of(name):
  """The runner's run_variant, and a kill right after `name`'s run has ended (before
  the study hears how)."""
  def run(study_config, variant, study_dir, train_fn):
    outcome = run_variant(study_config, variant, study_dir, train_fn)
    if variant.name == name:
      raise KeyboardInterrupt
    return outcome

  return run


def test_a_trial_killed_after_its_final_evaluation_is_complete(tmp_path):
  config = search_config(trials=3)
  study_dir = str(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    optuna_search.run_search(config, study_dir, killed_after_the_run_of("search_trial2"),
                             FakeTraining(final_drop_for="search_trial2"))
  resumed = FakeTraining(final_drop_for="search_trial2")
  outcomes = optuna_search.run_search(config, study_dir, run_variant, resumed)
  assert outcomes == {"search_trial2": "complete"} and resumed.sessions == []
  trials = optuna_search.loaded_study(study_dir).get_trials(deepcopy=False)
  final = variants.training_evaluations(variants.variant_workdir(
      study_dir, "search_trial2"))[-1]
  assert final["step"] == STEPS and trials[2].value == final["p_mtl"]
  # Below the median of the completed trials at its final step: a pruner asked there
  # would have stopped it, but a finished run is complete.
  assert final["p_mtl"] < statistics.median(t.value for t in trials[:2])


def test_a_diverging_trial_fails_and_the_search_goes_on(tmp_path):
  config = search_config(trials=4)
  outcomes = optuna_search.run_search(config, str(tmp_path), run_variant,
                                      FakeTraining(diverge_above_wd=1e-3))
  points = trial_points(str(tmp_path))
  assert len(outcomes) == len(points) == 4
  for number, params, state, _ in points:
    diverged = params["optimizer.weight_decay"] > 1e-3
    assert (state == "FAIL") == diverged
    outcome = outcomes[optuna_search.trial_name(config.search, number)]
    assert (outcome == "failed: non-finite loss") == diverged
  assert any(state == "FAIL" for _, _, state, _ in points)
  assert any(state != "FAIL" for _, _, state, _ in points)


def test_a_search_with_other_settings_is_refused(searched):
  config, study_dir, _, _ = searched
  config = search_config()
  config.search.space = (("optimizer.learning_rate", "lr", (1e-3, 1e-2)),)
  with pytest.raises(InputError, match="optimizer.learning_rate"):
    optuna_search.open_study(config.search, study_dir)
  config = search_config(trials=8)  # more trials extend the same search
  assert optuna_search.open_study(config.search, study_dir).trials


def test_trials_are_variants_with_their_settings_and_outcome(searched):
  config, study_dir, outcomes, _ = searched
  trials = optuna_search.trial_variants(config, study_dir)
  assert [v.name for v in trials] == list(outcomes)
  study = optuna_search.loaded_study(study_dir)
  for variant, trial in zip(trials, study.get_trials(deepcopy=False)):
    # mtl overrides nothing itself; trials run at the study's first seed.
    assert dict(variant.overrides) == {**trial.params, "seed": config.seeds[0]}
    assert variant.group == "search"
    # The workdir's recorded settings are the variant's.
    record = variants.read_run_record(variants.variant_workdir(study_dir, variant.name))
    assert record["settings"]["optimizer.learning_rate"] == trial.params[
        "optimizer.learning_rate"]
    if outcomes[variant.name] != "complete":
      assert variant.description.endswith(outcomes[variant.name])


def test_the_report_ranks_complete_trials_before_pruned_ones(searched):
  config, study_dir, outcomes, _ = searched
  results = []
  for variant in optuna_search.trial_variants(config, study_dir):
    variant_config = variants.variant_config(config, variant, study_dir)
    last = variants.training_evaluations(variants.variant_workdir(
        study_dir, variant.name))[-1]
    results.append(types.SimpleNamespace(variant=variant, config=variant_config,
                                         score=lambda key, last=last: last.get(key)))
  lines = optuna_search.report_section(config, study_dir, results)
  rows = [line.split(" | ") for line in lines if line.startswith("| ") and "`" in line]
  shown = [(row[1].strip("`"), row[2]) for row in rows]
  assert sorted(shown) == sorted(outcomes.items())
  kinds = [outcome.split()[0] for _, outcome in shown]
  assert kinds == sorted(kinds)  # complete before pruned
  complete_scores = [float(row[4].rstrip(" |")) for row in rows if row[2] == "complete"]
  assert complete_scores == sorted(complete_scores, reverse=True)
  assert "log-uniform in [1e-05, 0.1]" in lines[2]


def test_space_entries_become_optuna_distributions():
  integers = optuna_search.distribution("model.num_filters", {"low": 8, "high": 32})
  assert integers.low == 8 and integers.high == 32 and not integers.log
  with pytest.raises(InputError, match="model.tasks"):
    optuna_search.distribution("model.tasks", (("va",), ("au",)))
  with pytest.raises(InputError, match="low < high"):
    optuna_search.distribution("optimizer.learning_rate", {"low": 0.0, "high": 1e-2,
                                                           "log": True})


# ----------------------------------------------------------- the trainer's hook (JAX)

def test_on_evaluation_stops_the_run_after_a_consistent_checkpoint(uninterrupted_run,
                                                                   tmp_path):
  config, reference_dir = uninterrupted_run("xla")
  stop_at = config.eval_every_steps
  seen = []

  def stop_at_first(step, scores):
    seen.append((step, scores))
    return step == stop_at

  workdir = str(tmp_path / "stopped")
  state = loop.train_and_evaluate(config, workdir, on_evaluation=stop_at_first)
  assert int(state.step) == stop_at
  assert variants.checkpoint_steps(workdir)[-1] == stop_at
  with open(os.path.join(reference_dir, writers.METRICS_FILE)) as f:
    reference = {m["step"]: m for m in map(json.loads, f) if m["mode"] == "train"}
  logged = variants.training_evaluations(workdir)
  assert [m["step"] for m in logged] == [stop_at] and [s for s, _ in seen] == [stop_at]
  assert seen[0][1]["p_mtl"] == logged[0]["p_mtl"] == reference[stop_at]["p_mtl"]
  # Resumed without the hook, it ends where the uninterrupted run ended.
  loop.train_and_evaluate(config, workdir)
  final = variants.training_evaluations(workdir)[-1]
  assert final["step"] == config.num_train_steps
  assert final["p_mtl"] == reference[config.num_train_steps]["p_mtl"]


def test_the_runner_trains_the_variants_then_the_search(tmp_path):
  """`affect-jax study` with search.kind optuna: the listed variants' seed runs first,
  then the trials one by one; a second run trains nothing."""
  config = search_config(trials=3)
  config.variants = [spec for spec in config.variants if spec["name"] == "mtl"]
  config.seeds = (0, 1)
  config.temporal.variants = ()
  assert [run.name for run in variants.study_runs(config)] == ["mtl/seed0", "mtl/seed1"]
  training = FakeTraining()
  outcomes = runner.run_study(config, str(tmp_path), train_fn=training)
  assert outcomes == {"mtl/seed0": "trained", "mtl/seed1": "trained",
                      "search_trial0": "complete", "search_trial1": "complete",
                      "search_trial2": "complete"}
  assert [name for name, _ in training.sessions] == [
      "seed0", "seed1", "search_trial0", "search_trial1", "search_trial2"]
  again = FakeTraining()
  runner.run_study(config, str(tmp_path), train_fn=again)
  assert again.sessions == []


def test_trials_under_seeds_run_at_the_first_seed_warm_started_from_its_run(tmp_path):
  """With config.seeds, a trial of a warm-started base variant starts from the run of
  the study's first seed (there is no unseeded run to start from)."""
  config = search_config()
  config.seeds = (3, 4)
  config.search.base_variant = "mtl_init_expr"
  variant = optuna_search.trial_variant(
      config, 0, {"optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 1e-4})
  assert variant.init_from_variant == "uni_expr/seed3"
  trial_config = variants.variant_config(config, variant, str(tmp_path))
  assert trial_config.seed == 3
  assert trial_config.init_from.path == os.path.join(str(tmp_path), "uni_expr", "seed3")
  assert not runner.dependency_finished(config, variant, str(tmp_path))
  assert "seed" not in variant.description
