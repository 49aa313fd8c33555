"""The multi-task network as an ONNX graph, written node by node from its trained
parameters (the `onnx` package only: no converter between JAX and ONNX).

The graph is the network of affect_jax.model.multitask in evaluation mode, followed by
what the predict step adds (affect_jax.train.step_functions.task_probabilities):

  images uint8 [batch, size, size, 3] -> float, (x - mean) / std (data.pipeline)
  -> NCHW -> conv 7x7/2 + BN + ReLU -> max pool 3x3/2 padded by 1 (torch's)
  -> BasicBlocks (conv 3x3 + BN + ReLU, conv 3x3 + BN, 1x1 conv + BN shortcut where the
     shape changes, add, ReLU) -> global average pool -> per task: [hidden Dense + ReLU]
     -> Dense -> softmax (expression), sigmoid (au), tanh (va)

Each BatchNorm (running statistics) is folded into the convolution before it, in
float64, then cast to float32: the graph computes in float32 whatever dtype the model
trained in. The architecture is read from the parameter tree itself (stages, blocks,
widths, heads, tasks); a parameter the graph would not use means a network this writer
does not know, and is refused by name.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from affect_jax.errors import InputError

OPSET = 17  # onnxruntime >= 1.13 and most other runtimes run it
IR_VERSION = 8  # the IR of opset 17: older runtimes refuse newer IRs
INPUT_NAME = "images"
TASK_ACTIVATIONS = {"expression": "Softmax", "au": "Sigmoid", "va": "Tanh"}
BLOCK_NAME = re.compile(r"layer(\d+)_(\d+)$")


def onnx_float() -> int:
  from onnx import TensorProto  # pylint: disable=g-import-not-at-top
  return TensorProto.FLOAT


def bn_epsilon() -> float:
  from affect_jax.model.resnet import ResNet  # pylint: disable=g-import-not-at-top
  return float(ResNet.__dataclass_fields__["bn_epsilon"].default)


def flatten(tree: Mapping) -> dict[str, np.ndarray]:
  """{"a/b/kernel": float64 array} of a nested mapping of arrays."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {path: np.asarray(value, np.float64)
          for path, value in traverse_util.flatten_dict(tree, sep="/").items()}


class ParameterReader:
  """The network's parameters by path ("params/backbone/conv1/kernel"), each read at
  most once, so that what was never read is known at the end."""

  def __init__(self, variables: Mapping):
    self.leaves = flatten({"params": variables["params"],
                           "batch_stats": variables.get("batch_stats", {})})
    self.read = set()

  def has(self, path: str) -> bool:
    return path in self.leaves

  def get(self, path: str) -> np.ndarray:
    if path not in self.leaves:
      raise InputError(f"ONNX export: the network has no parameter {path}: "
                       f"{UNSUPPORTED}")
    self.read.add(path)
    return self.leaves[path]

  def check_all_read(self) -> None:
    unread = sorted(set(self.leaves) - self.read)
    if unread:
      shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more"
                                       if len(unread) > 5 else "")
      raise InputError(f"ONNX export: the network has parameters the ONNX graph "
                       f"would not use ({shown}): {UNSUPPORTED}")


UNSUPPORTED = ("the ONNX writer covers the multi-task ResNet of affect_jax.model "
               "(BasicBlock stages, dense heads for expression, au, va) only")


def backbone_stages(reader: ParameterReader) -> list[int]:
  """Blocks per stage, from the names layer{stage}_{block} (1-based stages, 0-based
  blocks, none missing)."""
  blocks: dict[int, set[int]] = {}
  for path in reader.leaves:
    parts = path.split("/")
    if parts[1] == "backbone" and len(parts) > 2:
      match = BLOCK_NAME.match(parts[2])
      if match:
        blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  stages = []
  for stage in range(1, len(blocks) + 1):
    found = blocks.get(stage, set())
    if not found or found != set(range(len(found))):
      raise InputError(f"ONNX export: the backbone's blocks {sorted(blocks.items())} "
                       f"are not numbered layer1_0, layer1_1, ...: {UNSUPPORTED}")
    stages.append(len(found))
  if not stages:
    raise InputError(f"ONNX export: the network has no backbone blocks: {UNSUPPORTED}")
  return stages


