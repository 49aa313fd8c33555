"""The study's report: each variant's logged scores, training losses and wall time
collected from its workdir, and report.md, results.csv, scores.png and curves.png
written from them (tables of scores, multi-task minus uni-task, seed spread, search
ranking, plots)."""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Sequence

from affect_jax.study.variants import (
  Variant,
  config_value,
  format_value,
  is_finished,
  order_by_dependencies,
  read_commands,
  read_run_record,
  study_variants,
  training_evaluations,
  training_losses,
  variant_config,
  variant_workdir,
  wall_time_seconds,
)
from affect_jax.vocabulary import TASK_SCORE, TASKS

SCORE_COLUMNS = (("p_va", "P_VA"), ("ccc_valence", "CCC_v"), ("ccc_arousal", "CCC_a"),
                 ("expr_f1", "EXPR F1"), ("au_f1", "AU F1"), ("p_mtl", "P_MTL"))
CSV_FIELDS = ("variant", "group", "selection", "step", "final_step", "finished",
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
        losses=training_losses(workdir),
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
  header = [*(f"{TASK_SCORE[t]} − `{baselines[t]}`" for t in TASKS),
            "P_MTL − uni-task sum"]
  lines = ["| variant | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
  uni_sum = None
  if all(uni.get(t) and uni[t].score(TASK_SCORE[t]) is not None for t in TASKS):
    uni_sum = sum(uni[t].score(TASK_SCORE[t]) for t in TASKS)
  for result in results:
    if len(result.tasks) < 2:
      continue
    cells = []
    for task in TASKS:
      mine = result.score(TASK_SCORE[task])
      theirs = uni[task].score(TASK_SCORE[task]) if uni.get(task) else None
      cells.append("" if mine is None or theirs is None else f"{mine - theirs:+.4f}")
    p_mtl = result.score("p_mtl")
    cells.append("" if p_mtl is None or uni_sum is None else f"{p_mtl - uni_sum:+.4f}")
    lines.append(f"| `{result.variant.name}` | " + " | ".join(cells) + " |")
  if uni_sum is not None:
    lines += ["", "The three uni-task models together ("
              + " + ".join(f"`{baselines[t]}`" for t in TASKS)
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
  lines = ["| variant | group | what changes | overrides of `base` |",
           "|---|---|---|---|"]
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


def pyplot():
  """matplotlib's pyplot drawing to files; imported on first use, so that training
  through the runner does not load it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_scores(results: Sequence[VariantResult], path: str) -> None:
  """One horizontal bar chart per score; the best bar in each is drawn darker."""
  plt = pyplot()
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
  plt = pyplot()
  panels = [("train/loss", "training loss (scales differ between losses)")]
  panels += [(key, f"validation {label}") for key, label in SCORE_COLUMNS
             if key not in ("ccc_valence", "ccc_arousal")]
  fig, grid = plt.subplots(2, 3, figsize=(16, 9))
  axes = grid.flat[:len(panels)]
  colours = plt.get_cmap("tab20")
  for index, result in enumerate(results):
    style = {"color": colours(index % 20), "label": result.variant.name,
             "ls": "--" if len(result.tasks) == 1 else "-"}
    if result.losses:
      axes[0].plot(*zip(*result.losses), lw=1, **style)
    for ax, (key, _) in zip(axes[1:], panels[1:]):
      points = [(m["step"], m[key]) for m in result.evaluations if key in m]
      if key == "p_mtl" and set(result.tasks) != set(TASKS):
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


def write_study_report(study_config, study_dir: str, report_dir: str | None = None,
                       title: str = "Study") -> dict[str, str]:
  """report.md, results.csv, scores.png and curves.png in report_dir (default
  <study_dir>/report); returns their paths."""
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
