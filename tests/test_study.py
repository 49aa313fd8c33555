"""The study runner: planning (dependency order, shards, search trials), skip of finished
variants, resume of interrupted ones, and a report whose numbers are the logged ones."""
import csv
import json
import os
import subprocess
import sys

import pytest

from affect_jax import checkpoints, study, train
from affect_jax.metric_writer import read_metrics
from configs import study as study_configs
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Passed to the command line to give it the same base as tiny_study_config.
TINY_FLAGS = ["--config.base.model.stage_sizes=(1,1,1,1)",
              "--config.base.model.num_filters=8", "--config.base.input.batch_size=8",
              "--config.base.input.eval_batch_size=16",
              "--config.base.input.image_size=32",
              f"--config.base.num_train_steps={STEPS}", "--config.search.trials=0"]


def tiny_study_config(data_dir, search_trials=0):
  """configs/study.py's grid on configs/tiny.py's model, 32x32 images, a few steps."""
  config = study_configs.get_config()
  base = tiny.get_config()
  base.dataset.data_dir = data_dir
  base.input.image_size = 32
  base.num_train_steps = STEPS
  base.eval_every_steps = 3
  base.checkpoint_every_steps = 3
  base.log_every_steps = 3
  config.base = base
  config.search.trials = search_trials
  return config


# ------------------------------------------------------------------- planning (no JAX)

def test_warm_start_runs_after_its_source_and_is_planned_with_it():
  variants = [study.Variant("mtl_init_expr", init_from_variant="uni_expr"),
              study.Variant("mtl"), study.Variant("uni_expr")]
  assert [v.name for v in study.order_by_dependencies(variants)] == [
      "mtl", "uni_expr", "mtl_init_expr"]
  chosen = study.with_dependencies(variants, ["mtl_init_expr"])
  assert [v.name for v in study.order_by_dependencies(chosen)] == [
      "uni_expr", "mtl_init_expr"]
  with pytest.raises(ValueError, match="cycle"):
    study.order_by_dependencies([study.Variant("a", init_from_variant="b"),
                                 study.Variant("b", init_from_variant="a")])
  with pytest.raises(ValueError, match="unknown variants"):
    study.with_dependencies(variants, ["nope"])


def test_shards_cover_every_variant_once_and_keep_chains_together():
  config = study_configs.get_config()
  everything = [v.name for v in study.plan_study(config)]
  assert len(everything) == len(set(everything)) == 14
  for count in (1, 2, 3, 5, 16):
    shards = [study.plan_study(config, shard_index=i, shard_count=count)
              for i in range(count)]
    names = [v.name for shard in shards for v in shard]
    assert sorted(names) == sorted(everything), count
    for shard in shards:
      order = [v.name for v in shard]
      for position, variant in enumerate(shard):
        if variant.init_from_variant:
          assert variant.init_from_variant in order[:position]
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2  # chains are at most two long here
  with pytest.raises(ValueError, match="shard_index"):
    study.plan_study(config, shard_index=2, shard_count=2)


def test_search_trials_are_seeded_distinct_points_of_the_space():
  config = study_configs.get_config()
  trials = study.search_variants(config.search, study.study_variants(config)[:10])
  again = study.search_variants(config.search, study.study_variants(config)[:10])
  assert [t.name for t in trials] == [t.name for t in again]
  assert len({t.name for t in trials}) == config.search.trials
  space = {key: values for key, _, values in config.search.space}
  for trial in trials:
    settings = dict(trial.overrides)
    assert all(settings[key] in values for key, values in space.items())
  config.search.kind = "grid"
  assert len(study.search_variants(config.search, study.study_variants(config)[:10])
             ) == 8


def test_an_unknown_override_key_is_an_error():
  base = tiny.get_config()
  assert study.apply_overrides(base, [("loss.va", "mse")]).loss.va == "mse"
  assert base.loss.va == "ccc"  # the base is not modified
  with pytest.raises(KeyError, match="learning_rte"):
    study.apply_overrides(base, [("optimizer.learning_rte", 0.1)])


def test_wall_time_of_a_killed_session_is_a_lower_bound():
  record = {"sessions": [{"seconds": 10.0}, {"seconds": None}, {"seconds": 2.5}]}
  assert study.wall_time_seconds(record) == (12.5, False)
  assert study.wall_time_seconds({"sessions": [{"seconds": 3.0}]}) == (3.0, True)


# ------------------------------------------------------------------------- training

def save_then_interrupt_at(step_to_interrupt):
  save = checkpoints.save_checkpoint

  def save_checkpoint(manager, step, *args, **kwargs):
    saved = save(manager, step, *args, **kwargs)
    if step == step_to_interrupt:
      raise KeyboardInterrupt  # as Ctrl-C right after this checkpoint
    return saved

  return save_checkpoint