class GraphBuilder:
  """Nodes and initializers of one graph, with fresh names."""

  def __init__(self):
    self.nodes = []
    self.initializers = []
    self.count = 0

  def name(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def constant(self, hint: str, value: np.ndarray, dtype=np.float32) -> str:
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    name = self.name(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def node(self, op: str, inputs: list[str], hint: str, output: str | None = None,
           **attributes) -> str:
    from onnx import helper  # pylint: disable=g-import-not-at-top
    output = output or self.name(hint)
    self.nodes.append(helper.make_node(op, inputs, [output], name=self.name(op),
                                       **attributes))
    return output


def folded_conv(reader: ParameterReader, graph: GraphBuilder, x: str, conv: str,
                norm: str, stride: int, padding: int) -> str:
  """conv (flax HWIO kernel, no bias) then BatchNorm with its running statistics, as
  one ONNX Conv (OIHW kernel, bias)."""
  kernel = reader.get(f"params/{conv}/kernel")
  scale = reader.get(f"params/{norm}/scale")
  bias = reader.get(f"params/{norm}/bias")
  mean = reader.get(f"batch_stats/{norm}/mean")
  var = reader.get(f"batch_stats/{norm}/var")
  multiplier = scale / np.sqrt(var + bn_epsilon())
  weights = np.transpose(kernel, (3, 2, 0, 1)) * multiplier[:, None, None, None]
  height, width = kernel.shape[:2]
  return graph.node(
      "Conv", [x, graph.constant(conv + "/kernel", weights),
               graph.constant(conv + "/bias", bias - mean * multiplier)],
      conv.replace("/", "_"), kernel_shape=[height, width], strides=[stride, stride],
      pads=[padding] * 4)


def basic_block(reader: ParameterReader, graph: GraphBuilder, x: str, prefix: str,
                stride: int) -> str:
  y = folded_conv(reader, graph, x, f"{prefix}/conv1", f"{prefix}/bn1", stride, 1)
  y = graph.node("Relu", [y], prefix + "_relu1")
  y = folded_conv(reader, graph, y, f"{prefix}/conv2", f"{prefix}/bn2", 1, 1)
  residual = x
  if reader.has(f"params/{prefix}/downsample_conv/kernel"):
    residual = folded_conv(reader, graph, x, f"{prefix}/downsample_conv",
                           f"{prefix}/downsample_bn", stride, 0)
  return graph.node("Relu", [graph.node("Add", [residual, y], prefix + "_add")],
                    prefix + "_out")


def backbone(reader: ParameterReader, graph: GraphBuilder, images: str) -> str:
  """uint8 NHWC images -> pooled features [batch, channels]."""
  from affect_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  x = graph.node("Cast", [images], "float_images", to=onnx_float())
  x = graph.node("Sub", [x, graph.constant("mean_rgb", pipeline.MEAN_RGB)], "centred")
  x = graph.node("Div", [x, graph.constant("stddev_rgb", pipeline.STDDEV_RGB)],
                 "normalised")
  x = graph.node("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
  x = folded_conv(reader, graph, x, "backbone/conv1", "backbone/bn1", 2, 3)
  x = graph.node("Relu", [x], "stem_relu")
  # MaxPool's padding never wins a max: torch's pad of 1 with -inf.
  x = graph.node("MaxPool", [x], "stem_pool", kernel_shape=[3, 3], strides=[2, 2],
                 pads=[1, 1, 1, 1])
  for stage, num_blocks in enumerate(backbone_stages(reader)):
    for block in range(num_blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      x = basic_block(reader, graph, x, f"backbone/layer{stage + 1}_{block}", stride)
  x = graph.node("GlobalAveragePool", [x], "pooled")
  return graph.node("Flatten", [x], "features", axis=1)


def dense(reader: ParameterReader, graph: GraphBuilder, x: str, prefix: str) -> str:
  return graph.node("Gemm", [x, graph.constant(prefix + "/kernel",
                                               reader.get(f"params/{prefix}/kernel")),
                             graph.constant(prefix + "/bias",
                                            reader.get(f"params/{prefix}/bias"))],
                    prefix.replace("/", "_"))


def task_head(reader: ParameterReader, graph: GraphBuilder, features: str,
              task: str) -> str:
  """The task's output: [hidden Dense + ReLU] -> Dense -> its activation, named
  `task`."""
  x = features
  if reader.has(f"params/{task}_head/hidden/kernel"):
    x = graph.node("Relu", [dense(reader, graph, x, f"{task}_head/hidden")],
                   f"{task}_hidden")
  logits = dense(reader, graph, x, f"{task}_head/output")
  attributes = {"axis": -1} if task == "expression" else {}
  return graph.node(TASK_ACTIVATIONS[task], [logits], task, output=task, **attributes)


def network_model(variables: Mapping, image_size: int, outputs: list[str],
                  name: str = "affect_jax"):
  """The onnx.ModelProto of the network with `variables` ({"params", "batch_stats"}):
  input "images" uint8 [batch, image_size, image_size, 3] (any batch), outputs named
  by task in the order of `outputs` (expression probabilities, AU probabilities, VA),
  all float32. InputError: a network it does not cover."""
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise InputError(f"ONNX export needs the onnx package ({error}): pip install "
                     "'affect-jax[onnx]'") from None
  unknown = [task for task in outputs if task not in TASK_ACTIVATIONS]
  if unknown:
    raise InputError(f"ONNX export: outputs {unknown} are not tasks of "
                     f"{sorted(TASK_ACTIVATIONS)}: {UNSUPPORTED}")
  reader = ParameterReader(variables)
  graph = GraphBuilder()
  features = backbone(reader, graph, INPUT_NAME)
  for task in outputs:
    task_head(reader, graph, features, task)
  reader.check_all_read()
  model = helper.make_model(
      helper.make_graph(
          graph.nodes, name,
          [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                         ["batch", image_size, image_size, 3])],
          [helper.make_tensor_value_info(
              task, TensorProto.FLOAT, ["batch", output_width(reader, task)])
           for task in outputs],
          graph.initializers),
      opset_imports=[helper.make_opsetid("", OPSET)], producer_name="affect-jax")
  model.ir_version = IR_VERSION
  onnx.checker.check_model(model, full_check=True)
  return model


def output_width(reader: ParameterReader, task: str) -> int:
  return int(reader.leaves[f"params/{task}_head/output/bias"].shape[0])
