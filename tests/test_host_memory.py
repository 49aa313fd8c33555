"""The entry points' re-execution with glibc malloc settings (affect_jax/host_memory.py)."""
import json
import os
import platform
import subprocess
import sys

from affect_jax import host_memory

# Re-executes itself, then runs an XLA:CPU program with large temporaries (two
# 3000x3000 matmuls) and reports the page faults per execution.
SCRIPT = """
import json, os, resource, sys
if __name__ == "__main__":
  from affect_jax import host_memory
  host_memory.reexec_with_heap_reuse()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cos(jnp.sin(x) @ x.T) @ x))
x = jnp.ones((3000, 3000), jnp.float32)  # 36 MB: above glibc's mmap threshold
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"),
                  "argv": sys.argv[1:], "faults": faults}))
"""


def _run(tmp_path, **environ):
  script = tmp_path / "script.py"
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items()
         if k not in (host_memory.APPLIED_MARK, host_memory.SWITCH, "GLIBC_TUNABLES")}
  env.update(XLA_FLAGS="", **environ)
  out = subprocess.run([sys.executable, str(script), "--an", "argument"], env=env,
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_environment_keeps_the_users_tunables_last_and_applies_once():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    assert host_memory.environment_with_heap_reuse({}) is None
    return
  environ = host_memory.environment_with_heap_reuse(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "HOME": "/h"})
  assert environ["HOME"] == "/h"
  assert environ["GLIBC_TUNABLES"].split(":") == [
      *host_memory.MALLOC_TUNABLES, "glibc.malloc.arena_max=4"]
  assert host_memory.environment_with_heap_reuse(environ) is None  # already applied
  assert host_memory.environment_with_heap_reuse({host_memory.SWITCH: "0"}) is None


def test_reexecuted_process_reuses_xla_temporaries_instead_of_faulting(tmp_path):
  tuned = _run(tmp_path)
  if tuned["tunables"] is None:  # not glibc: nothing to re-execute for
    assert host_memory.environment_with_heap_reuse({}) is None
    return
  plain = _run(tmp_path, **{host_memory.SWITCH: "0"})
  # Same process and arguments after the exec, with the settings.
  assert tuned["argv"] == ["--an", "argument"]
  assert tuned["tunables"].split(":") == list(host_memory.MALLOC_TUNABLES)
  assert plain["tunables"] is None
  # Without: each execution maps its temporaries afresh, page by page.
  assert plain["faults"] > 20_000, plain
  assert tuned["faults"] < plain["faults"] / 20, (tuned, plain)
