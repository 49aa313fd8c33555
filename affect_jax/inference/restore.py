"""Restoring a run's checkpoint for use: one path for evaluation, prediction and faces.

The state is restored onto the devices present now (a checkpoint written on 8 devices
restores onto 1 or 3), with the model in the implementation resolved for their mesh.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from affect_jax import data_parallel, errors
from affect_jax.model import implementation, multitask
from affect_jax.train import checkpoints, step_functions


def load_config(workdir: str, config: ml_collections.ConfigDict | None = None,
                data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The given config, else the run's own `config.json`; `data_dir` replaces
  config.dataset.data_dir."""
  if not epath.Path(workdir).is_dir():  # epath: gs:// workdirs too
    raise errors.InputError(f"workdir {workdir} does not exist (the training run's "
                            "folder)")
  if config is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise errors.InputError(f"{path} does not exist: pass --config (the file the run "
                               "was trained with)")
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  if data_dir is not None:
    config = ml_collections.ConfigDict(config.to_dict())  # unlock a locked config
    config.dataset.data_dir = data_dir
  return config


@dataclasses.dataclass
class Predictor:
  """A restored model, compiled for the devices of `mesh`."""
  config: ml_collections.ConfigDict
  mesh: Any
  state: Any
  step: int
  predict_fn: Any
  local_batch_size: int

  @property
  def num_expr_classes(self) -> int:
    return int(self.config.model.num_expr_classes)


def prediction_batch_size(requested: int, num_devices: int) -> int:
  """The requested global batch, rounded up to a multiple of the device count (a
  checkpoint written on 8 devices may be used on 3)."""
  return -(-max(requested, 1) // num_devices) * num_devices


def restore_predictor(config, workdir: str, step: int | None = None, devices=None,
                      batch_size: int | None = None) -> Predictor:
  """A Predictor of checkpoint `step` (default: the best, else the latest) on
  `devices` (default: all)."""
  mesh = data_parallel.create_mesh(devices)
  state = checkpoints.restore_for_eval(config, workdir, mesh, step)
  resolved = implementation.implementation_for(config.model, mesh)
  global_batch = prediction_batch_size(batch_size or config.input.eval_batch_size,
                                       mesh.devices.size)
  predict_fn = step_functions.compile_predict_step(
      mesh, implementation.compiler_options(resolved),
      dtype=multitask.DTYPES[config.model.dtype])
  return Predictor(config, mesh, state, int(state.step), predict_fn,
                   global_batch // jax.process_count())
