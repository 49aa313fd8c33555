"""CPU runs keep XLA:CPU's per-step temporaries in the heap (affect_jax/cpu/host_memory.py),
set in-process before JAX starts, and only where the run can only be a CPU run with the
"cpu" formulation (affect_jax/host_setup.py)."""
import json
import os
import subprocess
import sys

from affect_jax import host_setup
from affect_jax.cpu import host_memory

# Reports the page faults per execution of an XLA:CPU program with large temporaries
# (two 3000x3000 matmuls) after `prepare_before_jax(IMPLEMENTATION)`.
PROBE = """
import json, os, resource, sys
from affect_jax import host_setup
os.environ["JAX_PLATFORMS"] = sys.argv[2]  # the platforms the host says it has
host_setup.prepare_before_jax(sys.argv[1])
os.environ["JAX_PLATFORMS"] = "cpu"  # what this probe can run on
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cos(jnp.sin(x) @ x.T) @ x))
x = jnp.ones((3000, 3000), jnp.float32)  # 36 MB: above glibc's mmap threshold
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"faults": faults,
                  "cpu_modules": sorted(m for m in sys.modules
                                        if m.startswith("affect_jax.cpu"))}))
"""


def _probe(implementation: str, platforms: str = "cpu", **environ) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in (host_memory.SWITCH, "GLIBC_TUNABLES")}
  env.update(XLA_FLAGS="", **environ)
  out = subprocess.run([sys.executable, "-c", PROBE, implementation, platforms], env=env,
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_cpu_runs_reuse_xla_temporaries_and_xla_runs_change_nothing():
  tuned = _probe("auto")
  plain = _probe("xla")
  switched_off = _probe("cpu", **{host_memory.SWITCH: "0"})
  accelerator_host = _probe("auto", platforms="cuda,cpu")
  if not host_memory.is_glibc():
    assert not host_memory.reuse_freed_memory()
    return
  # Without the settings each execution maps its temporaries afresh, page by page.
  assert plain["faults"] > 20_000, plain
  assert switched_off["faults"] > 20_000, switched_off
  # With them the freed block is reused (1/290 of the faults on jax 0.10.2; fewer on
  # 0.11, whose XLA:CPU maps less to begin with).
  assert tuned["faults"] < plain["faults"] / 2, (tuned, plain)
  # The "xla" path and a host that may have an accelerator import nothing of the CPU
  # package and keep glibc's defaults.
  assert plain["cpu_modules"] == [] and accelerator_host["cpu_modules"] == []
  assert accelerator_host["faults"] > 20_000, accelerator_host
  assert "affect_jax.cpu.host_memory" in tuned["cpu_modules"]


def test_only_a_cpu_only_host_counts_as_one():
  assert host_setup.cpu_only_host({"JAX_PLATFORMS": "cpu"})
  assert not host_setup.cpu_only_host({"JAX_PLATFORMS": "tpu"})
  assert not host_setup.cpu_only_host({"JAX_PLATFORMS": "cuda,cpu"})
  assert host_setup.cpu_only_host({}) == (not host_setup.accelerator_present())
