"""Which differences between a study's variants are clear of noise: each run's
per-video statistics on the validation split (from its final checkpoint's per-frame
predictions, cached in its workdir), and paired differences of exact scores with
bootstrap intervals over the validation videos (affect_jax.temporal.compare), for
multi-task minus uni-task, each variant minus the baseline, and temporal minus frame
model. A variant given as several seeds scores the mean of its seeds on each resample.

The video bootstrap holds the trained networks fixed: it says how much the difference
depends on which videos are scored, not how much it would move with other seeds. So
each difference also gets a t interval over the seeds' whole-split scores (Welch's
for two sets of networks; paired by seed for a temporal head and the frame run whose
embeddings it was trained on), and is called clear only when both intervals exclude 0
(the seed interval needs two seeds a side)."""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Sequence

import numpy as np
from scipy import stats

from affect_jax.eval import metrics
from affect_jax.temporal import compare
from affect_jax.study.seeds_plots import SCORE_COLUMNS
from affect_jax.vocabulary import TASK_SCORE, TASKS, compared_scores

log = logging.getLogger(__name__)

STATISTICS_FILE = "study_validation_statistics.npz"  # in each run's workdir
SCORE_LABELS = dict(SCORE_COLUMNS)
# The statistics of each task (metrics.batch_statistics names them by these prefixes).
TASK_STATISTICS_PREFIX = {"expression": "expr_", "au": "au_", "va": "va_"}


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Variant a minus variant b on one score, over their runs' common videos."""
  section: str  # "multi-task − uni-task", "variant − baseline", "temporal − frame"
  a: str
  b: str
  score: str
  result: dict  # compare.paired_difference's
  seed_interval: tuple[float, float] | None = None  # t interval over the seeds' scores
  seeds: tuple[int, int] = (0, 0)  # the runs (seeds) on each side

  @property
  def clear(self) -> bool:
    """Both intervals exclude 0, on the same side."""
    if self.seed_interval is None or not self.result["clear"]:
      return False
    low, high = self.seed_interval
    return (low > 0) == (self.result["low"] > 0) and (low > 0 or high < 0)


# ------------------------------------------------------------ per-video statistics

