"""Where a run's numbers go: TensorBoard event files (tensorboardX, no TensorFlow),
`<workdir>/metrics.jsonl` (one JSON line per evaluation, the record reports read) and a
console progress line with steps/s and ETA. Only process 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


class MetricWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tensorboard = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, values: dict, prefix: str) -> None:
    if not self._enabled:
      return
    for name, value in values.items():
      self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)

  def write_scores(self, step: int, split: str, scores: dict, mode: str = "train"
                   ) -> None:
    """Scalars to TensorBoard; every score (lists too) as one line of metrics.jsonl."""
    if not self._enabled:
      return
    scalars = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    self.write_scalars(step, scalars, prefix=split)
    self._tensorboard.flush()
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": step, "split": split, "mode": mode, "time": time.time(),
                          **scores}) + "\n")
    shown = ", ".join(f"{k}={scalars[k]:.4f}" for k in (
        "p_va", "ccc_valence", "ccc_arousal", "expr_f1", "au_f1", "p_mtl") if k in scalars)
    log.info("step %d %s: %s", step, split, shown)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
