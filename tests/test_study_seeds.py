"""A study run with several seeds: each variant expanded into one run per seed (own
workdir, warm starts from the same seed, skip / resume / refusal per run), scores as
mean ± sd over seeds, and paired differences with bootstrap intervals over validation
videos (checked against a NumPy computation of their own), clear of noise or not."""
import csv
import functools
import json
import os

import jax
import numpy as np
import pytest
from scipy import stats

from affect_jax.eval import metrics
from affect_jax.eval.accumulators import to_host
from affect_jax.eval.writers import METRICS_FILE, append_json_line
from affect_jax.study import intervals, report, runner, seeds, seeds_plots, variants
from configs import study as study_configs
from configs import tiny

STEPS = 4


def seeded_config(data_dir="unused", seed_list=(0, 1, 2)):
  config = study_configs.get_config()
  config.base = tiny.get_config()
  config.base.dataset.data_dir = data_dir
  config.base.num_train_steps = STEPS
  config.seeds = seed_list
  config.search.trials = 0
  return config


# ------------------------------------------------------------------ seed expansion

def test_each_variant_runs_once_per_seed_in_its_own_workdir():
  config = seeded_config()
  plan = variants.plan_study(config, ["mtl_init_expr"])
  # Seed by seed: a study stopped early has whole seeds.
  assert [v.name for v in plan] == [
      "uni_expr/seed0", "mtl_init_expr/seed0", "uni_expr/seed1",
      "mtl_init_expr/seed1", "uni_expr/seed2", "mtl_init_expr/seed2"]
  by_name = {v.name: v for v in plan}
  run = by_name["mtl_init_expr/seed1"]
  assert (run.family, run.seed, run.variant_name) == ("mtl_init_expr", 1, "mtl_init_expr")
  assert run.init_from_variant == "uni_expr/seed1"  # the source of the same seed
  run_config = variants.variant_config(config, run, "/study")
  assert run_config.seed == 1
  assert run_config.init_from.path == "/study/uni_expr/seed1"
  assert variants.variant_workdir("/study", run.name) == "/study/mtl_init_expr/seed1"
  # One seed of a variant can be asked for by its run name.
  assert [v.name for v in variants.plan_study(config, ["mtl/seed2"])] == ["mtl/seed2"]
  # Without seeds, one run per variant in <study_dir>/<name>, at the base seed.
  config.seeds = ()
  assert [v.name for v in variants.plan_study(config, ["mtl"])] == ["mtl"]


def test_every_run_lands_in_one_shard_with_the_runs_it_warm_starts_from():
  config = seeded_config()
  everything = [v.name for v in variants.plan_study(config)]
  assert len(everything) == len(set(everything)) == 3 * len(config.variants)
  for count in (2, 3, 7):
    shards = [variants.plan_study(config, shard_index=i, shard_count=count)
              for i in range(count)]
    assert sorted(v.name for s in shards for v in s) == sorted(everything)
    for shard in shards:
      names = [v.name for v in shard]
      for position, run in enumerate(shard):
        if run.init_from_variant:
          assert run.init_from_variant in names[:position]


def test_shards_share_each_variants_seeds():
  """No variant is one machine's alone (a machine's numerics would pass for the
  variant's effect), and each shard runs its share seed by seed."""
  config = seeded_config()
  for count in (2, 3):
    shards = [variants.plan_study(config, shard_index=i, shard_count=count)
              for i in range(count)]
    for family in {run.family for shard in shards for run in shard}:
      holders = [i for i, shard in enumerate(shards)
                 if any(run.family == family for run in shard)]
      assert len(holders) > 1, (family, count)
    for shard in shards:
      seeds_in_order = [run.seed for run in shard if not run.init_from_variant]
      assert seeds_in_order == sorted(seeds_in_order)


def test_seed_lists_are_written_as_ranges():
  assert seeds.seed_ranges([3, 0, 1, 2, 7, 9, 10]) == "0-3, 7, 9-10"
  assert seeds.seed_ranges([5]) == "5"
  assert seeds.seed_ranges([]) == ""