def read_cached_statistics(workdir: str, step: int
                           ) -> tuple[list[str], compare.Statistics] | None:
  path = os.path.join(workdir, STATISTICS_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as cached:
    if (int(cached["step"]) != step or "layout" not in cached.files
        or str(cached["layout"]) != metrics.STATISTICS_LAYOUT):
      return None
    videos = cached["videos"].tolist()
    return videos, {k[len("statistic/"):]: cached[k] for k in cached.files
                    if k.startswith("statistic/")}


def write_cached_statistics(workdir: str, step: int, videos: Sequence[str],
                            statistics: compare.Statistics) -> None:
  path = os.path.join(workdir, STATISTICS_FILE)
  # A file of its own: reports of two processes (or machines) may both write it.
  handle, temporary = tempfile.mkstemp(dir=workdir, prefix=STATISTICS_FILE,
                                       suffix=".tmp")
  with os.fdopen(handle, "wb") as f:
    np.savez(f, step=step, layout=metrics.STATISTICS_LAYOUT,
             videos=np.asarray(videos, dtype=str),
             **{f"statistic/{k}": v for k, v in statistics.items()})
  os.replace(temporary, path)


def predicted_table(config, workdir: str, step: int, temporal: bool):
  """Every frame of the eval split predicted by the run's checkpoint `step`."""
  if temporal:
    from affect_jax.temporal import prediction  # pylint: disable=g-import-not-at-top
    return prediction.predict_eval_split(config, workdir, step)[0]
  from affect_jax.inference import frame_table  # pylint: disable=g-import-not-at-top
  return frame_table.predict_split(config, workdir, config.dataset.eval_split, step)


def run_statistics(config, workdir: str, step: int, temporal: bool = False
                   ) -> tuple[list[str], compare.Statistics]:
  """The run's per-video statistics at checkpoint `step` on the validation split:
  read from its workdir, else predicted, computed and saved there."""
  cached = read_cached_statistics(workdir, step)
  if cached is not None:
    return cached
  log.info("per-frame predictions of %s at step %d", workdir, step)
  table = predicted_table(config, workdir, step, temporal)
  videos, statistics = compare.per_video_statistics(
      table, int(config.model.num_expr_classes))
  # The AU histograms serve threshold tuning only, which no compared score uses; a
  # bootstrap replicate would tune thresholds for nothing.
  statistics.pop("au_hist", None)
  write_cached_statistics(workdir, step, videos, statistics)
  return videos, statistics


# ------------------------------------------------------------------- comparisons

def task_statistics(statistics: compare.Statistics, task: str) -> compare.Statistics:
  prefix = TASK_STATISTICS_PREFIX[task]
  return {k: v for k, v in statistics.items() if k.startswith(prefix)}


def combined_uni_task_runs(uni_runs: dict[str, dict[int, compare.Statistics]]
                           ) -> list[compare.Statistics]:
  """One three-task 'model' per seed that every uni-task variant has: each task's
  statistics from its own uni-task run (the three networks taken together, on the
  P_MTL scale)."""
  seeds = sorted(set.intersection(*(set(runs) for runs in uni_runs.values())))
  return [{k: v for task in TASKS
           for k, v in task_statistics(uni_runs[task][seed], task).items()}
          for seed in seeds]


def restricted_to_common_videos(runs: dict[str, dict[int, tuple[list[str],
                                                                compare.Statistics]]]
                                ) -> dict[str, dict[int, compare.Statistics]]:
  """{variant: {seed: statistics}} over the videos every run holds, in one order."""
  flat = {(name, seed): value for name, by_seed in runs.items()
          for seed, value in by_seed.items()}
  if not flat:
    return {}
  chosen = compare.common_videos(flat)
  restricted: dict[str, dict[int, compare.Statistics]] = {}
  for (name, seed), statistics in chosen.items():
    restricted.setdefault(name, {})[seed] = statistics
  return restricted


def plan_comparisons(tasks: dict[str, tuple[str, ...]], uni_task_baselines: dict,
                     baseline: str, temporal_frame: dict[str, str]
                     ) -> list[tuple[str, str, str, str]]:
  """(section, a, b, score) of every comparison the variants present allow. `tasks`:
  {variant: its tasks}; b may be "uni-task" (the uni-task baselines together)."""
  planned = []
  uni = {task: name for task, name in uni_task_baselines.items() if name in tasks}
  multi = [name for name, t in tasks.items() if len(t) > 1
           and name not in temporal_frame]
  for name in multi:
    for task in TASKS:
      if task in tasks[name] and task in uni:
        planned.append(("multi-task − uni-task", name, uni[task], TASK_SCORE[task]))
    if set(tasks[name]) == set(TASKS) and len(uni) == len(TASKS):
      planned.append(("multi-task − uni-task", name, "uni-task", "p_mtl"))
  if baseline in tasks:
    for name, name_tasks in tasks.items():
      # The uni-task baselines are compared with every multi-task variant above.
      if name == baseline or name in temporal_frame or name in uni.values():
        continue
      for score in compared_scores(name_tasks, tasks[baseline]):
        planned.append(("variant − baseline", name, baseline, score))
  for name, frame in temporal_frame.items():
    if name in tasks and frame in tasks:
      for score in compared_scores(tasks[name], tasks[frame]):
        planned.append(("temporal − frame", name, frame, score))
  return planned


def welch_interval(scores_a: Sequence[float], scores_b: Sequence[float],
                   confidence: float = 0.95) -> tuple[float, float] | None:
  """Welch's t interval of mean(a) − mean(b), the values being one score per seed;
  None with fewer than two values a side."""
  a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if len(a) < 2 or len(b) < 2:
    return None
  var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  difference = a.mean() - b.mean()
  if var_a + var_b == 0:
    return float(difference), float(difference)
  freedom = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
  half = stats.t.ppf(0.5 + confidence / 2, freedom) * np.sqrt(var_a + var_b)
  return float(difference - half), float(difference + half)


def paired_interval(scores_a: Sequence[float], scores_b: Sequence[float],
                    confidence: float = 0.95) -> tuple[float, float] | None:
  """The t interval of the mean of a_k − b_k, k a seed both sides ran; None with
  fewer than two seeds."""
  differences = np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64)
  if len(differences) < 2:
    return None
  mean = differences.mean()
  half = (stats.t.ppf(0.5 + confidence / 2, len(differences) - 1)
          * differences.std(ddof=1) / np.sqrt(len(differences)))
  return float(mean - half), float(mean + half)


PAIRED_BY_SEED = ("temporal − frame",)  # sections whose a and b runs share a seed


