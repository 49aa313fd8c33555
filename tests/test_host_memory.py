"""The entry points' re-execution with glibc malloc settings (affect_jax/cpu/host_memory.py)."""
import json
import os
import platform
import subprocess
import sys

from affect_jax.cpu import host_memory

# Re-executes itself, then reports the settings glibc started with, what a child
# process inherits, and the page faults per execution of an XLA:CPU program with large
# temporaries (two 3000x3000 matmuls).
MODULE = """
import json, os, resource, subprocess, sys
started_with = os.environ.get("GLIBC_TUNABLES", "")  # what glibc read, after the exec
if __name__ == "__main__":
  from affect_jax.cpu import host_memory
  host_memory.reexec_with_heap_reuse()
  applied = host_memory.applied_tunables()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cos(jnp.sin(x) @ x.T) @ x))
x = jnp.ones((3000, 3000), jnp.float32)  # 36 MB: above glibc's mmap threshold
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
child = subprocess.run(
    [sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES'))"],
    capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"tunables": started_with, "applied": applied,
                  "child_tunables": child, "argv": sys.argv[1:], "faults": faults}))
"""


def _run(tmp_path, **environ):
  (tmp_path / "reexec_probe.py").write_text(MODULE)
  env = {k: v for k, v in os.environ.items()
         if k not in (host_memory.APPLIED_MARK, host_memory.SWITCH, "GLIBC_TUNABLES",
                      "JAX_PLATFORMS")}
  env.update(XLA_FLAGS="", PYTHONPATH=str(tmp_path), **environ)
  out = subprocess.run([sys.executable, "-u", "-m", "reexec_probe", "--an", "argument"],
                       env=env, capture_output=True, text=True, check=True).stdout
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
  assert host_memory.environment_with_heap_reuse({"JAX_PLATFORMS": "cuda"}) is None
  restored = dict(environ)
  host_memory.restore_user_environment(restored)
  assert restored == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "HOME": "/h"}


def test_reexecuted_process_reuses_xla_temporaries_instead_of_faulting(tmp_path):
  user_tunables = "glibc.malloc.tcache_count=7"
  tuned = _run(tmp_path, GLIBC_TUNABLES=user_tunables)
  if not tuned["tunables"].startswith("glibc.malloc.arena_max"):  # not glibc
    assert host_memory.environment_with_heap_reuse({}) is None
    return
  plain = _run(tmp_path, **{host_memory.SWITCH: "0"})
  # The same `python -u -m module args` command after the exec, with the settings
  # (the user's last); its children get the user's own settings back.
  assert tuned["argv"] == ["--an", "argument"]
  assert tuned["tunables"].split(":") == [*host_memory.MALLOC_TUNABLES, user_tunables]
  assert tuned["child_tunables"] == user_tunables
  assert tuned["applied"] == tuned["tunables"] and plain["applied"] is None
  assert plain["tunables"] == "" and plain["child_tunables"] == "None"
  # Without: each execution maps its temporaries afresh, page by page.
  assert plain["faults"] > 20_000, plain
  # 1/290 of the faults on jax 0.10.2; 1/3-1/4.5 on 0.11.2, whose XLA:CPU maps less.
  assert tuned["faults"] < plain["faults"] / 2, (tuned, plain)
