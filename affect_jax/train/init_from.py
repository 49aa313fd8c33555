"""Warm starts: a run's first state from an earlier run's checkpoint or from converted
pretrained weights (ImageNet / face ResNet-18), backbone only or backbone + heads.

  affect-jax convert --input resnet18.pth --output weights/imagenet
  affect-jax train ... --config.init_from.path=weights/imagenet   (or a training workdir)

(`python -m affect_jax.train.init_from ...` runs the convert command too.)

A converted file is an Orbax checkpoint holding {'params': {'backbone': ...},
'batch_stats': {'backbone': ...}}, the same tree as a model's variables; a training
workdir's checkpoint holds the whole TrainState. Both load without the source's config.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from flax import traverse_util

from affect_jax import cli, errors
from affect_jax.model import pretrained

BACKBONE = "backbone"
PARTS = ("backbone", "backbone+heads")


def convert_pretrained(input_path: str, output_dir: str) -> dict:
  """torchvision `.pth` / timm `.safetensors` ResNet-18 -> an Orbax checkpoint."""
  if not os.path.isfile(input_path):
    raise errors.InputError(f"--input {input_path}: no such file")
  imported = pretrained.torchvision_state_dict_to_flax(
      pretrained.load_state_dict(input_path))
  variables = {"params": {BACKBONE: imported["params"]},
               "batch_stats": {BACKBONE: imported["batch_stats"]}}
  output_dir = os.path.abspath(output_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(output_dir, variables)
  return variables


def _read_raw(path: str, what: str):
  """The pytree stored at `path`; an InputError saying it holds no `what` when it is
  not there (Orbax finds no metadata file)."""
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.abspath(path))
  except FileNotFoundError as e:
    raise errors.InputError(f"config.init_from.path: {path} holds no {what}: "
                            f"{e}") from None


def load_init_variables(path: str, step: int | None = None) -> dict:
  """{'params', 'batch_stats'} of a model, from a converted file or a training workdir
  (its `step`, else its best, else its latest checkpoint)."""
  checkpoints_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints_dir):
    manager = ocp.CheckpointManager(os.path.abspath(checkpoints_dir),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      step = step or manager.latest_step()
    finally:
      manager.close()
    if step is None:
      raise errors.InputError(f"config.init_from.path: no checkpoint in "
                              f"{checkpoints_dir}")
    state = _read_raw(os.path.join(checkpoints_dir, str(step), "state"),
                      f"checkpoint of step {step}")
    return {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
  if not os.path.isdir(path):
    raise errors.InputError(f"config.init_from.path: {path} is neither a training "
                            "workdir nor converted weights (affect-jax convert)")
  return _read_raw(path, "converted weights (affect-jax convert) and no training run")


def merge_variables(target: dict, source: dict, parts: str) -> tuple[dict, list[str]]:
  """Copies the backbone (and, with 'backbone+heads', every head whose name and shapes
  match) from source into target; returns the new tree and the copied top-level parts."""
  if parts not in PARTS:
    raise errors.InputError(f"config.init_from.parts must be one of {PARTS}, got "
                            f"{parts!r}")
  merged, copied = {}, set()
  for collection in ("params", "batch_stats"):
    flat_target = traverse_util.flatten_dict(target.get(collection, {}))
    flat_source = traverse_util.flatten_dict(source.get(collection, {}))
    for key, value in flat_target.items():
      part = key[0]
      wanted = part == BACKBONE or (parts == "backbone+heads" and part.endswith("_head"))
      if not wanted:
        continue
      if part == BACKBONE and key not in flat_source:
        raise errors.InputError(f"config.init_from.path: the source has no "
                                f"{collection}/{'/'.join(key)}")
      if key in flat_source:
        new = np.asarray(flat_source[key])
        if new.shape != tuple(value.shape):
          if part == BACKBONE:
            raise errors.InputError(
                f"config.init_from.path: {collection}/{'/'.join(key)} has shape "
                f"{new.shape} in the source, {tuple(value.shape)} here")
          continue  # a head of another size (e.g. 7 vs 8 classes) stays re-initialised
        flat_target[key] = new.astype(value.dtype)
        copied.add(part)
    merged[collection] = traverse_util.unflatten_dict(flat_target) if flat_target else {}
  return merged, sorted(copied)


def warm_start(state, path: str, parts: str = "backbone", step: int | None = None):
  """The TrainState with its model variables partly replaced; shardings kept."""
  source = load_init_variables(path, step)
  target = {"params": state.params["model"], "batch_stats": state.batch_stats}
  merged, copied = merge_variables(target, source, parts)
  place = lambda new, old: jax.device_put(new, old.sharding)  # noqa: E731
  params = dict(state.params, model=jax.tree.map(place, merged["params"],
                                                 state.params["model"]))
  batch_stats = jax.tree.map(place, merged["batch_stats"], state.batch_stats)
  return state.replace(params=params, batch_stats=batch_stats), copied


CONVERT_DOC = """affect-jax convert: a torchvision .pth or timm .safetensors ResNet-18 ->
weights a run can start from (--config.init_from.path=OUTPUT).

  affect-jax convert --input resnet18.pth --output weights/imagenet
"""


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("input", None, "A torchvision state_dict (.pth, read with "
                      "weights_only=True) or a timm .safetensors file.",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "The folder of the converted weights.",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["input", "output"], flag_values=flag_values)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse_flags(argv, define_flags, CONVERT_DOC)
  variables = convert_pretrained(args.input, args.output)
  count = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  print(f"wrote {count:,} backbone parameters to {os.path.abspath(args.output)}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
