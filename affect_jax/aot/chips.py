"""The chip table: each accelerator's published peak bf16 FLOP/s, HBM bandwidth and HBM
capacity per chip (the figures a roofline needs), and how JAX names it.

Capacities are as the pages print them; a program may use a little less
(`usable_hbm_bytes`): on TPUs the "available HBM" of the compiler's
RESOURCE_EXHAUSTED message (libtpu 0.0.42), on GPUs the 75% of device memory JAX's
allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION). That is the limit a
compile is held to. Peaks are dense (no
sparsity) bf16 matrix-unit rates; JAX's default precision runs float32 matmuls and
convolutions as single bf16 passes on TPUs, so they bound float32 steps too.
"""
from __future__ import annotations

import dataclasses
import os

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # as topology names spell it: "v5e" in "v5e:2x2"
  platform: str  # "tpu", "cuda" or "cpu"
  device_kind: str  # jax's Device.device_kind
  peak_flops: float | None  # dense bf16 FLOP/s per chip (None: not published)
  hbm_bandwidth: float | None  # bytes/s per chip
  hbm_bytes: int  # per chip, published
  usable_hbm_bytes: int  # what one program may use (the compiler's limit)
  chips_in_8_slice: int  # chips of the Cloud "<name>-8" slice (v4/v5p count cores)
  # get_topology_desc options. v4 and v5p: one device per chip (both TensorCores as
  # one, "megacore"), as JAX shows a real v4 or v5p host; the compile-only default
  # for v4 is a device per core.
  topology_options: tuple[tuple[str, str], ...] = ()


MEGACORE = (("chip_config_name", "megacore"),)

CHIPS = {
  # https://cloud.google.com/tpu/docs/v4 : 275 TFLOPs bf16, 32 GiB HBM2, 1,200 GBps
  "v4": Chip("v4", "tpu", "TPU v4", 275e12, 1200e9, 32 * GiB, int(30.75 * GiB), 4,
             MEGACORE),
  # https://cloud.google.com/tpu/docs/v5e : 197 TFLOPs bf16, 16 GB HBM2, 819 GBps
  "v5e": Chip("v5e", "tpu", "TPU v5 lite", 197e12, 819e9, 16 * GiB, int(15.75 * GiB),
              8),
  # https://cloud.google.com/tpu/docs/v5p : 459 TFLOPs bf16, 95 GB HBM2e, 2,765 GBps
  # (its compiler allows 95.74 GiB: the chip has 96 GiB)
  "v5p": Chip("v5p", "tpu", "TPU v5", 459e12, 2765e9, 96 * GiB, int(95.74 * GiB), 4,
              MEGACORE),
  # https://cloud.google.com/tpu/docs/v6e : 918 TFLOPs bf16, 32 GB HBM, 1,640 GBps
  "v6e": Chip("v6e", "tpu", "TPU v6 lite", 918e12, 1640e9, 32 * GiB, int(31.25 * GiB),
              8),
  # https://www.nvidia.com/en-us/data-center/h100/ : H100 SXM 989 TFLOPS bf16 dense
  # (1,979 with sparsity), 80 GB HBM3, 3.35 TB/s. Compiled for through
  # affect_jax.aot.gpu (needs the jax CUDA plugin), else on paper.
  "h100": Chip("h100", "cuda", "NVIDIA H100 80GB HBM3", 989e12, 3.35e12, 80 * GiB,
               int(0.75 * 84942979072), 8),
}


def chip_named(name: str) -> Chip:
  if name not in CHIPS:
    raise ValueError(f"unknown chip {name!r}; one of {sorted(CHIPS)} or cpu")
  return CHIPS[name]


def host_cpu_chip(device_count: int) -> Chip:
  """Host CPU devices share the host's memory; no published peaks (no roofline)."""
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  share = memory // device_count
  return Chip("cpu", "cpu", "cpu", None, None, share, share, device_count)
