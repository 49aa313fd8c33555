"""The config of a run's workdir: `config.json`, and the refusal to resume a workdir
whose run had another config.

In a run of several processes every process reads and compares the saved config, and
the processes agree on the outcome before process 0 writes: a refusal seen by one
process alone would leave the others waiting for it at the next collective.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

CONFIG_FILE = "config.json"

# Settings that may differ when a run is resumed: they change no result.
RESUMABLE_CHANGES = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "eval_max_batches", "allow_config_change", "dataset.data_dir",
                     "input.worker_count", "input.worker_buffer_size",
                     "input.eval_batch_size", "checkpoint.keep",
                     "checkpoint.asynchronous", "max_nonfinite_steps_in_row",
                     # same network, same parameters: results differ by rounding only
                     "model.implementation")


def _flat_config(config_dict: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      flat.update(_flat_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


# Keys added to the config after runs were written, with the value those runs had: a
# saved config without the key resumes unless the new value differs.
ADDED_KEYS = {"input.device_resident": False, "model.implementation": "auto"}


def config_differences(saved: dict, current: dict) -> list[str]:
  """Keys whose values differ between two configs, ignoring RESUMABLE_CHANGES."""
  old = {**ADDED_KEYS, **_flat_config(saved)}
  new = {**ADDED_KEYS, **_flat_config(current)}
  return sorted(k for k in old.keys() | new.keys()
                if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


def saved_config_differences(config, workdir: str) -> list[str]:
  """What keeps `config` from resuming the run saved in `workdir` (empty: nothing, no
  run saved there, or config.allow_config_change)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if config.get("allow_config_change", False) or not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  return config_differences(saved, json.loads(config.to_json_best_effort()))


def processes_refusing(refuses: bool) -> list[int]:
  """The indices of the processes whose `refuses` is true, the same list in every
  process (an allgather: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return [0] if refuses else []
  flags = multihost_utils.process_allgather(np.int32(refuses))
  return [int(i) for i in np.flatnonzero(np.asarray(flags))]


def check_and_write_config(config, workdir: str) -> None:
  """Refuses to resume a workdir whose run had another config (unless
  config.allow_config_change), in every process alike; then process 0 records the
  config as `config.json`."""
  differences = saved_config_differences(config, workdir)
  refusing = processes_refusing(bool(differences))
  if differences:
    raise ValueError(
        f"{workdir} holds a run with another config (different: "
        f"{', '.join(differences)}); use a new --workdir, or pass "
        "--config.allow_config_change=True to resume with the new values")
  if refusing:  # only another process saw a different config.json
    raise ValueError(
        f"processes {refusing} found a run with another config in {workdir}, this "
        f"process ({jax.process_index()}) did not: do all processes see the same "
        "workdir?")
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)  # readers never see half a file
