"""What a run's workdir records of the run, `config.json` and `dataset.json` (the
identity of the dataset it trained on), and the refusal to resume a workdir whose run
had another config or another dataset.

In a run of several processes every process reads and compares the saved files, and
the processes agree on the outcome before process 0 writes: a refusal seen by one
process alone would leave the others waiting for it at the next collective.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from affect_jax.errors import InputError

CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
# The key of the built dataset's metadata (TFDS metadata.json) where the builder records
# a fingerprint of the release it read (annotation and image listings).
SOURCE_FINGERPRINT = "source_fingerprint"

# Settings that may differ when a run is resumed: they change no result.
RESUMABLE_CHANGES = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "eval_max_batches", "allow_config_change", "dataset.data_dir",
                     "input.worker_count", "input.worker_buffer_size",
                     "input.eval_batch_size", "checkpoint.keep",
                     "checkpoint.asynchronous", "max_nonfinite_steps_in_row",
                     # same network, same parameters: results differ by rounding only
                     "model.implementation",
                     # a temporal run's inputs moved, not changed (its embeddings store
                     # records which frame run and step it holds)
                     "frame_run.data_dir", "embeddings.dir", "embeddings.batch_size")


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
  if config.get("allow_config_change", False):
    return []
  saved = _read_json(os.path.join(workdir, CONFIG_FILE))
  if saved is None:
    return []
  return config_differences(saved, json.loads(config.to_json_best_effort()))


def split_sizes_digest(split_sizes: dict) -> str:
  """A digest of {split: (records per shard, bytes)}: what dataset_info.json says of
  the splits, the dataset's identity where its metadata has no source fingerprint."""
  canonical = json.dumps({name: [list(map(int, shards)), int(size)]
                          for name, (shards, size) in sorted(split_sizes.items())})
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dataset_identity(name: str, version: str, data_dir: str, metadata: dict,
                     split_sizes: dict) -> dict:
  """What tells one built dataset from another: its name, version and folder, the
  builder's fingerprint of its source (None when built before builders wrote one) and
  a digest of its split sizes."""
  return {"name": name, "version": str(version),
          "data_dir": os.path.realpath(data_dir) if data_dir else None,
          SOURCE_FINGERPRINT: metadata.get(SOURCE_FINGERPRINT),
          "split_sizes": split_sizes_digest(split_sizes)}


def dataset_differences(saved: dict, current: dict) -> list[str]:
  """The identity keys on which two datasets differ. A fingerprint is compared only
  when both have one (a run recorded before builders wrote one has None)."""
  keys = ["name", "version", "data_dir", "split_sizes"]
  if saved.get(SOURCE_FINGERPRINT) and current.get(SOURCE_FINGERPRINT):
    keys.append(SOURCE_FINGERPRINT)
  return [k for k in keys if saved.get(k) != current.get(k)]


def describe_dataset(identity: dict) -> str:
  fingerprint = identity.get(SOURCE_FINGERPRINT) or "none recorded"
  return (f"{identity.get('name')} {identity.get('version')} in "
          f"{identity.get('data_dir')} (source fingerprint {fingerprint}, split sizes "
          f"{identity.get('split_sizes')})")


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise InputError(f"{path} is not the JSON a run writes ({e}); restore it or use "
                       "a new --workdir") from None


def saved_dataset_differences(config, workdir: str, identity: dict | None) -> str:
  """A sentence naming both datasets when `workdir` holds a run trained on another
  one than `identity` ('' when the same, when nothing is recorded, or with
  config.allow_config_change)."""
  if identity is None or config.get("allow_config_change", False):
    return ""
  saved = _read_json(os.path.join(workdir, DATASET_FILE))
  if saved is None or not dataset_differences(saved, identity):
    return ""
  return (f"{workdir} holds a run trained on another dataset (different: "
          f"{', '.join(dataset_differences(saved, identity))}): the run's was "
          f"{describe_dataset(saved)}, this one is {describe_dataset(identity)}")


def processes_refusing(refuses: bool) -> list[int]:
  """The indices of the processes whose `refuses` is true, the same list in every
  process (an allgather: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return [0] if refuses else []
  flags = multihost_utils.process_allgather(np.int32(refuses))
  return [int(i) for i in np.flatnonzero(np.asarray(flags))]


def _write_atomically(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)  # readers never see half a file


def check_and_write_config(config, workdir: str, dataset: dict | None = None) -> None:
  """Refuses to resume a workdir whose run had another config or, when `dataset` (a
  dataset_identity) is given, another dataset (unless config.allow_config_change), in
  every process alike and before anything is written; then process 0 records the config
  as `config.json` and the dataset as `dataset.json`."""
  differences = saved_config_differences(config, workdir)
  other_dataset = saved_dataset_differences(config, workdir, dataset)
  refusing = processes_refusing(bool(differences or other_dataset))
  advice = "use a new --workdir, or pass --config.allow_config_change=True to resume"
  if differences:
    raise InputError(
        f"{workdir} holds a run with another config (different: "
        f"{', '.join(differences)}); {advice} with the new values")
  if other_dataset:
    raise InputError(f"{other_dataset}; {advice} on this dataset")
  if refusing:  # only another process saw a different config.json or dataset.json
    raise InputError(
        f"processes {refusing} found a run with another config or dataset in "
        f"{workdir}, this process ({jax.process_index()}) did not: do all processes "
        "see the same workdir and dataset?")
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  _write_atomically(os.path.join(workdir, CONFIG_FILE),
                    config.to_json_best_effort(indent=2, sort_keys=True))
  if dataset is not None:
    _write_atomically(os.path.join(workdir, DATASET_FILE),
                      json.dumps(dataset, indent=2, sort_keys=True))
