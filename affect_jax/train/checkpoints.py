"""Orbax checkpoints of a training run: train state + data iterator state + scores.

Layout under `<workdir>/checkpoints/<step>/`: `state` (the TrainState pytree),
`data` (grain iterator state, one JSON per process) and the step's metrics, which
decide the best checkpoint. Saves are asynchronous and atomic: a process killed during a
save leaves the previous checkpoints intact, and `latest_step` never names a partial one.

A checkpoint damaged after its save (a lost or truncated file, a full disk, a bad copy)
is told apart from one of another model by its tree's metadata: a damaged one that
cannot be read makes a resume fall back to the newest one that can, and is moved to
`<workdir>/unreadable_checkpoints/` so that the resumed run can save that step again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from affect_jax import config_checks
from affect_jax.errors import InputError
from affect_jax.model import implementation, multitask
from affect_jax.train import optimizers, train_state
from affect_jax.train.run_config import processes_refusing

log = logging.getLogger(__name__)
STATE = "state"
DATA = "data"
METRICS = "metrics"  # Orbax's file of a step's scores: <step>/metrics/metrics
UNREADABLE_FOLDER = "unreadable_checkpoints"
# How much of a reader's error a one-line message quotes (TensorStore's run to pages).
QUOTED_CHARACTERS = 300


class MissingCheckpointError(InputError, FileNotFoundError):
  """No checkpoint where one is needed (also a FileNotFoundError, as before)."""


class UnreadableCheckpointError(InputError):
  """A checkpoint whose files cannot be read back; `reason` says which and why."""

  def __init__(self, folder, step: int, reason: str, advice: str = ""):
    super().__init__(f"checkpoint {folder}/{step} cannot be read ({reason})"
                     + (f"; {advice}" if advice else ""))
    self.reason = reason


class CheckpointMismatchError(InputError):
  """A readable checkpoint of another model: its arrays are not this model's."""


def _short_reason(error: BaseException) -> str:
  """The first line of the error at the root of a reader's chain (TensorStore's says
  which file and byte range), bounded, for a one-line message."""
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None:
    inner = error.__cause__ or error.__context__
    if id(inner) in seen:
      break
    seen.add(id(inner))
    error = inner
  lines = str(error).strip().splitlines() or [""]
  text = lines[0]
  if len(text) > QUOTED_CHARACTERS:
    text = text[:QUOTED_CHARACTERS] + "..."
  return f"{type(error).__name__}: {text}"


def _step_folders(folder: str) -> list[int]:
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def unreadable_scores(folder: str) -> dict[int, str]:
  """{step: reason} of the checkpoints whose scores file is not JSON. Orbax reads every
  step's scores when a manager opens (for the best step), so one such file would keep
  the whole folder from opening."""
  unreadable = {}
  for step in _step_folders(folder):
    path = os.path.join(folder, str(step), METRICS, METRICS)
    if not os.path.exists(path):
      continue
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      unreadable[step] = f"its scores file {path}: {_short_reason(e)}"
  return unreadable


def set_aside(folder: str, steps) -> None:
  """Moves the checkpoints of `steps` out of `folder` into `UNREADABLE_FOLDER` beside
  it (process 0 moves; every process waits for the move)."""
  steps = sorted(steps)
  if steps and jax.process_index() == 0:
    aside = os.path.join(os.path.dirname(os.path.abspath(folder)), UNREADABLE_FOLDER)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target, copy = os.path.join(aside, str(step)), 1
      while os.path.exists(target):  # the same step damaged in an earlier session too
        target, copy = os.path.join(aside, f"{step}.{copy}"), copy + 1
      shutil.move(os.path.join(folder, str(step)), target)
      log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
  if steps and jax.process_count() > 1:
    multihost_utils.sync_global_devices("affect_jax: unreadable checkpoints set aside")


