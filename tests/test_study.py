"""The study runner: planning (dependency order, shards, search trials), skip of finished
variants, resume of interrupted ones (what a resumed run logs again is read once), and a
report whose numbers are the logged ones."""
import csv
import json
import os
import subprocess
import sys

import pytest

from affect_jax.eval import writers
from affect_jax.eval.writers import read_metrics
from affect_jax.study import report, runner, variants
from affect_jax.train import loop
from configs import study as study_configs
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Passed to the command line to give it the same base as tiny_study_config.
TINY_FLAGS = ["--config.base.model.stage_sizes=(1,1,1,1)",
              "--config.base.model.num_filters=8", "--config.base.input.batch_size=8",
              "--config.base.input.eval_batch_size=16",
              "--config.base.input.image_size=32",
              f"--config.base.num_train_steps={STEPS}", "--config.search.trials=0",
              "--config.seeds=()", "--config.temporal.variants=()"]


def tiny_study_config(data_dir, search_trials=0):
  """configs/study.py's grid on configs/tiny.py's model, 32x32 images, a few steps, one
  run per variant (tests/test_study_seeds.py covers seeds), no temporal heads."""
  config = study_configs.get_config()
  config.seeds = ()
  config.temporal.variants = ()
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
  planned = [variants.Variant("mtl_init_expr", init_from_variant="uni_expr"),
             variants.Variant("mtl"), variants.Variant("uni_expr")]
  assert [v.name for v in variants.order_by_dependencies(planned)] == [
      "mtl", "uni_expr", "mtl_init_expr"]
  chosen = variants.with_dependencies(planned, ["mtl_init_expr"])
  assert [v.name for v in variants.order_by_dependencies(chosen)] == [
      "uni_expr", "mtl_init_expr"]
  with pytest.raises(ValueError, match="cycle"):
    variants.order_by_dependencies([variants.Variant("a", init_from_variant="b"),
                                    variants.Variant("b", init_from_variant="a")])
  with pytest.raises(ValueError, match="unknown variants"):
    variants.with_dependencies(planned, ["nope"])


