"""The exported model as ONNX (OUT/model.onnx), checked against JAX with onnxruntime.

The graph is written from the trained parameters by affect_jax.video.onnx_graph (the
`onnx` package: `pip install 'affect-jax[onnx]'`, which also installs onnxruntime).
OUT/model.onnx takes "images" uint8 [batch, size, size, 3] (any batch) and gives
"expression", "au", "va" (the tasks the model has), as model.jax_export does; it
computes in float32, so a model trained in bfloat16 is checked against its float32 JAX
network.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np

from affect_jax.errors import InputError
import affect_jax.video.onnx_graph as onnx_graph

ONNX_FILE = "model.onnx"
MAX_DIFFERENCE = 1e-4  # onnxruntime against JAX, on probabilities and VA
CHECK_BATCH = 4
INSTALL = "pip install 'affect-jax[onnx]'"


def import_onnxruntime():
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise InputError(f"ONNX needs onnxruntime ({error}): {INSTALL}") from None
  return onnxruntime


def write_onnx(variables: Mapping, size: int, outputs: Sequence[str], out_dir: str,
               reference: Callable[[np.ndarray], dict], seed: int = 0) -> dict:
  """OUT/model.onnx of the network with `variables`; its outputs on a random batch
  compared with `reference`'s (uint8 images -> {task: array}, the float32 JAX
  network): an error above MAX_DIFFERENCE. Returns what to record (file, opset, the
  largest difference)."""
  outputs = list(outputs)
  model = onnx_graph.network_model(variables, size, outputs)
  import_onnxruntime()  # before writing: a file that cannot be checked is not written
  path = os.path.join(out_dir, ONNX_FILE)
  with open(path, "wb") as f:
    f.write(model.SerializeToString())
  images = np.random.default_rng(seed).integers(0, 256, (CHECK_BATCH, size, size, 3),
                                                np.uint8)
  expected = reference(images)
  difference = max_difference(run_onnx(path, images), [expected[t] for t in outputs])
  if not difference <= MAX_DIFFERENCE:
    raise InputError(f"{path}: onnxruntime's outputs differ from JAX's by "
                     f"{difference:.2e} (more than {MAX_DIFFERENCE})")
  return {"file": ONNX_FILE, "opset": onnx_graph.OPSET, "computes_in": "float32",
          "max_abs_difference_from_jax": float(difference)}


def onnx_session(path: str):
  """An onnxruntime session of the ONNX file on the CPU."""
  onnxruntime = import_onnxruntime()
  if not os.path.isfile(path):
    raise InputError(f"{path} does not exist: `affect-jax export --onnx` writes it")
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only
  try:
    return onnxruntime.InferenceSession(path, options,
                                        providers=["CPUExecutionProvider"])
  except Exception as error:  # pylint: disable=broad-except  # onnxruntime's own classes
    raise InputError(f"{path}: onnxruntime cannot load it: {error}") from None


def session_predict(session) -> Callable[[np.ndarray], dict]:
  """uint8 images -> {task: array} with an onnxruntime session."""
  names = [output.name for output in session.get_outputs()]
  input_name = session.get_inputs()[0].name

  def predict(images: np.ndarray) -> dict:
    return dict(zip(names, session.run(names, {input_name: np.asarray(images,
                                                                      np.uint8)})))

  return predict


def run_onnx(path: str, images: np.ndarray) -> list[np.ndarray]:
  """The ONNX model's outputs on uint8 images, in the file's output order."""
  session = onnx_session(path)
  return session.run(None, {session.get_inputs()[0].name: images})


def max_difference(theirs: Sequence, ours: Sequence) -> float:
  return max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
             for a, b in zip(theirs, ours, strict=True))
