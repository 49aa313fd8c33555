"""Run safety: every numeric setting is range-checked before any work; a resume on
another dataset is refused; a damaged checkpoint makes a resume fall back to the newest
readable one; a session resumed after a kill during a save logs each step once."""
import glob
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import cli, config_checks, data_parallel
from affect_jax.errors import InputError
from affect_jax.eval import writers
from affect_jax.train import checkpoints, loop, run_config
from configs import default, demo, study, study_affwild2, tiny, uni_au, uni_expression
from configs import uni_va
from tests.test_train import tiny_config
from tfds_affwild2 import source_fingerprint

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "configs", "tiny.py")


# ------------------------------------------------------------------ numeric settings

@pytest.mark.parametrize("key,value,message", [
    ("eval_max_batches", -1, "eval_max_batches=-1 must be an integer >= 0"),
    ("model.dropout_rate", 2.0, "model.dropout_rate=2.0 must be a finite number in "
     "[0, 1)"),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be an integer >= 1"),
    ("checkpoint.keep", -1, "checkpoint.keep=-1 must be an integer >= 1"),
    ("optimizer.momentum", 1.0, "optimizer.momentum=1.0"),
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate=nan"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay=-0.0001"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps=-1"),
    ("loss.label_smoothing", 1.5, "loss.label_smoothing=1.5"),
    ("loss.focal_gamma", -2.0, "loss.focal_gamma=-2.0"),
    ("input.worker_count", -1, "input.worker_count=-1"),
    ("input.worker_buffer_size", 0, "input.worker_buffer_size=0"),
    ("init_from.step", 0, "init_from.step=0 must be an integer >= 1 or None"),
    ("max_nonfinite_steps_in_row", -3, "max_nonfinite_steps_in_row=-3"),
    ("seed", -1, "seed=-1"),
])
def test_a_numeric_setting_out_of_range_is_named_before_any_work(key, value, message):
  config = tiny_config("/no/dataset/here", **{key: value})
  with pytest.raises(InputError, match=re.escape(message)):
    config_checks.validate_config(config)
  # The Trainer checks before it opens the dataset (which does not exist here).
  with pytest.raises(InputError, match=f"invalid config: {key}="):
    loop.Trainer(config, "/no/workdir/either")