def create_checkpoint_manager(workdir: str, *, keep: int = 3,
                              best_metric: str | None = "p_mtl",
                              best_mode: str = "max",
                              asynchronous: bool = True,
                              set_aside_unreadable: bool = False
                              ) -> ocp.CheckpointManager:
  """Keeps the `keep` latest checkpoints and, when `best_metric` is set, the best one.
  A checkpoint whose scores cannot be read is moved aside with `set_aside_unreadable`
  (a training run: it falls back to the others), else named in an
  UnreadableCheckpointError."""
  folder = os.path.join(os.path.abspath(workdir), "checkpoints")
  unreadable = unreadable_scores(folder)
  if unreadable and not set_aside_unreadable:
    step, reason = max(unreadable.items())
    raise UnreadableCheckpointError(folder, step, reason,
                                    f"move that folder out of {folder} to use the others")
  for step, reason in sorted(unreadable.items()):
    log.warning("checkpoint %s/%d cannot be read (%s); skipped", folder, step, reason)
  set_aside(folder, unreadable)
  policies = [checkpoint_managers.LatestN(n=keep)]
  best_fn = None
  if best_metric:
    best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
        # periodic saves carry no scores: LatestN alone decides about them
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn, best_mode=best_mode,
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=asynchronous, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(folder, options=options,
                               item_handlers={STATE: ocp.StandardCheckpointHandler(),
                                              DATA: grain.checkpoint.CheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    data_iterator=None, metrics: dict | None = None,
                    force: bool = False) -> bool:
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  scalars = None
  if metrics:
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
  return manager.save(step, args=ocp.args.Composite(**items), metrics=scalars,
                      force=force)


def _leaf_name(key) -> str:
  for attribute in ("key", "name", "idx"):  # dict keys, dataclass fields, tuple items
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def leaf_shapes(tree) -> dict[str, tuple]:
  """{dotted leaf name: shape}: Orbax names a saved TrainState's leaves the same way
  (`params.model.backbone.conv1.kernel`, `opt_state.0.0.mu...`)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_leaf_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def shape_differences(saved: dict, expected: dict) -> list[str]:
  """What keeps a saved tree from filling this model's (names and shapes), sorted."""
  missing = [f"{name} (absent)" for name in sorted(expected.keys() - saved.keys())]
  extra = [f"{name} (not in this model)" for name in sorted(saved.keys() - expected.keys())]
  reshaped = [f"{name} {saved[name]} (this model: {expected[name]})"
              for name in sorted(saved.keys() & expected.keys())
              if saved[name] != expected[name]]
  return reshaped + missing + extra


def _check_fits(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """UnreadableCheckpointError when the step's tree metadata cannot be read,
  CheckpointMismatchError when it reads but describes another model."""
  try:
    saved = leaf_shapes(manager.item_metadata(step)[STATE].tree)
  except Exception as e:  # Orbax raises many types for a damaged file  # pylint: disable=broad-except
    raise UnreadableCheckpointError(manager.directory, step, _short_reason(e)) from e
  differences = shape_differences(saved, leaf_shapes(abstract_state))
  if differences:
    raise CheckpointMismatchError(
        f"checkpoint {manager.directory}/{step} does not fit this model (it was written by another model "
        f"or config): {len(differences)} arrays differ, e.g. "
        f"{'; '.join(differences[:3])}")


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                       data_iterator=None) -> Any:
  """Restores `state` (laid out like `abstract_state`, shardings included) and, when an
  iterator is given, its position. A checkpoint of another model raises
  CheckpointMismatchError, one that cannot be read UnreadableCheckpointError."""
  _check_fits(manager, step, abstract_state)
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # the tree fits: what fails is reading  # pylint: disable=broad-except
    raise UnreadableCheckpointError(manager.directory, step, _short_reason(e)) from e
  return restored[STATE]


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state: Any,
                            data_iterator=None) -> Any:
  """The state of the newest checkpoint every process reads back whole, newest first;
  each one skipped is logged in one line with the reason and, once one is read, moved
  aside (the resumed run saves its step again). None readable: UnreadableCheckpointError
  naming each, and nothing moved."""
  skipped = {}
  for step in sorted(manager.all_steps(), reverse=True):
    failure = None
    try:
      state = restore_checkpoint(manager, step, abstract_state, data_iterator)
    except UnreadableCheckpointError as e:
      failure = e
    failing = processes_refusing(failure is not None)  # e.g. one process's data file
    if not failing:
      set_aside(str(manager.directory), skipped)
      if skipped:
        manager.reload()
      return state
    skipped[step] = failure.reason if failure else f"unreadable in processes {failing}"
    log.warning("checkpoint %s/%d cannot be read (%s); skipped, trying the one before",
                manager.directory, step, skipped[step])
  raise InputError(f"no checkpoint in {manager.directory} can be read: " + "; ".join(
      f"step {step} ({reason})" for step, reason in skipped.items()))


def checkpoint_step(manager, folder: str, step: int | None = None) -> int:
  """`step` when given (and present), else the best checkpoint's, else the latest's."""
  chosen = step or manager.best_step() or manager.latest_step()
  if chosen is None:
    raise MissingCheckpointError(f"no checkpoint in {folder}")
  if chosen not in manager.all_steps():
    raise MissingCheckpointError(f"no checkpoint of step {chosen} in {folder} (steps: "
                                 f"{sorted(manager.all_steps())})")
  return int(chosen)


def restore_for_eval(config, workdir: str, mesh, step: int | None = None,
                     current=None):
  """The TrainState of checkpoint `step` (default: the best, else the latest) of the run
  in `workdir`, replicated over `mesh`; `current` is returned as it is when it already
  is that step."""
  config_checks.validate_model_config(config)  # before any file is opened
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    raise MissingCheckpointError(f"no checkpoint folder {folder}")
  if not _step_folders(folder):  # said before a manager (and its threads) is made
    raise MissingCheckpointError(f"no checkpoint in {folder}")
  manager = create_checkpoint_manager(
      workdir, keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric or None, asynchronous=False)
  try:
    step = checkpoint_step(manager, folder, step)
    if current is not None and int(current.step) == step:
      return current
    model = multitask.create_model(config.model,
                                   implementation.implementation_for(config.model, mesh))
    abstract = train_state.abstract_train_state(
        config, model, mesh, optimizers.create_learning_rate_fn(config))
    try:
      return restore_checkpoint(manager, step, abstract)
    except UnreadableCheckpointError as e:
      others = sorted(set(manager.all_steps()) - {step})
      raise UnreadableCheckpointError(manager.directory, step, e.reason,
                                      f"the run's other checkpoints: steps {others}"
                                      ) from e.__cause__
  finally:
    manager.close()
