"""Topology names -> devices to build a Mesh on, compiled for from any host: TPU
topologies as `jax.experimental.topologies.get_topology_desc` takes them ("v5e:2x2",
"v4:2x2x2", "v5e:4x4" with its four hosts' devices); GPUs described to XLA:GPU
("h100:8", eight on one host; "h100:2x8", two hosts of eight; affect_jax.aot.gpu); and
"cpu:N", N of this host's CPU devices."""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from affect_jax.aot import chips
from affect_jax.data_parallel import create_mesh


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: chips.Chip
  mesh: Mesh  # one data axis over every chip

  @property
  def chips(self) -> int:
    return self.mesh.devices.size

  @property
  def hosts(self) -> int:
    return len({device.process_index for device in self.mesh.devices.flat})


def split_name(name: str) -> tuple[str, str]:
  chip, sep, shape = name.partition(":")
  if not sep or not shape:
    raise ValueError(f"a topology is <chip>:<shape> (v5e:2x2, v4:2x2x1, h100:8) or "
                     f"cpu:<N>, got {name!r}")
  return chip, shape


def host_cpu_devices(count: int) -> list:
  """`count` CPU devices of this process. Asks JAX for them when its backends have not
  started yet; otherwise uses those it has (XLA_FLAGS=
  --xla_force_host_platform_device_count=N gives N)."""
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends run already, with their own count
    pass
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise ValueError(f"cpu:{count} needs {count} CPU devices, this process has "
                     f"{len(devices)} (start it with XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={count})")
  return devices[:count]


def tpu_devices(name: str, chip: chips.Chip) -> list:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=name, **dict(chip.topology_options)).devices)


def gpu_devices(shape: str, chip: chips.Chip) -> list:
  from affect_jax.aot import gpu  # pylint: disable=g-import-not-at-top
  parts = shape.split("x")
  if not all(part.isdigit() and int(part) > 0 for part in parts) or len(parts) > 2:
    raise ValueError(f"a GPU topology is {chip.name}:<GPUs> or "
                     f"{chip.name}:<hosts>x<GPUs per host>, got {shape!r}")
  hosts, per_host = (1, int(parts[0])) if len(parts) == 1 else map(int, parts)
  return gpu.cuda_devices(chip.name, hosts, per_host)


def create_topology(name: str) -> Topology:
  chip_name, shape = split_name(name)
  if chip_name == "cpu":
    if not shape.isdigit() or int(shape) < 1:
      raise ValueError(f"cpu:<N> takes a device count, got {name!r}")
    devices = host_cpu_devices(int(shape))
    return Topology(name, chips.host_cpu_chip(len(devices)), create_mesh(devices))
  chip = chips.chip_named(chip_name)
  devices = (tpu_devices(name, chip) if chip.platform == "tpu"
             else gpu_devices(shape, chip))
  kinds = {device.device_kind for device in devices}
  if kinds != {chip.device_kind}:
    raise ValueError(f"topology {name} has devices {sorted(kinds)}, expected "
                     f"{chip.device_kind!r}")
  return Topology(name, chip, create_mesh(devices))