@pytest.fixture(scope="module")
def finished_study(built_union, tmp_path_factory):
  """A study asked for mtl_init_expr, so it trains uni_expr first; uni_expr is
  interrupted after its step-3 checkpoint, then the study runs again to the end.

  Returns (config, study_dir, outcomes of the second run, train calls as (variant,
  init_from.path, whether that source was finished), uni_expr's state when interrupted).
  """
  _, data_dir = built_union
  config = tiny_study_config(data_dir)
  study_dir = str(tmp_path_factory.mktemp("study"))
  uni_expr_dir = os.path.join(study_dir, "uni_expr")
  calls = []

  def train_and_record(variant_config, workdir):
    source = variant_config.init_from.path
    calls.append((os.path.basename(workdir), source,
                  bool(source) and study.is_finished(source, STEPS)))
    return train.train_and_evaluate(variant_config, workdir)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoints, "save_checkpoint", save_then_interrupt_at(3))
    with pytest.raises(KeyboardInterrupt):
      study.run_study(config, study_dir, names=["mtl_init_expr"],
                      train_fn=train_and_record)
  interrupted = {"finished": study.is_finished(uni_expr_dir, STEPS),
                 "checkpoints": study.checkpoint_steps(uni_expr_dir),
                 "other_workdirs": sorted(set(os.listdir(study_dir)) - {"uni_expr"})}
  outcomes = study.run_study(config, study_dir, names=["mtl_init_expr"],
                             train_fn=train_and_record)
  return config, study_dir, outcomes, calls, interrupted


def test_an_interrupted_variant_resumes_from_its_checkpoint(finished_study):
  _, study_dir, outcomes, calls, interrupted = finished_study
  assert interrupted == {"finished": False, "checkpoints": [3], "other_workdirs": []}
  assert outcomes["uni_expr"] == "trained"
  workdir = os.path.join(study_dir, "uni_expr")
  sessions = study.read_run_record(workdir)["sessions"]
  assert [(s["outcome"], s["start_step"], s["end_step"]) for s in sessions] == [
      ("interrupted (KeyboardInterrupt)", 0, 3), ("finished", 3, STEPS)]
  assert all(s["seconds"] > 0 for s in sessions)
  # The first session's step-3 evaluation stays; the second adds only the final one.
  assert [m["step"] for m in read_metrics(workdir)] == [3, STEPS]
  assert [c[0] for c in calls] == ["uni_expr", "uni_expr", "mtl_init_expr"]


def test_warm_start_trains_after_its_finished_source(finished_study):
  _, study_dir, outcomes, calls, _ = finished_study
  assert outcomes == {"uni_expr": "trained", "mtl_init_expr": "trained"}
  assert calls[-1] == ("mtl_init_expr", os.path.join(study_dir, "uni_expr"), True)
  with open(os.path.join(study_dir, "mtl_init_expr", "config.json")) as f:
    assert json.load(f)["init_from"]["path"] == os.path.join(study_dir, "uni_expr")


def test_finished_variants_are_skipped_untouched(finished_study):
  config, study_dir, _, _, _ = finished_study
  files = [os.path.join(study_dir, name, file) for name in ("uni_expr", "mtl_init_expr")
           for file in ("metrics.jsonl", study.RUN_RECORD)]
  before = {path: open(path, "rb").read() for path in files}

  def must_not_train(*_):
    raise AssertionError("a finished variant was trained again")

  outcomes = study.run_study(config, study_dir, names=["mtl_init_expr"],
                             train_fn=must_not_train)
  assert outcomes == {"uni_expr": "skipped", "mtl_init_expr": "skipped"}
  assert {path: open(path, "rb").read() for path in files} == before


def test_a_variant_trained_with_other_settings_is_refused(finished_study):
  config, study_dir, _, _, _ = finished_study
  changed = tiny_study_config(config.base.dataset.data_dir)
  changed.base.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    study.run_study(changed, study_dir, names=["uni_expr"])


def read_csv(path):
  with open(path, newline="") as f:
    return {row["variant"]: row for row in csv.DictReader(f)}


def test_report_numbers_are_the_logged_scores(finished_study, tmp_path):
  config, study_dir, _, _, _ = finished_study
  paths = study.write_study_report(config, study_dir, str(tmp_path / "report"))
  rows = read_csv(paths["results.csv"])
  assert list(rows) == ["uni_expr", "mtl_init_expr"]
  for name, row in rows.items():
    final = [m for m in read_metrics(os.path.join(study_dir, name))
             if m["step"] == STEPS][-1]
    assert int(row["step"]) == STEPS and row["finished"] == "True"
    for key, _ in study.SCORE_COLUMNS:
      logged = final.get(key)
      if key == "p_mtl" and name == "uni_expr":
        logged = None  # a uni-task model's p_mtl is not on the P_MTL scale
      assert (float(row[key]) if row[key] else None) == logged, (name, key)
    sessions = study.read_run_record(os.path.join(study_dir, name))["sessions"]
    assert float(row["wall_time_s"]) == pytest.approx(sum(s["seconds"] for s in sessions))
  report = open(paths["report.md"]).read()
  assert f"**{float(rows['mtl_init_expr']['au_f1']):.4f}**" in report
  assert "expr_f1 − `uni_expr`" in report
  for plot in ("scores.png", "curves.png"):
    assert os.path.getsize(paths[plot]) > 10_000


def test_command_line_report_only(finished_study, tmp_path):
  config, study_dir, _, _, _ = finished_study
  report_dir = str(tmp_path / "cli_report")
  command = [sys.executable, "-m", "affect_jax.study", "--config",
             os.path.join(REPO, "configs", "study.py"), "--study_dir", study_dir,
             "--report_only", "--report_dir", report_dir,
             f"--config.base.dataset.data_dir={config.base.dataset.data_dir}",
             *TINY_FLAGS]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  expected = read_csv(study.write_study_report(config, study_dir,
                                               str(tmp_path / "direct"))["results.csv"])
  assert read_csv(os.path.join(report_dir, "results.csv")) == expected
