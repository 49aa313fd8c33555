"""The study's report: each run's logged scores, training losses and wall time
collected from its workdir, and report.md, results.csv (one row per run), summary.csv
(mean ± sd per variant over its seeds), differences.csv (paired differences with
bootstrap intervals over validation videos, study/intervals.py), scores.png,
differences.png and curves.png written from them."""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Sequence

from affect_jax.study import intervals, seeds
from affect_jax.study.seeds_plots import SCORE_COLUMNS, plot_curves, plot_scores, pyplot
from affect_jax.study.variants import (
  Variant,
  format_value,
  is_finished,
  is_optuna_search,
  order_by_dependencies,
  read_commands,
  read_run_record,
  searched_settings_text,
  study_runs,
  study_seeds,
  temporal_config,
  temporal_runs,
  training_evaluations,
  training_losses,
  variant_config,
  variant_workdir,
  wall_time_seconds,
)
from affect_jax.vocabulary import TASKS

CSV_FIELDS = ("variant", "seed", "group", "selection", "step", "final_step", "finished",
              *(key for key, _ in SCORE_COLUMNS), "wall_time_s")


@dataclasses.dataclass
class VariantResult:
  variant: Variant
  config: Any
  workdir: str
  evaluations: list[dict]  # one training-time evaluation per step, in step order
  evaluation: dict | None  # the one the report uses
  losses: list[tuple[int, float]]  # (step, training loss), one per logged step
  finished: bool
  wall_time_s: float | None
  wall_time_complete: bool
  frame_run: Variant | None = None  # the frame run a temporal run's embeddings came from

  @property
  def temporal(self) -> bool:
    return self.frame_run is not None

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.config.model.tasks)

  def score(self, key: str) -> float | None:
    """A logged score; P_MTL only for a model of all three tasks (for a uni-task model
    the logged p_mtl is its one task score, which is not comparable)."""
    if self.evaluation is None or key not in self.evaluation:
      return None
    if key == "p_mtl" and set(self.tasks) != set(TASKS):
      return None
    return float(self.evaluation[key])


def select_evaluation(evaluations: Sequence[dict], selection: str, best_metric: str
                      ) -> dict | None:
  """'last': the evaluation of the highest step. 'best': the highest best_metric, the
  earliest on ties."""
  if not evaluations:
    return None
  if selection == "last":
    return max(evaluations, key=lambda m: m["step"])
  if selection == "best":
    scored = [m for m in evaluations if best_metric in m]
    if not scored:
      return None
    return max(scored, key=lambda m: (m[best_metric], -m["step"]))
  raise ValueError(f"report.selection must be last or best, got {selection!r}")


def collect_results(study_config, study_dir: str) -> list[VariantResult]:
  """Every run of the study that has a workdir, in the study's order, each temporal run
  after its frame run."""
  selection = study_config.report.selection
  results = []
  runs = study_runs(study_config)
  search = study_config.get("search")
  if is_optuna_search(search):
    from affect_jax.study import optuna_search  # pylint: disable=g-import-not-at-top
    runs += optuna_search.trial_variants(study_config, study_dir)
  for run in order_by_dependencies(runs):
    config = variant_config(study_config, run, study_dir)
    results += collect_run(run, config, study_dir, selection)
    for temporal in temporal_runs(study_config, [run]):
      results += collect_run(temporal, temporal_config(study_config, run, study_dir),
                             study_dir, selection, frame_run=run)
  # Runs go seed by seed; the tables list each variant's runs together.
  return [r for runs in seeds.group_by_variant(results).values() for r in runs]


def collect_run(run: Variant, config, study_dir: str, selection: str,
                frame_run: Variant | None = None) -> list[VariantResult]:
  """[the run's result], or [] when it has no workdir."""
  workdir = variant_workdir(study_dir, run.name)
  if not os.path.isdir(workdir):
    return []
  evaluations = training_evaluations(workdir)
  seconds, complete = wall_time_seconds(read_run_record(workdir))
  return [VariantResult(
      variant=run, config=config, workdir=workdir, evaluations=evaluations,
      evaluation=select_evaluation(evaluations, selection,
                                   config.checkpoint.best_metric),
      losses=training_losses(workdir),
      finished=is_finished(workdir, config.num_train_steps),
      wall_time_s=seconds, wall_time_complete=complete, frame_run=frame_run)]


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
           "seed": "" if result.variant.seed is None else result.variant.seed,
           "selection": selection,
           "step": result.evaluation["step"] if result.evaluation else "",
           "final_step": result.config.num_train_steps, "finished": result.finished,
           "wall_time_s": "" if result.wall_time_s is None else result.wall_time_s}
    for key, _ in SCORE_COLUMNS:
      value = result.score(key)
      row[key] = "" if value is None else repr(value)  # repr: the logged float exactly
    rows.append(row)
  return rows