def _numeric_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    if hasattr(value, "items"):
      keys += _numeric_keys(value, f"{prefix}{name}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      keys.append(f"{prefix}{name}")
  return keys


def test_every_numeric_setting_of_every_config_has_a_range():
  configs = [m.get_config() for m in (default, demo, tiny, uni_au, uni_expression,
                                      uni_va)]
  configs += [study.get_config().base, study_affwild2.get_config().base]
  # Checked apart from the table: a class count of a vocabulary, each task's weight.
  elsewhere = {"model.num_expr_classes"}
  ranged = set(config_checks.MODEL_RANGES) | set(config_checks.RUN_RANGES)
  for config in configs:
    assert config_checks.config_problems(config) == []
    unranged = [k for k in _numeric_keys(config) if k not in ranged | elsewhere
                and not k.startswith("loss.weights.")]
    assert unranged == []


def test_the_command_line_prints_every_bad_setting_in_one_line(tmp_path, capsys):
  workdir = tmp_path / "run"
  status = cli.main(["train", "--config", TINY, "--workdir", str(workdir),
                     "--config.eval_max_batches=-1", "--config.checkpoint.keep=0"])
  err = capsys.readouterr().err
  assert status == 1 and "Traceback" not in err
  assert [line for line in err.splitlines() if line.startswith("error:")] == [
      "error: invalid config: eval_max_batches=-1 must be an integer >= 0; "
      "checkpoint.keep=0 must be an integer >= 1"]
  assert not workdir.exists()


def test_an_eval_batch_the_devices_cannot_share_names_its_key(built_union):
  config = tiny_config(built_union[1], **{"input.eval_batch_size": 12})  # 8 devices
  with pytest.raises(InputError, match=r"^input.eval_batch_size: batch size 12 must be "
                     "a positive multiple of the number of devices"):
    loop.Trainer(config, "/unused")


# ------------------------------------------------------------------ dataset identity

def _identity(data_dir="/data/a", fingerprint="f1", train_records=10):
  return run_config.dataset_identity(
      "affwild2/union", "1.0.0", data_dir, {"source_fingerprint": fingerprint},
      {"train": ([train_records], 1000), "validation": ([4], 400)})


def test_a_resume_on_another_dataset_is_refused_naming_both(tmp_path):
  workdir = str(tmp_path)
  config = tiny.get_config()
  run_config.check_and_write_config(config, workdir, _identity())
  written = {name: (tmp_path / name).read_text()
             for name in ("config.json", "dataset.json")}
  run_config.check_and_write_config(config, workdir, _identity())  # the same: resumes
  for other, different in ((_identity(data_dir="/data/b"), "data_dir"),
                           (_identity(fingerprint="f2"), "source_fingerprint"),
                           (_identity(train_records=11), "split_sizes")):
    changed = tiny.get_config()
    changed.log_every_steps = 1  # a harmless change: not what is refused
    with pytest.raises(InputError, match=f"another dataset \\(different: {different}\\)"
                       ) as refusal:
      run_config.check_and_write_config(changed, workdir, other)
    assert run_config.describe_dataset(_identity()) in str(refusal.value)
    assert run_config.describe_dataset(other) in str(refusal.value)
    assert {name: (tmp_path / name).read_text() for name in written} == written
  changed.allow_config_change = True
  run_config.check_and_write_config(changed, workdir, _identity(data_dir="/data/b"))
  assert json.loads((tmp_path / "dataset.json").read_text())["data_dir"] == "/data/b"


def test_a_run_recorded_without_a_source_fingerprint_compares_split_sizes(tmp_path):
  workdir = str(tmp_path)
  run_config.check_and_write_config(tiny.get_config(), workdir,
                                    _identity(fingerprint=None))
  run_config.check_and_write_config(tiny.get_config(), workdir, _identity())
  run_config.check_and_write_config(tiny.get_config(), workdir,
                                    _identity(fingerprint=None))
  with pytest.raises(InputError, match="split_sizes"):
    run_config.check_and_write_config(tiny.get_config(), workdir,
                                      _identity(fingerprint=None, train_records=9))


def _copy_of_dataset(data_dir: str, target, fingerprint: str) -> str:
  """The built dataset copied, its metadata's source fingerprint replaced: a rebuild
  from changed annotations, which can keep every split's size."""
  shutil.copytree(data_dir, target)
  [path] = glob.glob(os.path.join(target, "affwild2", "union", "*", "metadata.json"))
  with open(path) as f:
    metadata = json.load(f)
  metadata[source_fingerprint.METADATA_KEY] = fingerprint
  with open(path, "w") as f:
    json.dump(metadata, f)
  return str(target)


def test_training_refuses_a_workdir_of_another_dataset_before_writing(built_union,
                                                                      tmp_path):
  assert run_config.SOURCE_FINGERPRINT == source_fingerprint.METADATA_KEY
  workdir = tmp_path / "run"
  original = loop.Trainer(tiny_config(built_union[1]), str(workdir))
  assert original.dataset_identity["source_fingerprint"]  # the builder writes one
  run_config.check_and_write_config(original.config, str(workdir),
                                    original.dataset_identity)
  before = sorted(os.listdir(workdir)), (workdir / "config.json").read_text()
  rebuilt = _copy_of_dataset(built_union[1], tmp_path / "tfds", "another source")
  config = tiny_config(rebuilt)
  with pytest.raises(InputError, match=r"another dataset \(different: data_dir, "
                     r"source_fingerprint\).*" + str(tmp_path / "tfds")):
    loop.train_and_evaluate(config, str(workdir))
  assert (sorted(os.listdir(workdir)), (workdir / "config.json").read_text()) == before


# ------------------------------------------------------------------ checkpoints

def _damage_arrays(step_folder: str) -> None:
  """Empties the files holding a checkpoint's array data (as a full disk or a cut copy
  leaves them): Orbax still lists the step, and its tree metadata still reads."""
  chunks = [p for p in glob.glob(os.path.join(step_folder, "state", "**", "d", "*"),
                                 recursive=True) if os.path.isfile(p)]
  assert chunks
  for path in chunks:
    open(path, "wb").close()


def _saved_steps(workdir: str, steps) -> checkpoints.ocp.CheckpointManager:
  manager = checkpoints.create_checkpoint_manager(workdir, keep=5, best_metric="p_mtl",
                                                  asynchronous=False)
  for step in steps:
    checkpoints.save_checkpoint(manager, step, {"w": jnp.full((3,), float(step))},
                                metrics={"p_mtl": float(step)})
  return manager


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable(tmp_path,
                                                                       caplog):
  manager = _saved_steps(str(tmp_path), (1, 2, 3))
  _damage_arrays(str(tmp_path / "checkpoints" / "3"))
  with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
    state = checkpoints.restore_newest_readable(manager, {"w": jnp.zeros((3,))})
  np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
  [skipped, moved] = [r.getMessage() for r in caplog.records]
  assert skipped.startswith(f"checkpoint {tmp_path}/checkpoints/3 cannot be read (")
  assert skipped.endswith("skipped, trying the one before") and "\n" not in skipped
  assert "unreadable_checkpoints/3" in moved
  assert manager.all_steps() == [1, 2]  # the resumed run can save step 3 again
  assert os.path.isdir(tmp_path / "unreadable_checkpoints" / "3")


def test_no_readable_checkpoint_is_one_error_and_nothing_moves(tmp_path):
  manager = _saved_steps(str(tmp_path), (1, 2))
  for step in (1, 2):
    _damage_arrays(str(tmp_path / "checkpoints" / str(step)))
  with pytest.raises(InputError, match=r"no checkpoint in .* can be read: step 2 \(.*"
                     r"\); step 1 \(") as error:
    checkpoints.restore_newest_readable(manager, {"w": jnp.zeros((3,))})
  assert "\n" not in str(error.value)
  assert sorted(manager.all_steps()) == [1, 2]
  assert not (tmp_path / "unreadable_checkpoints").exists()


def test_a_checkpoint_of_another_model_is_named_as_such_not_skipped(tmp_path):
  manager = _saved_steps(str(tmp_path), (1, 2))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"does not fit this model .* w \(3,\) \(this model: \(4,\)\)"):
    checkpoints.restore_newest_readable(manager, {"w": jnp.zeros((4,))})
  assert sorted(manager.all_steps()) == [1, 2]