def compare_variants(statistics: dict[str, dict[int, compare.Statistics]],
                     planned: Sequence[tuple[str, str, str, str]],
                     uni_task_baselines: dict, *, replicates: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> list[Comparison]:
  """The planned paired differences over the same resampled videos (the same
  generator seed for every comparison, so each draws the same replicates)."""
  uni_runs = {task: statistics[name] for task, name in uni_task_baselines.items()
              if name in statistics}
  combined = (combined_uni_task_runs(uni_runs) if len(uni_runs) == len(TASKS) else [])
  comparisons = []
  for section, a, b, score in planned:
    if section in PAIRED_BY_SEED:
      # Both sides at the seeds both ran: a head is compared with its own frame runs,
      # not with frame runs that have no head.
      shared = sorted(set(statistics[a]) & set(statistics[b]))
      runs_a = [statistics[a][k] for k in shared]
      runs_b = [statistics[b][k] for k in shared]
    else:
      runs_a = list(statistics[a].values())
      runs_b = combined if b == "uni-task" else list(statistics[b].values())
    if not runs_a or not runs_b:
      continue
    result = compare.paired_difference(runs_a, runs_b, score, replicates=replicates,
                                       confidence=confidence, seed=seed)
    seed_scores = [[compare.mean_score([run], score) for run in runs]
                   for runs in (runs_a, runs_b)]
    seed_interval = (paired_interval if section in PAIRED_BY_SEED
                     else welch_interval)(*seed_scores, confidence)
    comparisons.append(Comparison(section, a, b, score, result, seed_interval,
                                  (len(runs_a), len(runs_b))))
  return comparisons


# ------------------------------------------------------------------------ output

def comparison_name(name: str, uni_task_baselines: dict) -> str:
  if name == "uni-task":
    return "uni-task (" + " + ".join(f"`{uni_task_baselines[t]}`" for t in TASKS) + ")"
  return f"`{name}`"


def comparison_table(comparisons: Sequence[Comparison], uni_task_baselines: dict
                     ) -> list[str]:
  """One markdown row per difference: a, b, their seeds and means, a − b with its
  interval over videos and over seeds, and the verdict."""
  lines = ["| a | b | score | seeds a / b | mean a | mean b | a − b | over videos | "
           "over seeds | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
  for c in comparisons:
    r = c.result
    seeds = ("n/a" if c.seed_interval is None else
             "[{:+.4f}, {:+.4f}]".format(*c.seed_interval))
    lines.append(
        f"| {comparison_name(c.a, uni_task_baselines)} | "
        f"{comparison_name(c.b, uni_task_baselines)} | "
        f"{SCORE_LABELS.get(c.score, c.score)} | {c.seeds[0]} / {c.seeds[1]} | "
        f"{r['a']:.4f} | {r['b']:.4f} | "
        f"{r['difference']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | {seeds} | "
        f"{verdict(c)} |")
  return lines


def verdict(c: Comparison) -> str:
  better = "a better" if c.result["difference"] > 0 else "b better"
  if c.clear:
    return f"**clear: {better}**"
  if c.result["clear"]:
    return f"over videos only: {better}"
  return "within noise"


CSV_FIELDS = ("section", "a", "b", "score", "a_seeds", "b_seeds", "a_mean", "b_mean",
              "difference", "low", "high", "clear_over_videos", "seeds_low", "seeds_high",
              "clear", "videos", "replicates", "confidence")


def csv_rows(comparisons: Sequence[Comparison]) -> list[dict]:
  return [{"section": c.section, "a": c.a, "b": c.b, "score": c.score,
           "a_seeds": c.seeds[0], "b_seeds": c.seeds[1],
           "a_mean": repr(c.result["a"]), "b_mean": repr(c.result["b"]),
           "difference": repr(c.result["difference"]), "low": repr(c.result["low"]),
           "high": repr(c.result["high"]), "clear_over_videos": c.result["clear"],
           "seeds_low": "" if c.seed_interval is None else repr(c.seed_interval[0]),
           "seeds_high": "" if c.seed_interval is None else repr(c.seed_interval[1]),
           "clear": c.clear,
           "videos": c.result["videos"], "replicates": c.result["replicates"],
           "confidence": c.result["confidence"]} for c in comparisons]


def plot_differences(comparisons: Sequence[Comparison], uni_task_baselines: dict,
                     path: str, pyplot) -> None:
  """Every difference with its interval, one row each, clear ones drawn darker."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(9, 0.3 * len(comparisons) + 1.5))
  for y, c in enumerate(comparisons):
    r = c.result
    colour = "tab:red" if c.clear else "tab:orange" if r["clear"] else "tab:gray"
    ax.plot([r["low"], r["high"]], [y - 0.12] * 2, color=colour, lw=2.5)
    if c.seed_interval is not None:
      ax.plot(c.seed_interval, [y + 0.12] * 2, color=colour, lw=1, ls="--")
    ax.plot(r["difference"], y, "o", color=colour, ms=4)
  labels = [f"{c.a} − {c.b if c.b != 'uni-task' else 'uni-task models'}: "
            f"{SCORE_LABELS.get(c.score, c.score)}" for c in comparisons]
  ax.set_yticks(range(len(comparisons)), labels, fontsize=7)
  ax.invert_yaxis()
  ax.axvline(0, color="black", lw=0.8)
  confidence = comparisons[0].result["confidence"] if comparisons else 0.95
  ax.set(xlabel=f"a − b; {confidence:.0%} intervals over videos (solid) and seeds "
                "(dashed)\nred: both exclude 0; orange: over videos only")
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