def variant_groups(results: Sequence[VariantResult]) -> dict[str, list[VariantResult]]:
  """{variant name: its runs (one per seed)}, in the study's order."""
  return seeds.group_by_variant(results)


def search_ranking(results: Sequence[VariantResult], search) -> list[str]:
  """The search's trials and their base variant, ranked by the mean of search.metric
  over each one's seeds."""
  if not search or not search.trials:
    return []
  groups = {name: runs for name, runs in variant_groups(results).items()
            if runs[0].variant.group == "search" or name == search.base_variant}
  if not any(runs[0].variant.group == "search" for runs in groups.values()):
    return []  # no trial has run
  metric = {name: seeds.spread([seeds.finished_score(r, search.metric) for r in runs])
            for name, runs in groups.items()}
  ranked = sorted(groups, key=lambda n: -(float("-inf") if metric[n] is None
                                          else metric[n].mean))
  lines = [f"| rank | variant | settings | {search.metric} |", "|---|---|---|---|"]
  for rank, name in enumerate(ranked, 1):
    values = searched_settings_text(groups[name][0].config, search)
    lines.append(f"| {rank} | `{name}` | {values} | "
                 f"{'' if metric[name] is None else metric[name].text()} |")
  return lines


def variants_table(results: Sequence[VariantResult]) -> list[str]:
  lines = ["| variant | group | what changes | overrides of `base` |",
           "|---|---|---|---|"]
  for name, runs in variant_groups(results).items():
    v = runs[0].variant
    # A seed run's own seed is in the seeds column, not an override of the variant.
    shown = [(k, val) for k, val in v.overrides if not (v.family and k == "seed")]
    overrides = ", ".join(f"`{k}={format_value(val)}`" for k, val in shown)
    source = v.init_from_variant.split("/")[0] if v.family else v.init_from_variant
    if source:
      overrides += (", " if overrides else "") + f"init from `{source}`"
    if runs[0].temporal:
      overrides = f"`config.temporal.base` over `{runs[0].frame_run.variant_name}`"
    description = (f"temporal head over `{runs[0].frame_run.variant_name}`'s frame "
                   "embeddings" if runs[0].temporal else v.description)
    lines.append(f"| `{name}` | {v.group} | {description} | {overrides} |")
  return lines


def seeds_text(runs: Sequence[VariantResult]) -> str:
  """The finished seeds of a variant's runs (all of whose scores the summary uses)."""
  if runs[0].variant.seed is None:
    return "base" if runs[0].finished else "unfinished"
  finished = [r.variant.seed for r in runs if r.finished]
  unfinished = [r.variant.seed for r in runs if not r.finished]
  return (seeds.seed_ranges(finished) or "none") + (
      f" (unfinished: {seeds.seed_ranges(unfinished)})" if unfinished else "")


