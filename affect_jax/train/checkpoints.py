"""Orbax checkpoints of a training run: train state + data iterator state + scores.

Layout under `<workdir>/checkpoints/<step>/`: `state` (the TrainState pytree),
`data` (grain iterator state, one JSON per process) and the step's metrics, which
decide the best checkpoint. Saves are asynchronous and atomic: a process killed during a
save leaves the previous checkpoints intact, and `latest_step` never names a partial one.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from affect_jax import config_checks
from affect_jax.model import implementation, multitask
from affect_jax.train import optimizers, train_state

STATE = "state"
DATA = "data"


def create_checkpoint_manager(workdir: str, *, keep: int = 3,
                              best_metric: str | None = "p_mtl",
                              best_mode: str = "max",
                              asynchronous: bool = True) -> ocp.CheckpointManager:
  """Keeps the `keep` latest checkpoints and, when `best_metric` is set, the best one."""
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
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options,
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


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                       data_iterator=None) -> Any:
  """Restores `state` (laid out like `abstract_state`, shardings included) and, when an
  iterator is given, its position."""
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this model "
                     f"(it was written by another model or config): {e}") from None
  return restored[STATE]


def checkpoint_step(manager, folder: str, step: int | None = None) -> int:
  """`step` when given (and present), else the best checkpoint's, else the latest's."""
  chosen = step or manager.best_step() or manager.latest_step()
  if chosen is None:
    raise FileNotFoundError(f"no checkpoint in {folder}")
  if chosen not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint of step {chosen} in {folder} (steps: "
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
    raise FileNotFoundError(f"no checkpoint folder {folder}")
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
    return restore_checkpoint(manager, step, abstract)
  finally:
    manager.close()