def test_shards_cover_every_variant_once_and_keep_chains_together():
  config = study_configs.get_config()
  config.seeds = ()
  everything = [v.name for v in variants.plan_study(config)]
  assert len(everything) == len(set(everything)) == 13
  for count in (1, 2, 3, 5, 16):
    shards = [variants.plan_study(config, shard_index=i, shard_count=count)
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
    variants.plan_study(config, shard_index=2, shard_count=2)


def test_search_trials_are_seeded_distinct_points_of_the_space():
  config = study_configs.get_config()
  trials = variants.search_variants(config.search, variants.study_variants(config)[:10])
  again = variants.search_variants(config.search, variants.study_variants(config)[:10])
  assert [t.name for t in trials] == [t.name for t in again]
  assert len({t.name for t in trials}) == config.search.trials
  space = {key: values for key, _, values in config.search.space}
  for trial in trials:
    settings = dict(trial.overrides)
    assert all(settings[key] in values for key, values in space.items())
  config.search.kind = "grid"
  assert len(variants.search_variants(config.search, variants.study_variants(config)[:10])
             ) == 8


def test_an_unknown_override_key_is_an_error():
  base = tiny.get_config()
  assert variants.apply_overrides(base, [("loss.va", "mse")]).loss.va == "mse"
  assert base.loss.va == "ccc"  # the base is not modified
  with pytest.raises(KeyError, match="learning_rte"):
    variants.apply_overrides(base, [("optimizer.learning_rte", 0.1)])


def test_wall_time_of_a_killed_session_is_a_lower_bound():
  record = {"sessions": [{"seconds": 10.0}, {"seconds": None}, {"seconds": 2.5}]}
  assert variants.wall_time_seconds(record) == (12.5, False)
  assert variants.wall_time_seconds({"sessions": [{"seconds": 3.0}]}) == (3.0, True)


def test_a_resumed_session_supersedes_the_losses_it_logs_again(tmp_path):
  workdir = str(tmp_path)
  killed = writers.MetricWriter(workdir)
  for step in (2, 4, 6):
    killed.write_scalars(step, {"loss": float(step)}, prefix="train")
  killed.close()
  with open(os.path.join(workdir, writers.SCALARS_FILE), "a") as f:
    f.write('{"step": 8, "train/lo')  # the line a kill cut short
  resumed = writers.MetricWriter(workdir)  # from the step-4 checkpoint, logging every 5
  for step in (5, 10):
    resumed.write_scalars(step, {"loss": step + 0.5}, prefix="train")
  resumed.close()
  # Step 6 of the killed session would be drawn after step 5 of the resumed one.
  assert variants.training_losses(workdir) == [(2, 2.0), (4, 4.0), (5, 5.5), (10, 10.5)]


def test_a_resumed_session_supersedes_the_evaluations_it_logs_again(tmp_path):
  workdir = str(tmp_path)
  killed = writers.MetricWriter(workdir)
  for step in (3, 6):
    killed.write_scores(step, "validation", {"p_va": float(step)})
  killed.close()
  later = writers.MetricWriter(workdir)  # `--mode eval` of the step-3 checkpoint
  later.write_scores(3, "validation", {"p_va": 0.25}, mode="eval")
  resumed = writers.MetricWriter(workdir)  # from the step-3 checkpoint
  resumed.write_scores(6, "validation", {"p_va": 6.5})
  later.close()
  resumed.close()
  assert [(m["step"], m["p_va"]) for m in variants.training_evaluations(workdir)] == [
      (3, 3.0), (6, 6.5)]
  assert len(read_metrics(workdir)) == 4  # the file keeps every line as written


# ------------------------------------------------------------------------- training

def log_scores_then_interrupt_at(step_to_interrupt):
  write_scores = writers.MetricWriter.write_scores

  def write_then_interrupt(self, step, *args, **kwargs):
    write_scores(self, step, *args, **kwargs)
    if step == step_to_interrupt:
      raise KeyboardInterrupt  # as Ctrl-C after this evaluation, before its checkpoint

  return write_then_interrupt


@pytest.fixture(scope="module")
def finished_study(built_union, tmp_path_factory):
  """A study asked for mtl_init_expr, so it trains uni_expr first; uni_expr is
  interrupted after logging its final step's losses and evaluation but before that
  step's checkpoint, then the study runs again: uni_expr resumes from its step-3
  checkpoint (and logs steps 4 to 6 again), then mtl_init_expr trains.

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
                  bool(source) and variants.is_finished(source, STEPS)))
    return loop.train_and_evaluate(variant_config, workdir)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(writers.MetricWriter, "write_scores",
                  log_scores_then_interrupt_at(STEPS))
    with pytest.raises(KeyboardInterrupt):
      runner.run_study(config, study_dir, names=["mtl_init_expr"],
                       train_fn=train_and_record)
  interrupted = {"finished": variants.is_finished(uni_expr_dir, STEPS),
                 "checkpoints": variants.checkpoint_steps(uni_expr_dir),
                 "other_workdirs": sorted(set(os.listdir(study_dir)) - {"uni_expr"})}
  outcomes = runner.run_study(config, study_dir, names=["mtl_init_expr"],
                              train_fn=train_and_record)
  return config, study_dir, outcomes, calls, interrupted


def test_an_interrupted_variant_resumes_from_its_checkpoint(finished_study):
  _, study_dir, outcomes, calls, interrupted = finished_study
  assert interrupted == {"finished": False, "checkpoints": [3], "other_workdirs": []}
  assert outcomes["uni_expr"] == "trained"
  workdir = os.path.join(study_dir, "uni_expr")
  sessions = variants.read_run_record(workdir)["sessions"]
  assert [(s["outcome"], s["start_step"], s["end_step"]) for s in sessions] == [
      ("interrupted (KeyboardInterrupt)", 0, 3), ("finished", 3, STEPS)]
  assert all(s["seconds"] > 0 for s in sessions)
  assert [c[0] for c in calls] == ["uni_expr", "uni_expr", "mtl_init_expr"]


def test_what_a_resumed_variant_logs_again_is_read_once(finished_study):
  config, study_dir, _, _, _ = finished_study
  workdir = os.path.join(study_dir, "uni_expr")
  # The resumed session dropped what the killed one logged after its checkpoint...
  assert [m["step"] for m in read_metrics(workdir)] == [3, STEPS]
  logged = writers.read_json_lines(os.path.join(workdir, writers.SCALARS_FILE))
  assert [line["step"] for line in logged] == [3, STEPS]
  # ... and what the report reads is one point per step, the resumed session's.
  assert [m["step"] for m in variants.training_evaluations(workdir)] == [3, STEPS]
  assert variants.training_evaluations(workdir)[-1] == read_metrics(workdir)[-1]
  tags = set(logged[0]) - {"step", "time"}
  assert {"train/loss", "train/input_wait_ms"} <= tags
  assert writers.read_scalars(workdir) == {
      tag: [(3, logged[0][tag]), (STEPS, logged[-1][tag])] for tag in tags}
  result = {r.variant.name: r for r in report.collect_results(config, study_dir)}
  assert result["uni_expr"].losses == [(3, logged[0]["train/loss"]),
                                       (STEPS, logged[-1]["train/loss"])]


def test_warm_start_trains_after_its_finished_source(finished_study):
  _, study_dir, outcomes, calls, _ = finished_study
  assert outcomes == {"uni_expr": "trained", "mtl_init_expr": "trained"}
  assert calls[-1] == ("mtl_init_expr", os.path.join(study_dir, "uni_expr"), True)
  with open(os.path.join(study_dir, "mtl_init_expr", "config.json")) as f:
    assert json.load(f)["init_from"]["path"] == os.path.join(study_dir, "uni_expr")


def test_finished_variants_are_skipped_untouched(finished_study):
  config, study_dir, _, _, _ = finished_study
  files = [os.path.join(study_dir, name, file) for name in ("uni_expr", "mtl_init_expr")
           for file in (writers.METRICS_FILE, writers.SCALARS_FILE, variants.RUN_RECORD)]
  before = {path: open(path, "rb").read() for path in files}

  def must_not_train(*_):
    raise AssertionError("a finished variant was trained again")

  outcomes = runner.run_study(config, study_dir, names=["mtl_init_expr"],
                              train_fn=must_not_train)
  assert outcomes == {"uni_expr": "skipped", "mtl_init_expr": "skipped"}
  assert {path: open(path, "rb").read() for path in files} == before


def test_a_variant_trained_with_other_settings_is_refused(finished_study):
  config, study_dir, _, _, _ = finished_study
  changed = tiny_study_config(config.base.dataset.data_dir)
  changed.base.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    runner.run_study(changed, study_dir, names=["uni_expr"])


def read_csv(path):
  with open(path, newline="") as f:
    return {row["variant"]: row for row in csv.DictReader(f)}


def test_report_numbers_are_the_logged_scores(finished_study, tmp_path):
  config, study_dir, _, _, _ = finished_study
  paths = report.write_study_report(config, study_dir, str(tmp_path / "report"))
  rows = read_csv(paths["results.csv"])
  assert list(rows) == ["uni_expr", "mtl_init_expr"]
  for name, row in rows.items():
    final = [m for m in read_metrics(os.path.join(study_dir, name))
             if m["step"] == STEPS][-1]
    assert int(row["step"]) == STEPS and row["finished"] == "True"
    for key, _ in report.SCORE_COLUMNS:
      logged = final.get(key)
      if key == "p_mtl" and name == "uni_expr":
        logged = None  # a uni-task model's p_mtl is not on the P_MTL scale
      assert (float(row[key]) if row[key] else None) == logged, (name, key)
    sessions = variants.read_run_record(os.path.join(study_dir, name))["sessions"]
    assert float(row["wall_time_s"]) == pytest.approx(sum(s["seconds"] for s in sessions))
  text = open(paths["report.md"]).read()
  assert f"**{float(rows['mtl_init_expr']['au_f1']):.4f}**" in text
  # The paired difference of the two runs' expression scores, from their per-frame
  # predictions, equals the difference of their logged scores.
  with open(paths["differences.csv"], newline="") as f:
    difference, = [row for row in csv.DictReader(f) if row["score"] == "expr_f1"]
  assert (difference["a"], difference["b"]) == ("mtl_init_expr", "uni_expr")
  assert float(difference["difference"]) == pytest.approx(
      float(rows["mtl_init_expr"]["expr_f1"]) - float(rows["uni_expr"]["expr_f1"]),
      abs=1e-6)
  assert "| `mtl_init_expr` | `uni_expr` | EXPR F1 |" in text
  for plot in ("scores.png", "curves.png"):
    assert os.path.getsize(paths[plot]) > 10_000


def test_command_line_report_only(finished_study, tmp_path):
  config, study_dir, _, _, _ = finished_study
  report_dir = str(tmp_path / "cli_report")
  command = [sys.executable, "-m", "affect_jax.study.runner", "--config",
             os.path.join(REPO, "configs", "study.py"), "--study_dir", study_dir,
             "--report_only", "--report_dir", report_dir,
             f"--config.base.dataset.data_dir={config.base.dataset.data_dir}",
             *TINY_FLAGS]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  expected = read_csv(report.write_study_report(config, study_dir,
                                                str(tmp_path / "direct"))["results.csv"])
  assert read_csv(os.path.join(report_dir, "results.csv")) == expected


def test_a_training_invocation_with_noreport_writes_no_report(finished_study, tmp_path):
  """Invocations sharing a study (shards, seeds added side by side) leave the report to
  one --report_only call; a plain invocation writes it."""
  config, study_dir, _, _, _ = finished_study
  command = [sys.executable, "-m", "affect_jax.study.runner", "--config",
             os.path.join(REPO, "configs", "study.py"), "--study_dir", study_dir,
             "--variants", "uni_expr",  # finished: skipped
             f"--config.base.dataset.data_dir={config.base.dataset.data_dir}",
             *TINY_FLAGS, "--config.base.eval_every_steps=3",
             "--config.base.optimizer.warmup_steps=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for flag, written in (("--noreport", False), ("--report", True)):
    report_dir = tmp_path / flag.strip("-")
    result = subprocess.run([*command, flag, "--report_dir", str(report_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "uni_expr: skipped" in result.stderr
    assert (report_dir / "report.md").exists() == written
  # The report lists the runner's invocations on the study, this one's last.
  text = (tmp_path / "report" / "report.md").read_text()
  commands = text.split("## Commands")[1]
  assert "invocations</summary>" in commands
  assert " --report --report_dir " in commands.split("```")[1].strip().splitlines()[-1]