def test_a_checkpoint_whose_scores_cannot_be_read(tmp_path):
  _saved_steps(str(tmp_path), (1, 2)).close()
  scores = tmp_path / "checkpoints" / "2" / "metrics" / "metrics"
  scores.write_text("{\"p_mtl\": 0.")  # cut short
  # Orbax reads every step's scores when it opens the folder: one such file stopped
  # the whole folder from opening, with a JSON traceback.
  with pytest.raises(checkpoints.UnreadableCheckpointError,
                     match=f"checkpoint .*/2 cannot be read \\(its scores file {scores}"):
    checkpoints.create_checkpoint_manager(str(tmp_path), asynchronous=False)
  manager = checkpoints.create_checkpoint_manager(str(tmp_path), asynchronous=False,
                                                  set_aside_unreadable=True)
  assert manager.all_steps() == [1] and manager.best_step() == 1


# ------------------------------------------------- resuming a run after a damage or a kill

def _steps_logged(workdir: str, file_name: str) -> list[int]:
  with open(os.path.join(workdir, file_name)) as f:
    return [json.loads(line)["step"] for line in f]


def test_a_resumed_run_skips_a_damaged_checkpoint_and_logs_each_step_once(
    uninterrupted_run, tmp_path, caplog):
  config, reference = uninterrupted_run("cpu")
  final = config.num_train_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  # A kill during the final save: the step's scores are logged, its checkpoint is not
  # complete (Orbax never lists it). The session resumed from the step before logged
  # the final evaluation a second time.
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(final)))
  loop.train_and_evaluate(config, workdir)
  assert _steps_logged(workdir, writers.METRICS_FILE) == [12, final]
  scalars = _steps_logged(workdir, writers.SCALARS_FILE)
  assert scalars == sorted(set(scalars)) and scalars[-1] == final
  # Then the new final checkpoint is damaged: the next resume falls back to the one
  # before it, with one log line, and trains to the same parameters.
  _damage_arrays(os.path.join(workdir, "checkpoints", str(final)))
  mesh = data_parallel.create_mesh()
  with pytest.raises(checkpoints.UnreadableCheckpointError,
                     match=r"cannot be read \(.*\); the run's other checkpoints: steps"):
    checkpoints.restore_for_eval(config, workdir, mesh, final)
  with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
    resumed = loop.train_and_evaluate(config, workdir)
  assert any(r.getMessage().startswith(f"checkpoint {workdir}/checkpoints/{final} "
                                       "cannot be read") for r in caplog.records)
  expected = checkpoints.restore_for_eval(config, reference, mesh, final)
  for a, b in zip(jax.tree.leaves(jax.device_get(expected.params)),
                  jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
  assert _steps_logged(workdir, writers.METRICS_FILE) == [12, final]
  assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", str(final)))
