"""The largest per-chip batch whose step fits, found with few compiles.

HBM per chip grows about linearly with the batch (the state is fixed, activations and
the batch grow per image), so one compile predicts where the limit lies. The search
starts at the largest power of two under that prediction, doubles (or halves) until
one power of two fits and the next does not, then bisects between them on multiples of
`granularity` while compiles remain. Each probe is one full compile; `max_compiles`
bounds them (the first compile, made before the search, is not counted). What it
reports says how close the answer is: the largest batch known to fit and the smallest
known not to.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class Probe:
  per_chip_batch: int
  fits: bool
  hbm_bytes: int | None  # used, or needed when it does not fit (None: not said)


@dataclasses.dataclass
class SearchResult:
  largest_fitting: int | None  # per-chip batch
  smallest_failing: int | None  # None: none found within the compiles
  compiles: int
  probes: list[Probe]

  def as_json(self) -> dict:
    return {"largest_per_chip_batch": self.largest_fitting,
            "smallest_failing_per_chip_batch": self.smallest_failing,
            "search_compiles": self.compiles,
            "search_probes": [dataclasses.asdict(p) for p in self.probes]}


def round_down(value: float, granularity: int) -> int:
  return max(granularity, int(value) // granularity * granularity)


def largest_power_of_two_under(value: float, floor: int) -> int:
  power = floor
  while power * 2 <= value:
    power *= 2
  return power


def predicted_limit(first: Probe, fixed_bytes: int, usable_bytes: int) -> float:
  """The batch at which HBM use, linear from `fixed_bytes` through the first probe,
  reaches `usable_bytes`."""
  per_image = max(first.hbm_bytes - fixed_bytes, 1) / first.per_chip_batch
  return (usable_bytes - fixed_bytes) / per_image


def search_largest_batch(measure: Callable[[int], Probe], first: Probe,
                         fixed_bytes: int, usable_bytes: int, *,
                         granularity: int = 8, max_compiles: int = 4) -> SearchResult:
  """See the module docstring. `measure(batch)` compiles at a per-chip batch; `first`
  is a probe already made; `fixed_bytes` the part of its HBM use that does not grow
  with the batch."""
  probes = {first.per_chip_batch: first}
  compiles = 0

  def bounds():
    fitting = [b for b, p in probes.items() if p.fits]
    failing = [b for b, p in probes.items() if not p.fits]
    return max(fitting, default=None), min(failing, default=None)

  def probe(batch: int) -> bool:
    nonlocal compiles
    if batch not in probes:
      probes[batch] = measure(batch)
      compiles += 1
    return probes[batch].fits

  batch = first.per_chip_batch
  if first.hbm_bytes:
    batch = largest_power_of_two_under(
        predicted_limit(first, fixed_bytes, usable_bytes), granularity)
  # Doubling (or halving) until two powers of two apart at most.
  while compiles < max_compiles and granularity <= batch:
    low, high = bounds()
    if low is not None and high is not None and high <= 2 * low:
      break
    batch = batch * 2 if probe(batch) else batch // 2
  # Bisection on multiples of the granularity.
  while compiles < max_compiles:
    low, high = bounds()
    if low is None or high is None or high - low <= granularity:
      break
    probe(round_down((low + high) / 2, granularity))
  low, high = bounds()
  return SearchResult(low, high, compiles,
                      [probes[b] for b in sorted(probes)])
