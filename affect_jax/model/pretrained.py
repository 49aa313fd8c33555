"""Import of torchvision / timm ResNet weights into the Flax backbone (model/resnet.py).

Files are read into ``{name: np.ndarray}`` state dicts (``.pth`` through
``torch.load(weights_only=True)``, never any other unpickling; ``.safetensors`` through
the safetensors NumPy API), converted to ``{'params', 'batch_stats'}`` of
``resnet.ResNet``; `affect-jax convert` saves them for warm starts
(affect_jax.train.init_from merges them into a run's first state). torch and
safetensors are imported only when a file of theirs is read.

The classifier (``fc.*``) and BN's ``num_batches_tracked`` counters have no
counterpart and are ignored; any other key the architecture does not expect is an
error, so that e.g. a ResNet-50 file is refused instead of half-loaded.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

from affect_jax.errors import InputError

RESNET18_STAGE_SIZES = (2, 2, 2, 2)
# Checkpoint files often wrap the state dict together with optimizer state, epoch, ...
WRAPPER_KEYS = ("state_dict", "model")


class WeightImportError(InputError):
  """A weights file that cannot be read, or a state dict that does not fit the
  backbone; the message names the file or the key."""


def is_ignored_key(key: str) -> bool:
  """Keys of a torchvision state dict that the Flax backbone has no place for."""
  return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def backbone_layout(stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES,
                    num_filters: int = 64) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """(torch module name, Flax module path, torch weight shape) of every conv and BN.

  Conv weights are OIHW (4-d); BN weights are (channels,). This one list is the
  mapping between torchvision's names and ``models.ResNet``'s.
  """
  layout = [("conv1", ("conv1",), (num_filters, 3, 7, 7)), ("bn1", ("bn1",), (num_filters,))]
  in_channels = num_filters
  for stage, num_blocks in enumerate(stage_sizes):
    channels = num_filters * 2**stage
    for block in range(num_blocks):
      torch_block, flax_block = f"layer{stage + 1}.{block}", f"layer{stage + 1}_{block}"
      layout += [
          (f"{torch_block}.conv1", (flax_block, "conv1"), (channels, in_channels, 3, 3)),
          (f"{torch_block}.bn1", (flax_block, "bn1"), (channels,)),
          (f"{torch_block}.conv2", (flax_block, "conv2"), (channels, channels, 3, 3)),
          (f"{torch_block}.bn2", (flax_block, "bn2"), (channels,)),
      ]
      strides = 2 if stage > 0 and block == 0 else 1
      if strides != 1 or in_channels != channels:
        layout += [
            (f"{torch_block}.downsample.0", (flax_block, "downsample_conv"),
             (channels, in_channels, 1, 1)),
            (f"{torch_block}.downsample.1", (flax_block, "downsample_bn"), (channels,)),
        ]
      in_channels = channels
  return layout


def _take(state_dict: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
  if key not in state_dict:
    raise WeightImportError(f"state dict has no key {key!r} (expected shape {shape})")
  value = np.asarray(state_dict[key])
  if value.shape != shape:
    raise WeightImportError(f"{key!r} has shape {value.shape}, expected {shape}")
  return value.astype(np.float32)


def torchvision_state_dict_to_flax(
    state_dict: Mapping[str, np.ndarray],
    stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES,
    num_filters: int = 64) -> dict[str, dict]:
  """torchvision/timm ResNet state dict -> {'params', 'batch_stats'} of ``models.ResNet``.

  Conv weights go OIHW -> HWIO; BN weight/bias -> params scale/bias; BN running_mean/
  running_var -> batch_stats mean/var. ``fc.*`` and ``*.num_batches_tracked`` are
  ignored (see ``is_ignored_key``). Raises WeightImportError naming a missing,
  mis-shaped or unexpected key. Leaves are float32 NumPy arrays.
  """
  params, batch_stats, used_keys = {}, {}, set()
  for torch_name, flax_path, shape in backbone_layout(stage_sizes, num_filters):
    if len(shape) == 4:
      keys = {"kernel": f"{torch_name}.weight"}
      params[flax_path] = {"kernel": _take(state_dict, keys["kernel"], shape)
                           .transpose(2, 3, 1, 0)}
    else:
      keys = {name: f"{torch_name}.{suffix}" for name, suffix in (
          ("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
          ("var", "running_var"))}
      values = {name: _take(state_dict, key, shape) for name, key in keys.items()}
      params[flax_path] = {"scale": values["scale"], "bias": values["bias"]}
      batch_stats[flax_path] = {"mean": values["mean"], "var": values["var"]}
    used_keys.update(keys.values())
  unexpected = sorted(k for k in state_dict if k not in used_keys and not is_ignored_key(k))
  if unexpected:
    raise WeightImportError(
        f"state dict has keys the ResNet with stage_sizes={tuple(stage_sizes)} does not "
        f"expect (another architecture?): {unexpected[:5]}")
  return {"params": traverse_util.unflatten_dict(params),
          "batch_stats": traverse_util.unflatten_dict(batch_stats)}


def _unwrap_checkpoint(obj):
  """A bare state dict, or one wrapped under 'state_dict' / 'model' (once or nested)."""
  while isinstance(obj, Mapping):
    wrapped = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if wrapped is None:
      return obj
    obj = wrapped
  raise WeightImportError(f"expected a state dict (a mapping), got {type(obj).__name__}")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.pth``/``.pt`` state dict as NumPy arrays, safely: weights_only=True.

  Accepts a bare state dict or a checkpoint wrapping it under 'state_dict' or 'model'.
  Floating tensors of any precision come back as float32.
  """
  import torch  # Optional dependency: only needed to read torch files.

  try:
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # torch raises many kinds
    # weights_only refuses any pickle that is not plain tensors (UnpicklingError); a
    # file that is no torch file at all fails in zipfile or pickle (RuntimeError, ...).
    raise WeightImportError(f"{os.fspath(path)} is not a torch state dict that can be "
                            f"read safely: {str(error).splitlines()[0][:300]}") from error
  state_dict = {}
  for key, tensor in _unwrap_checkpoint(checkpoint).items():
    if not isinstance(tensor, torch.Tensor):
      raise WeightImportError(f"{key!r} in {os.fspath(path)} is a "
                              f"{type(tensor).__name__}, not a tensor")
    # NumPy has no bfloat16; float32 holds every torch float format exactly or better.
    if tensor.is_floating_point():
      tensor = tensor.to(torch.float32)
    state_dict[key] = tensor.detach().cpu().numpy()
  return state_dict


def load_safetensors_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file (e.g. timm's resnet18, torchvision key names)."""
  from safetensors.numpy import load_file  # Optional dependency.

  try:
    return load_file(os.fspath(path))
  except FileNotFoundError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # SafetensorError, OSError
    raise WeightImportError(f"{os.fspath(path)} is not a readable safetensors file: "
                            f"{str(error).splitlines()[0][:300]}") from error


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict, choosing the reader from the file's suffix."""
  if os.fspath(path).endswith(".safetensors"):
    return load_safetensors_state_dict(path)
  return load_torch_state_dict(path)