def test_the_mean_curve_averages_the_steps_every_seed_logged():
  curves = [[(1, 1.0), (2, 3.0), (3, 2.0)], [(1, 3.0), (2, 5.0)]]
  assert seeds_plots.mean_curve(curves) == [(1, 2.0), (2, 4.0)]  # step 3: one seed
  assert seeds_plots.mean_curve(curves[:1]) == []


def test_seed_settings_are_refused_where_they_would_be_ambiguous():
  config = seeded_config()
  config.variants = config.variants + (study_configs.variant(
      "mtl_other_seed", "seed", "", {"seed": 7}),)
  with pytest.raises(ValueError, match="mtl_other_seed: overrides seed"):
    variants.study_runs(config)
  config = seeded_config(seed_list=(0, 1, 0))
  with pytest.raises(ValueError, match="distinct"):
    variants.study_runs(config)


def test_temporal_heads_follow_the_chosen_variants_runs():
  config = seeded_config()
  frame_runs = variants.plan_study(config, ["mtl", "uni_au"])
  heads = variants.temporal_runs(config, frame_runs)
  assert [(h.name, h.seed, h.family) for h in heads] == [
      ("mtl_temporal/seed0", 0, "mtl_temporal"),
      ("mtl_temporal/seed1", 1, "mtl_temporal"),
      ("mtl_temporal/seed2", 2, "mtl_temporal")]
  head_config = variants.temporal_config(config, frame_runs[-1], "/study")
  assert head_config.frame_run.workdir == "/study/mtl/seed2"
  assert head_config.frame_run.step == STEPS  # the step the report scores mtl at
  assert head_config.seed == 2


# ------------------------------------------------ skip, resume, refusal per seed run

def fake_finished_run(workdir, steps=STEPS, scores=None):
  """What is_finished looks for: the final step evaluated and checkpointed."""
  os.makedirs(os.path.join(workdir, "checkpoints", str(steps)), exist_ok=True)
  append_json_line(os.path.join(workdir, METRICS_FILE),
                   {"step": steps, "split": "validation", "mode": "train",
                    **(scores or {"expr_f1": 0.5})})