def total_wall_time(runs: Sequence[VariantResult]) -> str:
  seconds = sum(r.wall_time_s or 0.0 for r in runs)
  complete = all(r.wall_time_complete for r in runs)
  minutes, rest = divmod(round(seconds), 60)
  return f"{'' if complete else '≥'}{minutes}:{rest:02d}"


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
  lines = [
      f"- dataset: `{base.dataset.name}`, trained on `{base.dataset.train_split}`, "
      f"scored on `{base.dataset.eval_split}`",
      f"- model: ResNet stages {tuple(base.model.stage_sizes)}, "
      f"{base.model.num_filters} filters, {base.input.image_size}x"
      f"{base.input.image_size} input",
      f"- training: {base.num_train_steps} steps of {base.input.batch_size} images, "
      f"{base.optimizer.name} at {format_value(base.optimizer.learning_rate)} "
      f"({base.optimizer.schedule}, {base.optimizer.warmup_steps} warm-up steps), "
      f"augmentation `{base.input.augment}`",
      f"- seeds: {seeds.seed_ranges(study_seeds(study_config)) or base.seed} "
      "(each seed sets initialisation, data order and augmentation; the seeds column "
      "says which ran for each variant)",
  ]
  temporal = study_config.get("temporal")
  if temporal and temporal.variants and any(r.temporal for r in results):
    t = temporal.base
    lines.append(
        f"- temporal heads: {t.model.kind} ({t.model.hidden_dim} units, "
        f"{'bidirectional' if t.model.bidirectional else 'one direction'}) over windows "
        f"of {t.window.length} frames of the final checkpoint's embeddings of "
        + ", ".join(f"`{v}`" for v in temporal.variants)
        + f", {t.num_train_steps} steps of {t.input.batch_size} windows, seeded as "
        "their frame run")
  lines += [
      f"- scores: {selection_text(study_config.report.selection)}",
      "- wall time: measured by the runner around each training session (compilation, "
      "training and evaluations), summed over sessions and seeds; ≥ marks a session "
      "killed before it could record its end",
      f"- total wall time of the runs shown: {total_wall_time(results)}",
      f"- machine: {'; '.join(sorted(machines)) or 'not recorded'}",
  ]
  return lines


def selection_text(selection: str) -> str:
  if selection == "last":
    return "each variant's last evaluation (its final step once finished)"
  return ("each variant's best evaluation by its own `checkpoint.best_metric`, chosen on "
          "the validation split itself (optimistic)")


def variant_comparisons(study_config, results: Sequence[VariantResult]
                        ) -> list[intervals.Comparison]:
  """Multi-task minus uni-task, each variant minus report.baseline and temporal minus
  frame model, over the finished runs' per-video statistics at their final step."""
  report = study_config.report
  finished = [r for r in results if r.finished]
  tasks = {name: runs[0].tasks for name, runs in variant_groups(finished).items()}
  temporal_frame = {r.variant.variant_name: r.frame_run.variant_name
                    for r in finished if r.temporal}
  baselines = dict(report.uni_task_baselines)
  planned = intervals.plan_comparisons(tasks, baselines, report.get("baseline", ""),
                                       temporal_frame)
  needed = {name for _, a, b, _ in planned for name in (a, b)}
  if "uni-task" in needed:
    needed |= set(baselines.values())
  runs: dict[str, dict] = {}
  for result in finished:
    name = result.variant.variant_name
    if name in needed:
      seed = result.variant.seed if result.variant.seed is not None else 0
      runs.setdefault(name, {})[seed] = intervals.run_statistics(
          result.config, result.workdir, result.config.num_train_steps,
          temporal=result.temporal)
  bootstrap = report.get("bootstrap", {})
  return intervals.compare_variants(
      intervals.restricted_to_common_videos(runs), planned, baselines,
      replicates=bootstrap.get("replicates", 1000),
      confidence=bootstrap.get("confidence", 0.95), seed=bootstrap.get("seed", 0))


