"""XLA:GPU ahead of time, without a GPU: the CUDA plugin compiles for a described GPU
(`target_config`, a GpuTargetConfigProto) when given no device, and this module holds
the H100's description and the cost counts the GPU compiler does not report.

Needs the jax CUDA plugin importable (`pip install 'jax[cuda13]'`, its ptxas included)
and JAX kept on the CPU (JAX_PLATFORMS=cpu), so that no CUDA runtime is looked for.
A compiled GPU step answers memory_analysis() but not cost_analysis(): FLOPs come from
XLA's cost analysis of the step as lowered (before optimisation; the TPU compile's own
count agrees within 1%), bytes accessed from that of the optimised GPU module, whose
cuDNN and cuBLAS custom calls it leaves out: their operands and outputs are added from
the module's text.
"""
from __future__ import annotations

import re

import jax

# NVIDIA H100 SXM5 80GB as XLA:GPU's cost model and code generator see it. Sources:
# NVIDIA H100 Tensor Core GPU Architecture (whitepaper, 2022): 132 SMs, 228 KB shared
# memory per SM (227 KB per block opt-in), 50 MB L2, 3.35 TB/s HBM3, 1.98 GHz boost,
# compute capability 9.0; https://docs.nvidia.com/cuda/cuda-c-programming-guide/
# (technical specifications per compute capability: warp, block, grid and register
# limits).
H100_SXM_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 28 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGET_CONFIGS = {"h100": H100_SXM_TARGET_CONFIG}


def cuda_devices(chip_name: str, hosts: int, per_host: int) -> list:
  """Compile-only devices of `hosts` x `per_host` GPUs of a described kind."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  shape = f"1x{hosts}x{per_host}"  # slices x hosts per slice x devices per host
  try:
    description = topologies.get_topology_desc(
        platform="cuda", topology_name=shape, topology=shape,
        target_config=TARGET_CONFIGS[chip_name])
  except (NotImplementedError, RuntimeError) as error:
    raise RuntimeError(
        "compiling for GPUs needs the jax CUDA plugin (pip install 'jax[cuda13]') and "
        f"JAX_PLATFORMS=cpu: {error}") from None
  return list(description.devices)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_DEFINITION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s+([\w\-]+)\((.*)$")


def shape_bytes(shapes: str, skip_scratch: bool = False) -> int:
  """Bytes of the array shapes written in `shapes` ("(bf16[8,4]{1,0}, u8[0]{0})")."""
  total = 0
  for dtype, dims in _SHAPE.findall(shapes):
    if skip_scratch and dtype == "u8":  # a custom call's workspace, not data
      continue
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    total += count * _DTYPE_BYTES[dtype]
  return total


def custom_call_bytes(hlo_text: str) -> int:
  """Operand and output bytes of every custom call (cuDNN convolutions, cuBLAS GEMMs)
  of an optimised HLO module's text, operands found by name."""
  sizes, calls = {}, []
  for line in hlo_text.splitlines():
    match = _DEFINITION.match(line)
    if not match:
      continue
    name, shapes, opcode, rest = match.groups()
    sizes[name] = shape_bytes(shapes)
    if opcode == "custom-call":
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      calls.append((shape_bytes(shapes, skip_scratch=True), operands))
  return sum(out + sum(sizes.get(op, 0) for op in operands) for out, operands in calls)


def cost_without_device(lowered, compiled) -> dict:
  """{"flops", "bytes accessed"} of a step compiled for GPUs (see the module's
  docstring), per device. XLA's cost analysis is reached through jaxlib's
  `hlo_module_cost_analysis`, which JAX calls itself for Lowered.cost_analysis on
  non-plugin backends; here it runs on the CPU client."""
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top  (see above)
  cpu_client = jax.devices("cpu")[0].client
  as_lowered = _jax.hlo_module_cost_analysis(
      cpu_client, lowered._lowering.hlo().as_hlo_module())  # pylint: disable=protected-access
  optimised = compiled.runtime_executable().hlo_modules()[0]
  as_compiled = _jax.hlo_module_cost_analysis(cpu_client, optimised)
  custom_calls = custom_call_bytes(compiled.as_text())
  return {"flops": as_lowered["flops"],
          "bytes accessed": max(as_compiled["bytes accessed"], 0) + custom_calls}
