"""Which formulation of the network a step runs: decided once, from the platform of the
mesh the step is compiled for.

"xla" is the network written with flax's layers: what GPUs and TPUs run. "cpu" is the
same network (same parameters, same results up to float rounding) in the forms XLA:CPU
runs fastest (``affect_jax.cpu``: oneDNN convolutions, matmul shortcuts, a closed-form
BN backward pass, an index-routed max-pool gradient). "auto" is "cpu" on a CPU mesh and
"xla" on any other, a TPU topology compiled ahead of time from a CPU host included.
The CPU package is imported only when "cpu" is chosen.
"""
from __future__ import annotations

from affect_jax.model.resnet import XLA_LAYERS, Layers

IMPLEMENTATIONS = ("auto", "xla", "cpu")


def mesh_platform(mesh) -> str:
  """The platform ("cpu", "gpu", "tpu") of every device of `mesh`."""
  platforms = {device.platform for device in mesh.devices.flat}
  if len(platforms) != 1:
    raise ValueError(f"a mesh over devices of several platforms: {sorted(platforms)}")
  return platforms.pop()


def resolve_implementation(implementation: str, platform: str) -> str:
  """"xla" or "cpu" for `implementation` ("auto", "xla" or "cpu") on `platform`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation == "auto":
    return "cpu" if platform == "cpu" else "xla"
  if implementation == "cpu" and platform != "cpu":
    raise ValueError(f"model.implementation='cpu' runs on CPU devices only, not {platform}")
  return implementation


def implementation_for(model_config, mesh) -> str:
  """The resolved implementation of `model_config` for steps compiled on `mesh`."""
  return resolve_implementation(model_config.get("implementation", "auto"),
                                mesh_platform(mesh))


def network_layers(implementation: str) -> Layers:
  """The ResNet's layer types for a resolved implementation."""
  if implementation == "xla":
    return XLA_LAYERS
  if implementation == "cpu":
    from affect_jax.cpu import layers  # pylint: disable=g-import-not-at-top  (CPU runs only)
    return layers.CPU_LAYERS
  raise ValueError(f"a resolved implementation is 'xla' or 'cpu', got {implementation!r}")


def compiler_options(implementation: str) -> dict:
  """XLA options of the steps compiled for a resolved implementation: the CPU
  formulation's own on "cpu", XLA's defaults otherwise."""
  if implementation != "cpu":
    return {}
  from affect_jax.cpu import compile_options  # pylint: disable=g-import-not-at-top
  return compile_options.step_compiler_options()

