"""Guards of the training loop: a streak of non-finite steps stops the run, SIGTERM
checkpoints and stops it.

Orbax's `CheckpointManager.reached_preemption` (JAX's preemption sync manager) does not
cover a single process without `jax.distributed.initialize()`: its SIGTERM handler and
coordination service exist only in a distributed runtime, so there it returns False at
every step and SIGTERM ends the process unsaved (checked with the installed JAX and
Orbax, and with two processes on localhost, where it does agree on one step after
SIGTERM). Hence this notice, the same in one process and in several."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from affect_jax.errors import InputError

log = logging.getLogger(__name__)


class NonFiniteLossError(InputError, RuntimeError):
  """A streak of non-finite steps: the message names the step, the frames and what to
  change, so the command line prints it as one line."""


class NonFiniteGuard:
  """Counts skipped (non-finite) steps; too many in a row stops the run with the step
  and the videos of the last bad batch."""

  def __init__(self, max_in_row: int, describe_records: Callable[[np.ndarray], str]):
    self.max_in_row = max_in_row
    self.in_row = 0
    self.total = 0
    self._describe = describe_records

  def check(self, step: int, finite: float, record_indices: np.ndarray) -> None:
    if finite:
      self.in_row = 0
      return
    self.in_row += 1
    self.total += 1
    log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, "
                "%d in all)", step, self.in_row, self.total)
    if self.max_in_row and self.in_row >= self.max_in_row:
      raise NonFiniteLossError(
          f"{self.in_row} steps in a row with a non-finite loss or gradients, the last "
          f"at step {step}; its batch held {self._describe(record_indices)}. Lower the "
          "learning rate, enable optimizer.grad_clip_norm, or check these frames.")


class PreemptionNotice:
  """SIGTERM (what a pre-empted cloud VM receives) asks the loop to checkpoint and stop
  at the next step; all processes stop at the same step.

  With several processes the flag is agreed on through an allgather, a host
  synchronisation: it is done every `MULTI_PROCESS_CHECK_EVERY` calls (one call per
  step in every process, so they all check at the same steps), not every step.
  """

  MULTI_PROCESS_CHECK_EVERY = 10

  def __init__(self):
    self._received = False
    self._previous = None
    self._calls = 0

  def __enter__(self):
    # Python can set a handler only from the main thread. In a distributed run this one
    # replaces the handler of JAX's preemption notifier: the allgather agrees instead.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and stopping")
    self._received = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self._received
    self._calls += 1
    if self._calls % self.MULTI_PROCESS_CHECK_EVERY:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._received))
    return bool(np.any(flags))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _host_values(values) -> np.ndarray:
  """A host copy of per-record values: host rows, or a (global) device array."""
  if isinstance(values, jax.Array) and not values.is_fully_addressable:
    values = multihost_utils.process_allgather(values, tiled=True)
  return np.asarray(values)


def _record_videos(source) -> Callable[[np.ndarray], str]:
  def describe(indices):
    indices = _host_values(indices)
    names = sorted({_text(source[int(i)]["video"]) for i in indices if i >= 0})
    return f"records {sorted(int(i) for i in indices)[:16]} of videos {names[:8]}"
  return describe