def test_an_unfinished_run_counts_in_no_mean(tmp_path):
  """A run stopped early (killed, or a pruned trial) logged its latest scores at fewer
  steps than its variant's other seeds: the mean and sd are over finished seeds."""
  config = seeded_config(seed_list=(0, 1, 2))
  study_dir = str(tmp_path)
  for seed, steps, f1 in ((0, STEPS, 0.8), (1, STEPS // 2, 0.2), (2, STEPS, 0.6)):
    fake_finished_run(variants.variant_workdir(study_dir, f"uni_expr/seed{seed}"),
                      steps, {"expr_f1": f1})
  groups = seeds.group_by_variant(report.collect_results(config, study_dir))
  row, = seeds.summary_rows(groups, ["expr_f1"], seeds.finished_score)
  assert (row["runs"], row["expr_f1_n"]) == (3, 2)
  assert float(row["expr_f1_mean"]) == pytest.approx(0.7)
  assert report.seeds_text(groups["uni_expr"]) == "0, 2 (unfinished: 1)"


def test_skip_resume_and_refusal_hold_per_seed_run(tmp_path):
  config = seeded_config()
  study_dir = str(tmp_path)
  trained = []

  def interrupt_seed1(run_config, workdir):
    if run_config.seed == 1:
      raise KeyboardInterrupt
    trained.append(os.path.relpath(workdir, study_dir))
    fake_finished_run(workdir)

  with pytest.raises(KeyboardInterrupt):
    runner.run_study(config, study_dir, ["uni_expr"], train_fn=interrupt_seed1)
  assert trained == ["uni_expr/seed0"]

  def finish(run_config, workdir):
    trained.append(os.path.relpath(workdir, study_dir))
    fake_finished_run(workdir)

  outcomes = runner.run_study(config, study_dir, ["uni_expr"], train_fn=finish)
  assert outcomes == {"uni_expr/seed0": "skipped", "uni_expr/seed1": "trained",
                      "uni_expr/seed2": "trained"}
  record = variants.read_run_record(os.path.join(study_dir, "uni_expr", "seed1"))
  assert [s["outcome"] for s in record["sessions"]] == [
      "interrupted (KeyboardInterrupt)", "finished"]
  assert record["settings"]["seed"] == 1
  changed = seeded_config()
  changed.base.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match="uni_expr/seed0: .*optimizer.learning_rate"):
    runner.run_study(changed, study_dir, ["uni_expr"], train_fn=finish)


def test_each_run_of_a_chosen_variant_is_followed_by_its_temporal_head(tmp_path):
  config = seeded_config(seed_list=(0, 1))
  study_dir = str(tmp_path)
  heads = []

  def finish(run_config, workdir):
    fake_finished_run(workdir)

  def finish_head(head_config, workdir):
    heads.append((os.path.relpath(workdir, study_dir),
                  os.path.relpath(head_config.frame_run.workdir, study_dir),
                  head_config.seed))
    fake_finished_run(workdir, head_config.num_train_steps)

  outcomes = runner.run_study(config, study_dir, ["mtl"], train_fn=finish,
                              temporal_train_fn=finish_head)
  assert list(outcomes.items()) == [
      ("mtl/seed0", "trained"), ("mtl_temporal/seed0", "trained"),
      ("mtl/seed1", "trained"), ("mtl_temporal/seed1", "trained")]
  assert heads == [("mtl_temporal/seed0", "mtl/seed0", 0),
                   ("mtl_temporal/seed1", "mtl/seed1", 1)]
  again = runner.run_study(config, study_dir, ["mtl"], train_fn=finish,
                           temporal_train_fn=finish_head)
  assert set(again.values()) == {"skipped"} and len(heads) == 2


# ------------------------------------------------------------------- mean ± sd

def test_mean_and_sample_sd_over_seeds():
  value = seeds.spread([0.25, None, 0.5, 0.75])  # a run without the score is left out
  assert value.count == 3
  assert value.mean == pytest.approx(np.mean([0.25, 0.5, 0.75]))
  assert value.sd == pytest.approx(np.std([0.25, 0.5, 0.75], ddof=1))
  assert value.text() == "0.5000 ± 0.2500"
  assert seeds.spread([0.3]).sd is None and seeds.spread([0.3]).text() == "0.3000"
  assert seeds.spread([None, None]) is None


# ------------------------------------------------------- bootstrap over videos

def confusions(rng, videos, classes, accuracy):
  """[V, K, K] expression confusion counts of a model right `accuracy` of the time."""
  result = np.zeros((videos, classes, classes), np.int64)
  for v in range(videos):
    labels = rng.integers(0, classes, 30)
    right = rng.random(30) < accuracy
    predicted = np.where(right, labels, rng.integers(0, classes, 30))
    np.add.at(result[v], (labels, predicted), 1)
  return result


def numpy_macro_f1(confusion):
  tp = np.diag(confusion).astype(float)
  precision_denominator = confusion.sum(0)
  recall_denominator = confusion.sum(1)
  f1 = np.zeros(len(tp))
  both = precision_denominator + recall_denominator
  f1[both > 0] = 2 * tp[both > 0] / both[both > 0]
  return f1.mean()


def numpy_paired_interval(runs_a, runs_b, replicates, seed, confidence=0.95):
  """The same resamples of videos (the generator's draws in the same order), each
  side's macro F1 from summed confusions averaged over its seeds, percentiles."""
  videos = len(runs_a[0])
  rng = np.random.default_rng(seed)
  differences = []
  for _ in range(replicates):
    weights = np.bincount(rng.integers(0, videos, videos), minlength=videos)
    side = lambda runs: np.mean([numpy_macro_f1(np.tensordot(weights, c, 1))  # noqa: E731
                                 for c in runs])
    differences.append(side(runs_a) - side(runs_b))
  tail = (1 - confidence) / 2 * 100
  return np.percentile(differences, [tail, 100 - tail])


def test_bootstrap_interval_equals_an_independent_numpy_computation():
  rng = np.random.default_rng(3)
  runs_a = [confusions(rng, 8, 4, 0.6) for _ in range(2)]
  runs_b = [confusions(rng, 8, 4, 0.5) for _ in range(3)]
  statistics = {"a": {i: {"expr_confusion": c} for i, c in enumerate(runs_a)},
                "b": {i: {"expr_confusion": c} for i, c in enumerate(runs_b)}}
  planned = [("variant − baseline", "a", "b", "expr_f1")]
  comparison, = intervals.compare_variants(statistics, planned, {}, replicates=200,
                                           seed=5)
  low, high = numpy_paired_interval(runs_a, runs_b, 200, seed=5)
  result = comparison.result
  assert (result["low"], result["high"]) == (pytest.approx(low), pytest.approx(high))
  whole = lambda runs: np.mean([numpy_macro_f1(c.sum(0)) for c in runs])  # noqa: E731
  assert result["difference"] == pytest.approx(whole(runs_a) - whole(runs_b))
  assert result["videos"] == 8


def test_a_difference_is_clear_of_noise_only_when_its_interval_excludes_zero():
  rng = np.random.default_rng(0)
  good = {i: {"expr_confusion": confusions(rng, 12, 4, 0.9)} for i in range(3)}
  weak = {i: {"expr_confusion": confusions(rng, 12, 4, 0.1)} for i in range(3)}
  also_weak = {i: {"expr_confusion": confusions(rng, 12, 4, 0.1)} for i in range(3)}
  planned = [("s", "good", "weak", "expr_f1"), ("s", "weak", "good", "expr_f1"),
             ("s", "also_weak", "weak", "expr_f1")]
  better, worse, same = intervals.compare_variants(
      {"good": good, "weak": weak, "also_weak": also_weak}, planned, {}, replicates=300)
  assert better.result["clear"] and better.result["low"] > 0
  assert worse.result["clear"] and worse.result["high"] < 0
  assert not same.result["clear"]
  assert same.result["low"] < 0 < same.result["high"]
  rows = intervals.comparison_table([better, worse, same], {})[2:]
  assert rows[0].endswith("| **clear: a better** |")
  assert rows[1].endswith("| **clear: b better** |")
  assert rows[2].endswith("| within noise |")


def test_the_seed_interval_is_welchs_and_clear_needs_both_intervals():
  a, b = [0.52, 0.61, 0.58, 0.49], [0.41, 0.47, 0.39]
  expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  low, high = intervals.welch_interval(a, b)
  assert (low, high) == (pytest.approx(expected.low), pytest.approx(expected.high))
  assert intervals.welch_interval([0.5], b) is None
  # A temporal head and its frame run share their seed: paired by seed.
  expected = stats.ttest_rel(a[:3], b).confidence_interval(0.95)
  low, high = intervals.paired_interval(a[:3], b)
  assert (low, high) == (pytest.approx(expected.low), pytest.approx(expected.high))
  videos_clear = {"clear": True, "low": 0.02, "high": 0.2, "difference": 0.1}
  both = intervals.Comparison("s", "a", "b", "p_mtl", videos_clear, (0.01, 0.3))
  videos_only = intervals.Comparison("s", "a", "b", "p_mtl", videos_clear, (-0.1, 0.3))
  one_seed = intervals.Comparison("s", "a", "b", "p_mtl", videos_clear, None)
  assert both.clear and intervals.verdict(both) == "**clear: a better**"
  assert not videos_only.clear
  assert intervals.verdict(videos_only) == "over videos only: a better"
  assert not one_seed.clear


def test_a_temporal_head_is_compared_with_its_own_frame_runs_only():
  """Frame runs at seeds without a temporal head (seed 2, here far better) take no part
  in the temporal − frame difference: both sides are the seeds both ran, paired."""
  rng = np.random.default_rng(4)
  frame = {k: {"expr_confusion": confusions(rng, 8, 4, q)}
           for k, q in ((0, 0.3), (1, 0.4), (2, 0.95))}
  head = {k: {"expr_confusion": confusions(rng, 8, 4, q)} for k, q in ((0, 0.5), (1, 0.6))}
  planned = [("temporal − frame", "head", "frame", "expr_f1")]
  comparison, = intervals.compare_variants({"head": head, "frame": frame}, planned, {},
                                           replicates=50)
  scores = lambda runs: [numpy_macro_f1(r["expr_confusion"].sum(0))  # noqa: E731
                         for r in runs]
  head_scores, frame_scores = scores(head.values()), scores([frame[0], frame[1]])
  assert comparison.seeds == (2, 2)
  assert comparison.result["b"] == pytest.approx(np.mean(frame_scores))
  assert comparison.result["difference"] == pytest.approx(
      np.mean(head_scores) - np.mean(frame_scores))
  expected = stats.ttest_rel(head_scores, frame_scores).confidence_interval(0.95)
  assert comparison.seed_interval == (pytest.approx(expected.low),
                                      pytest.approx(expected.high))
  row, = intervals.comparison_table([comparison], {})[2:]
  assert "| 2 / 2 |" in row


@functools.lru_cache(maxsize=None)
def statistics_fn(tasks):
  """metrics.batch_statistics compiled once per set of tasks (eager ops compile one
  by one)."""
  return jax.jit(lambda outputs, batch: metrics.batch_statistics(
      {k: v for k, v in outputs.items() if k in tasks}, batch, num_expr_classes=8,
      num_histogram_bins=0))


def video_statistics(rng, videos, tasks, quality):
  """[V, ...] statistics of a model whose outputs follow the labels by `quality`."""
  per_video = []
  for _ in range(videos):
    n = 20
    expression = rng.integers(0, 8, n)
    au = (rng.random((n, 12)) < 0.3).astype(np.float32)
    va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    noise = lambda *shape: rng.normal(0, 1, shape).astype(np.float32)  # noqa: E731
    outputs = {"expression": quality * 4 * np.eye(8, dtype=np.float32)[expression]
               + noise(n, 8),
               "au": quality * 4 * (au - 0.5) + noise(n, 12),
               "va": np.clip(quality * va + 0.5 * noise(n, 2), -1, 1)}
    batch = {"expression": expression.astype(np.int32),
             "expression_mask": np.ones(n, np.float32), "au": au,
             "au_mask": np.ones((n, 12), np.float32), "valence_arousal": va,
             "va_mask": np.ones(n, np.float32)}
    statistics = statistics_fn(tuple(tasks))(outputs, batch)
    per_video.append({k: to_host(v) for k, v in statistics.items()})
  return {k: np.stack([s[k] for s in per_video]) for k in per_video[0]}


def test_the_uni_task_models_together_score_the_sum_of_their_task_scores():
  rng = np.random.default_rng(1)
  uni = {"expression": {0: video_statistics(rng, 5, ("expression",), 0.5)},
         "au": {0: video_statistics(rng, 5, ("au",), 0.5)},
         "va": {0: video_statistics(rng, 5, ("va",), 0.5)}}
  combined, = intervals.combined_uni_task_runs(uni)
  def whole(statistics):
    return metrics.compute_scores({k: v.sum(0) for k, v in statistics.items()})

  expected = (whole(uni["expression"][0])["expr_f1"] + whole(uni["au"][0])["au_f1"]
              + whole(uni["va"][0])["p_va"])
  assert whole(combined)["p_mtl"] == pytest.approx(expected)


# ------------------------------------------------- the report from fake workdirs

@pytest.fixture(scope="module")
def fake_seeded_study(tmp_path_factory):
  """uni_expr, uni_au, uni_va, mtl and mtl's temporal heads, three seeds, as finished
  workdirs with logged scores and cached per-video statistics: mtl far better than the
  uni-task models, the temporal heads as good as mtl."""
  study_dir = str(tmp_path_factory.mktemp("seeded_study"))
  config = seeded_config()
  config.report.bootstrap.replicates = 40  # 8 comparisons of 6 runs each
  rng = np.random.default_rng(0)
  quality = {"uni_expr": 0.2, "uni_au": 0.2, "uni_va": 0.2, "mtl": 1.0,
             "mtl_temporal": 1.0}
  runs = variants.plan_study(config, ["uni_expr", "uni_au", "uni_va", "mtl"])
  runs += variants.temporal_runs(config, runs)
  for run in runs:
    workdir = variants.variant_workdir(study_dir, run.name)
    frame_run = run if run.group != "temporal" else None
    tasks = (variants.variant_config(config, frame_run, study_dir).model.tasks
             if frame_run else ("expression", "au", "va"))
    statistics = video_statistics(rng, 10, tasks, quality[run.family])
    scores = metrics.compute_scores({k: v.sum(0) for k, v in statistics.items()})
    fake_finished_run(workdir, config.temporal.base.num_train_steps if not frame_run
                      else STEPS, {k: v for k, v in scores.items()
                                   if isinstance(v, float)})
    intervals.write_cached_statistics(
        workdir, config.temporal.base.num_train_steps if not frame_run else STEPS,
        [f"video{i}" for i in range(10)], statistics)
  return config, study_dir


def test_report_gives_mean_sd_and_marks_what_is_clear(fake_seeded_study, tmp_path):
  config, study_dir = fake_seeded_study
  paths = report.write_study_report(config, study_dir, str(tmp_path))
  with open(paths["summary.csv"], newline="") as f:
    summary = {row["variant"]: row for row in csv.DictReader(f)}
  assert list(summary) == ["uni_expr", "uni_au", "uni_va", "mtl", "mtl_temporal"]
  logged = [json.loads(open(os.path.join(study_dir, "mtl", f"seed{s}",
                                         METRICS_FILE)).readline())["p_mtl"]
            for s in range(3)]
  assert float(summary["mtl"]["p_mtl_mean"]) == pytest.approx(np.mean(logged))
  assert float(summary["mtl"]["p_mtl_sd"]) == pytest.approx(np.std(logged, ddof=1))
  with open(paths["differences.csv"], newline="") as f:
    differences = {(r["a"], r["b"], r["score"]): r for r in csv.DictReader(f)}
  # mtl against the uni-task models: clear on the P_MTL scale; the temporal heads
  # against their frame runs (of the same quality): within noise.
  assert differences[("mtl", "uni-task", "p_mtl")]["clear"] == "True"
  assert float(differences[("mtl", "uni-task", "p_mtl")]["low"]) > 0
  assert float(differences[("mtl", "uni-task", "p_mtl")]["a_mean"]) == pytest.approx(
      np.mean(logged))
  assert differences[("mtl_temporal", "mtl", "p_mtl")]["clear"] == "False"
  assert {r["section"] for r in differences.values()} == {"multi-task − uni-task",
                                                         "temporal − frame"}
  text = open(paths["report.md"]).read()
  mean, sd = np.mean(logged), np.std(logged, ddof=1)
  assert f"{mean:.4f} ± {sd:.4f}" in text
  assert "### multi-task − uni-task" in text and "**clear: a better**" in text
  for plot in ("scores.png", "differences.png", "curves.png"):
    assert os.path.getsize(paths[plot]) > 10_000


def test_cached_statistics_of_another_step_or_layout_are_not_read(tmp_path):
  """A run's cached per-video statistics are read back only for the same checkpoint
  and the same statistics layout (an older VA split would be misread as this one)."""
  workdir = str(tmp_path)
  statistics = {"va_int": np.arange(60, dtype=np.int64).reshape(1, 30, 2)}
  intervals.write_cached_statistics(workdir, 10, ["v0"], statistics)
  videos, read = intervals.read_cached_statistics(workdir, 10)
  assert videos == ["v0"]
  np.testing.assert_array_equal(read["va_int"], statistics["va_int"])
  assert intervals.read_cached_statistics(workdir, 20) is None
  path = os.path.join(workdir, intervals.STATISTICS_FILE)
  with np.load(path) as cached:
    old = {k: cached[k] for k in cached.files if k != "layout"}
  np.savez(path, **old)  # written before the layout was recorded
  assert intervals.read_cached_statistics(workdir, 10) is None
