"""A study's runs grouped by variant: each variant's scores as mean ± standard
deviation over its finished seeds, as a markdown table and CSV rows."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spread:
  """One score of one variant over its seeds."""
  values: tuple[float, ...]  # one per seed, in seed order

  @property
  def count(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def sd(self) -> float | None:
    """The sample standard deviation (n − 1); None for a single seed."""
    return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

  def text(self, digits: int = 4) -> str:
    if self.sd is None:
      return f"{self.mean:.{digits}f}"
    return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def seed_ranges(seeds: Sequence[int]) -> str:
  """Seeds as runs of consecutive numbers: (0, 1, 2, 3, 7, 9, 10) -> '0-3, 7, 9-10'."""
  runs: list[list[int]] = []
  for seed in sorted(seeds):
    if runs and seed == runs[-1][-1] + 1:
      runs[-1].append(seed)
    else:
      runs.append([seed])
  return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def finished_score(run, key: str) -> float | None:
  """A run's score where it finished; None for an unfinished (or pruned) run, whose
  latest evaluation comes from fewer steps than its variant's other seeds."""
  return run.score(key) if run.finished else None


def group_by_variant(runs: Sequence, name: Callable = lambda r: r.variant.variant_name
                     ) -> dict[str, list]:
  """{variant name: its runs}, in the order the variants first appear."""
  groups: dict[str, list] = {}
  for run in runs:
    groups.setdefault(name(run), []).append(run)
  return groups


def spread(values: Sequence[float | None]) -> Spread | None:
  """Mean and sd of the values present; None when none is."""
  present = tuple(float(v) for v in values if v is not None)
  return Spread(present) if present else None


def spreads(runs: Sequence, keys: Sequence[str], score: Callable) -> dict[str, Spread]:
  """{score key: its spread over the runs} for the keys some run has."""
  result = {}
  for key in keys:
    value = spread([score(run, key) for run in runs])
    if value is not None:
      result[key] = value
  return result


def summary_table(groups: dict[str, list], columns: Sequence[tuple[str, str]],
                  score: Callable, seeds: Callable, wall_time: Callable) -> list[str]:
  """| variant | seeds | mean ± sd of each column | wall time |; the best mean of each
  column in bold."""
  table = {name: spreads(runs, [k for k, _ in columns], score)
           for name, runs in groups.items()}
  best = {}
  for key, _ in columns:
    means = [t[key].mean for t in table.values() if key in t]
    if means:
      best[key] = max(means)
  header = ["variant", "seeds", *(label for _, label in columns), "wall time"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, runs in groups.items():
    cells = [f"`{name}`", seeds(runs)]
    for key, _ in columns:
      value = table[name].get(key)
      text = "" if value is None else value.text()
      cells.append(f"**{text}**" if value is not None and value.mean == best[key]
                   else text)
    cells.append(wall_time(runs))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def summary_rows(groups: dict[str, list], keys: Sequence[str], score: Callable
                 ) -> list[dict]:
  """CSV rows: variant, seeds, and each score's mean, sd and count."""
  rows = []
  for name, runs in groups.items():
    row = {"variant": name, "runs": len(runs)}
    table = spreads(runs, keys, score)
    for key in keys:
      value = table.get(key)
      row[f"{key}_mean"] = "" if value is None else repr(value.mean)
      row[f"{key}_sd"] = "" if value is None or value.sd is None else repr(value.sd)
      row[f"{key}_n"] = 0 if value is None else value.count
    rows.append(row)
  return rows
