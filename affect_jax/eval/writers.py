"""Where a run's numbers go and how they are read back: TensorBoard event files
(tensorboardX, no TensorFlow) for people; `<workdir>/metrics.jsonl` (one JSON line per
evaluation) and `<workdir>/scalars.jsonl` (one JSON line per logged training step) for
reports; the console's progress line (steps/s, ETA) and how long training waits for its
input. Only process 0 writes.

A session that starts from step S first drops the lines of steps after S from both
files (`MetricWriter.start_at`): a session killed after logging a step but before that
step's checkpoint was complete (a kill during a save) logged steps the resumed session
logs again, and the files hold each step once. `drop_superseded` does the same for a
reader of files written before a session dropped anything.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Iterable, TypeVar

import jax

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
SCALARS_FILE = "scalars.jsonl"
SHOWN_SCORES = ("p_va", "ccc_valence", "ccc_arousal", "expr_f1", "au_f1", "p_mtl")
Point = TypeVar("Point")


class MetricWriter:
  """A run's scalars and evaluations, to TensorBoard and to the workdir's JSONL files."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._metrics_path = os.path.join(workdir, METRICS_FILE)
    self._scalars_path = os.path.join(workdir, SCALARS_FILE)
    self._tensorboard = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def start_at(self, step: int) -> None:
    """A session starting from `step` (its checkpoint's, 0 for a new run): the lines
    of later steps were written by a session that did not checkpoint them, and this
    session writes them again."""
    if not self._enabled:
      return
    for path in (self._metrics_path, self._scalars_path):
      dropped = drop_lines_after(path, step)
      if dropped:
        log.info("%s: dropped %d lines of steps after %d, logged by a session that "
                 "stopped before their checkpoint", path, dropped, step)

  def write_scalars(self, step: int, values: dict, prefix: str) -> None:
    """To TensorBoard and as one line of scalars.jsonl, keyed by TensorBoard tag
    (`train/loss`)."""
    if not self._enabled:
      return
    tagged = {f"{prefix}/{name}": value for name, value in values.items()}
    self._add_to_tensorboard(step, tagged)
    append_json_line(self._scalars_path, {"step": step, "time": time.time(), **tagged})

  def write_scores(self, step: int, split: str, scores: dict, mode: str = "train"
                   ) -> None:
    """Scalars to TensorBoard; every score (lists too) as one line of metrics.jsonl."""
    if not self._enabled:
      return
    scalars = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    self._add_to_tensorboard(step, {f"{split}/{k}": v for k, v in scalars.items()})
    self._tensorboard.flush()
    append_json_line(self._metrics_path, {"step": step, "split": split, "mode": mode,
                                          "time": time.time(), **scores})
    shown = ", ".join(f"{k}={scalars[k]:.4f}" for k in SHOWN_SCORES if k in scalars)
    log.info("step %d %s: %s", step, split, shown)

  def _add_to_tensorboard(self, step: int, tagged: dict) -> None:
    for tag, value in tagged.items():
      self._tensorboard.add_scalar(tag, value, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def append_json_line(path: str, record: dict) -> None:
  """Appends one line. A line cut short by a killed writer is ended first, so it spoils
  only itself (readers skip it), not the line appended after it."""
  text = json.dumps(record) + "\n"
  with open(path, "a+b") as f:
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        text = "\n" + text
    f.write(text.encode())


def _step_of(line: bytes) -> int | None:
  """The step of one JSONL line, None for a line cut short by a killed writer."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def drop_lines_after(path: str, step: int) -> int:
  """Removes the lines of steps after `step` from a JSONL file, atomically (a kill
  leaves the old file or the new one); returns how many. Lines cut short are kept:
  readers skip them and say so."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    later = sum(1 for line in f if (_step_of(line) or 0) > step)
  if not later:
    return 0
  with open(path, "rb") as f, open(path + ".tmp", "wb") as kept:
    for line in f:
      if (_step_of(line) or 0) <= step:
        kept.write(line if line.endswith(b"\n") else line + b"\n")
  os.replace(path + ".tmp", path)
  return later


def read_json_lines(path: str) -> list[dict]:
  """Every line of a JSONL file in written order, without lines cut short by a kill."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        log.warning("%s line %d is incomplete (a killed writer); skipped", path, number)
  return records


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl as written: every evaluation of every session, `--mode eval` too."""
  return read_json_lines(os.path.join(workdir, METRICS_FILE))


def drop_superseded(points: Iterable[Point], step: Callable[[Point], int]
                    ) -> list[Point]:
  """One series' points in written order -> those of the run as it finally went, in
  step order. A point whose step is not above its predecessor's was written by a
  session resumed from an earlier checkpoint: it replaces every point at its step or
  later (the killed session's, which a reader would otherwise show twice or out of
  order)."""
  kept: list[Point] = []
  for point in points:
    while kept and step(kept[-1]) >= step(point):
      kept.pop()
    kept.append(point)
  return kept


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from scalars.jsonl, each tag's series without the
  points a resumed session superseded."""
  series: dict[str, list[tuple[int, float]]] = {}
  for record in read_json_lines(os.path.join(workdir, SCALARS_FILE)):
    for tag, value in record.items():
      if tag not in ("step", "time"):
        series.setdefault(tag, []).append((record["step"], value))
  return {tag: drop_superseded(points, step=lambda point: point[0])
          for tag, points in series.items()}


class InputWaitMeter:
  """Whether training waits for its data: per step, the time the loop is blocked
  getting the batch, and whether the device had already finished the previous step
  when the batch arrived (an input-bound step: the device sat idle). Steps right after a
  host synchronisation (logging, evaluation, a checkpoint) are not judged: the device is
  idle there by construction."""

  def __init__(self):
    self._wait = self._steps = self._judged = self._bound = 0
    self._total = {"wait": 0.0, "steps": 0, "judged": 0, "bound": 0}

  def record(self, wait_seconds: float, device_idle: bool | None) -> None:
    """`device_idle` None: not judged (first step, or just after a synchronisation)."""
    self._wait += wait_seconds
    self._steps += 1
    if device_idle is not None:
      self._judged += 1
      self._bound += bool(device_idle)

  def interval(self) -> dict:
    """Figures since the last call: mean wait (ms) and fraction of input-bound steps."""
    figures = _wait_figures(self._wait, self._steps, self._judged, self._bound)
    for key, value in zip(("wait", "steps", "judged", "bound"),
                          (self._wait, self._steps, self._judged, self._bound)):
      self._total[key] += value
    self._wait = self._steps = self._judged = self._bound = 0
    return figures

  def total(self) -> dict:
    self.interval()
    return _wait_figures(**self._total)


def _wait_figures(wait, steps, judged, bound) -> dict:
  return {"input_wait_ms": 1000.0 * wait / max(steps, 1),
          "input_bound_fraction": bound / judged if judged else 0.0}


class ProgressLogger:
  """steps/s, images/s and ETA over the interval since the last log line."""

  def __init__(self, total_steps: int, start_step: int, images_per_step: int):
    self._total = total_steps
    self._images_per_step = images_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def log(self, step: int, values: dict) -> None:
    now = time.perf_counter()
    steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self._total - step) / max(steps_per_second, 1e-9)
    losses = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k.startswith("loss"))
    waiting = ""
    if "input_wait_ms" in values:
      waiting = (f" | input wait {values['input_wait_ms']:.1f} ms/step, "
                 f"{values['input_bound_fraction']:.0%} of steps input-bound")
    if jax.process_index() == 0:
      log.info("step %d/%d %s | %.2f steps/s %.0f img/s%s | ETA %s", step, self._total,
               losses, steps_per_second, steps_per_second * self._images_per_step,
               waiting, time.strftime("%H:%M:%S", time.gmtime(eta)))
