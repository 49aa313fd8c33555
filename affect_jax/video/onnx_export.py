"""The exported model as ONNX, through jax2onnx, checked against JAX with onnxruntime.

jax2onnx and onnxruntime are optional (`pip install jax2onnx onnxruntime`). OUT/model.onnx
takes "images" uint8 [batch, size, size, 3] (any batch) and gives "expression", "au",
"va" (the tasks the model has), as model.jax_export does. jax2onnx 0.17 converts flax
max pools padded 'SAME' or 'VALID' only; the ResNet's stem pools with torch's explicit
padding of 1, so while converting, that pool is the same pool written as a -inf pad
followed by a 'VALID' pool (equal results; tested).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from affect_jax.errors import InputError

ONNX_FILE = "model.onnx"
MAX_DIFFERENCE = 1e-4  # onnxruntime against JAX, on probabilities and VA
CHECK_BATCH = 4


def padded_stem_max_pool(x):
  """resnet.stem_max_pool as a -inf pad and a 'VALID' 3x3 stride-2 pool."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


@contextlib.contextmanager
def onnx_convertible_pooling() -> Iterator[None]:
  """resnet.stem_max_pool replaced by padded_stem_max_pool while converting."""
  from affect_jax.model import resnet  # pylint: disable=g-import-not-at-top
  original = resnet.stem_max_pool
  resnet.stem_max_pool = padded_stem_max_pool
  try:
    yield
  finally:
    resnet.stem_max_pool = original


def import_converters():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise InputError(f"ONNX export needs jax2onnx and onnxruntime ({error}): pip "
                     "install jax2onnx onnxruntime") from None
  return jax2onnx, onnxruntime


def write_onnx(function: Callable, size: int, outputs: Sequence[str], out_dir: str,
               seed: int = 0, *, input_spec) -> dict:
  """OUT/model.onnx of `function` (uint8 images -> {task: array}); its outputs on a
  random batch compared with JAX's: an error above MAX_DIFFERENCE. Returns what to
  record (file, opset, the largest difference). `input_spec`: the images' abstract
  shape (export.images_spec), the batch symbolic."""
  jax2onnx, onnxruntime = import_converters()
  outputs = list(outputs)

  def as_tuple(images):
    result = function(images)
    return tuple(result[name] for name in outputs)

  path = os.path.join(out_dir, ONNX_FILE)
  with onnx_convertible_pooling():
    model = jax2onnx.to_onnx(as_tuple, [input_spec],
                             model_name="affect_jax", input_names=["images"],
                             output_names=outputs)
  with open(path, "wb") as f:
    f.write(model.SerializeToString())
  images = np.random.default_rng(seed).integers(0, 256, (CHECK_BATCH, size, size, 3),
                                                np.uint8)
  try:
    difference = max_difference(path, images, as_tuple(images))
  except Exception as error:  # pylint: disable=broad-except  # onnxruntime's own classes
    raise InputError(f"{path}: onnxruntime cannot run the graph jax2onnx "
                     f"{jax2onnx_version()} made of this network: {error}") from None
  if not difference <= MAX_DIFFERENCE:
    raise InputError(f"{path}: onnxruntime's outputs differ from JAX's by "
                     f"{difference:.2e} (more than {MAX_DIFFERENCE}): this jax2onnx "
                     "does not convert the network faithfully")
  return {"file": ONNX_FILE, "opset": int(model.opset_import[0].version),
          "max_abs_difference_from_jax": float(difference)}


def jax2onnx_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version("jax2onnx")
  except metadata.PackageNotFoundError:
    return "(version unknown)"


def run_onnx(path: str, images: np.ndarray) -> list[np.ndarray]:
  """The ONNX model's outputs on uint8 images, with onnxruntime on the CPU."""
  _, onnxruntime = import_converters()
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only: shape-merging notes are not ours
  session = onnxruntime.InferenceSession(path, options,
                                         providers=["CPUExecutionProvider"])
  return session.run(None, {session.get_inputs()[0].name: images})


def max_difference(path: str, images: np.ndarray, reference) -> float:
  return max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
             for a, b in zip(run_onnx(path, images), reference))