def write_csv(path: str, fields: Sequence[str], rows: Sequence[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def differences_section(comparisons: Sequence[intervals.Comparison],
                        baselines: dict) -> list[str]:
  if not comparisons:
    return []
  first = comparisons[0].result
  lines = ["## Differences with intervals", "",
           f"a − b, each side the mean over its seeds (a temporal head and its frame "
           f"model: over the seeds both ran), with two {first['confidence']:.0%}"
           f" intervals. **Over videos**: a percentile bootstrap over the "
           f"{first['videos']} validation videos ({first['replicates']} replicates; "
           "each draws videos with replacement, the same for both sides and all their "
           "seeds, and scores each side exactly on the frames of the drawn videos): "
           "how much the difference depends on which videos are scored, the networks "
           "held fixed. **Over seeds**: a t interval over the seeds' scores on the "
           "whole split (Welch's; paired by seed for a temporal head and the frame run "
           "it was trained on): how much it would move with other seeds. **clear** "
           "marks a difference both intervals put on the same side of 0; *over videos "
           "only* one the seeds do not resolve; *within noise* one neither resolves. The "
           "uni-task side of P_MTL is the three uni-task models taken together (per "
           "seed, each task from its own network). Every number is in "
           "[differences.csv](differences.csv).", ""]
  for section in dict.fromkeys(c.section for c in comparisons):
    lines += [f"### {section}", "", *intervals.comparison_table(
        [c for c in comparisons if c.section == section], baselines), ""]
  lines += ["![differences and their intervals](differences.png)", ""]
  return lines


def write_study_report(study_config, study_dir: str, report_dir: str | None = None,
                       title: str = "Study") -> dict[str, str]:
  """report.md, results.csv, summary.csv, differences.csv, scores.png, differences.png
  and curves.png in report_dir (default <study_dir>/report); returns their paths."""
  report_dir = report_dir or os.path.join(study_dir, "report")
  os.makedirs(report_dir, exist_ok=True)
  results = collect_results(study_config, study_dir)
  selection = study_config.report.selection
  paths = {name: os.path.join(report_dir, name)
           for name in ("report.md", "results.csv", "summary.csv", "differences.csv",
                        "scores.png", "differences.png", "curves.png")}
  write_csv(paths["results.csv"], CSV_FIELDS, csv_rows(results, selection))
  groups = variant_groups(results)
  keys = [key for key, _ in SCORE_COLUMNS]
  summary_fields = ["variant", "runs"] + [f"{k}_{part}" for k in keys
                                          for part in ("mean", "sd", "n")]
  score = seeds.finished_score
  write_csv(paths["summary.csv"], summary_fields,
            seeds.summary_rows(groups, keys, score))
  baselines = dict(study_config.report.uni_task_baselines)
  comparisons = variant_comparisons(study_config, results)
  write_csv(paths["differences.csv"], intervals.CSV_FIELDS,
            intervals.csv_rows(comparisons))
  if comparisons:
    intervals.plot_differences(comparisons, baselines, paths["differences.png"],
                               pyplot)
  lines = [f"# {title}", "", *setup_lines(study_config, results), "",
           "## Scores", "",
           "Validation scores, mean ± standard deviation over each variant's seeds "
           "(the sd of n − 1); the best mean of each column in bold. P_MTL = P_VA + "
           "EXPR F1 + AU F1, shown for the three-task models only. Means and sds are "
           "in [summary.csv](summary.csv).", "",
           *seeds.summary_table(groups, SCORE_COLUMNS, score, seeds_text,
                                total_wall_time), "",
           *differences_section(comparisons, baselines)]
  search = study_config.get("search")
  if is_optuna_search(search):
    from affect_jax.study import optuna_search  # pylint: disable=g-import-not-at-top
    lines += optuna_search.report_section(study_config, study_dir, results)
  elif ranking := search_ranking(results, search):
    lines += ["## Hyper-parameter search", "",
              f"{search.kind} search, {search.trials} trials (seed {search.seed}) over "
              + ", ".join(f"`{k}` ∈ {{{', '.join(format_value(v) for v in values)}}}"
                          for k, _, values in search.space)
              + f", each on top of `{search.base_variant}` (ranked with it by "
              f"the mean {search.metric}).", "", *ranking, ""]
  plot_scores(results, paths["scores.png"])
  plot_curves(results, paths["curves.png"])
  lines += ["## Plots", "", "![scores per variant](scores.png)", "",
            "![training loss and validation curves](curves.png)", "",
            "## Every run", "",
            "Each run's scores; the best of each column in bold. Every number is in "
            "[results.csv](results.csv), copied from the runs' `metrics.jsonl`.", "",
            # Folded: a study of many seeds has hundreds of runs.
            f"<details><summary>{len(results)} runs</summary>", "",
            *results_table(results), "", "</details>", "",
            "## Variants", "", *variants_table(results), ""]
  commands = read_commands(study_dir)
  if commands:
    lines += ["## Commands", "", "Invocations of the runner on this study directory, "
              "in order:", "", f"<details><summary>{len(commands)} invocations"
              "</summary>", "", "```", *commands, "```", "", "</details>", ""]
  with open(paths["report.md"], "w") as f:
    f.write("\n".join(lines))
  return paths
