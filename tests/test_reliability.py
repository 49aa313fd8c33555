"""Reliability: non-finite steps are skipped and counted, a workdir of another run is
refused (by every process of a run), and 2 processes x 2 devices train exactly as
1 process x 4 devices."""
import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from affect_jax import data_parallel, errors
from affect_jax.model import implementation, multitask
from affect_jax.train import guards
from affect_jax.train import loop
from affect_jax.train import optimizers
from affect_jax.train import run_config
from affect_jax.train import step_functions
from affect_jax.train import train_state
from configs import tiny
from tests.test_train import REPO, random_batch, restored_params, tiny_config
from tests.test_train import train_command as _train_command


def test_non_finite_step_is_skipped_but_counted():
  config = tiny_config(None, **{"input.image_size": 32})
  mesh = data_parallel.create_mesh(jax.devices()[:2])
  lr_fn = optimizers.create_learning_rate_fn(config)
  resolved = implementation.implementation_for(config.model, mesh)
  state = train_state.create_train_state(
      config, multitask.create_model(config.model, resolved), mesh, lr_fn)
  before = jax.device_get(state)
  step = step_functions.compile_train_step(
      mesh, implementation.compiler_options(resolved),
      settings=step_functions.loss_settings_from_config(config, None),
      learning_rate_fn=lr_fn, dtype=np.float32, seed=0)
  batch = random_batch(np.random.default_rng(0), 8)
  batch["valence_arousal"][3] = np.nan
  batch["va_mask"][3] = 1.0
  state, metrics = step(state, data_parallel.device_batch(batch, mesh))
  assert float(metrics["finite"]) == 0.0 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(before.batch_stats),
                  jax.tree.leaves(state.batch_stats)):
    np.testing.assert_array_equal(a, b)
  batch["valence_arousal"][3] = 0.5
  for _ in range(2):  # the optimizer's own count (and warm-up) skipped the bad step too
    state, metrics = step(state, data_parallel.device_batch(batch, mesh))
    assert float(metrics["finite"]) == 1.0
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                      jax.tree.leaves(state.params))]
  assert all(changed)


def test_non_finite_guard_stops_after_a_streak_naming_step_and_videos():
  guard = guards.NonFiniteGuard(3, lambda idx: f"videos of {sorted(idx.tolist())}")
  guard.check(1, 0.0, np.array([1, 2]))
  guard.check(2, 1.0, np.array([3]))  # a finite step ends the streak
  guard.check(3, 0.0, np.array([4]))
  guard.check(4, 0.0, np.array([5]))
  with pytest.raises(guards.NonFiniteLossError, match=r"3 steps in a row.*step 5.*\[6, 7\]"
                     ) as stop:
    guard.check(5, 0.0, np.array([7, 6]))
  assert guard.total == 4
  assert errors.is_expected(stop.value)  # one `error:` line, the advice in it


def test_workdir_of_another_run_is_refused(tmp_path):
  config = tiny.get_config()
  run_config.check_and_write_config(config, str(tmp_path))
  harmless = tiny.get_config()
  harmless.log_every_steps = 1
  harmless.dataset.data_dir = "/elsewhere"
  run_config.check_and_write_config(harmless, str(tmp_path))
  changed = tiny.get_config()
  changed.optimizer.learning_rate = 0.5
  changed.model.num_filters = 16
  with pytest.raises(ValueError, match="model.num_filters, optimizer.learning_rate"):
    run_config.check_and_write_config(changed, str(tmp_path))
  changed.allow_config_change = True
  run_config.check_and_write_config(changed, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.5


def test_a_run_written_before_a_config_key_existed_resumes(tmp_path):
  config = tiny.get_config()
  run_config.check_and_write_config(config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  del saved["input"]["device_resident"]  # as written by an earlier version
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  run_config.check_and_write_config(tiny.get_config(), str(tmp_path))  # resumes
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  resident = tiny.get_config()
  resident.input.device_resident = True  # not what the earlier run did
  with pytest.raises(ValueError, match="input.device_resident"):
    run_config.check_and_write_config(resident, str(tmp_path))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


@pytest.mark.parametrize("device_resident", [False, True])
def test_two_processes_train_exactly_as_one(built_union, tmp_path, device_resident):
  _, data_dir = built_union
  overrides = {"num_train_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4,
               "log_every_steps": 2, "checkpoint.asynchronous": False,
               "input.device_resident": device_resident}
  single = str(tmp_path / "one_process")
  multi = str(tmp_path / "two_processes")
  logs = [tmp_path / f"process_{i}.log" for i in range(3)]
  workers = _launch_processes(multi, data_dir, overrides, logs[:2])
  reference = subprocess.run(_train_command(single, data_dir, overrides), cwd=REPO,
                             env=_environment(4), stdout=subprocess.DEVNULL,
                             stderr=open(logs[2], "wb"), timeout=900)
  assert reference.returncode == 0, logs[2].read_text(errors="replace")[-3000:]
  for worker, log in zip(workers, logs):
    assert worker.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]

  config = tiny_config(data_dir, **overrides)
  for a, b in zip(jax.tree.leaves(restored_params(config, single, 4)),
                  jax.tree.leaves(restored_params(config, multi, 4))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  logged = []
  for workdir in (single, multi):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      logged.append([json.loads(line) for line in f])
  assert len(logged[1]) == 1  # only process 0 writes
  for key in ("p_va", "expr_f1", "au_f1", "p_mtl"):
    assert logged[0][0][key] == pytest.approx(logged[1][0][key], abs=1e-4)


def _launch_processes(workdir, data_dir, overrides, logs, devices_each: int = 2):
  """The processes of one run on localhost, each with its own log file (a pipe nobody
  reads fills up and blocks its writer, and a blocked process blocks its peers in the
  next collective)."""
  port = _free_port()
  return [subprocess.Popen(
      _train_command(workdir, data_dir, overrides) + [
          f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={len(logs)}",
          f"--process_id={i}"], cwd=REPO, env=_environment(devices_each),
      stdout=subprocess.DEVNULL, stderr=open(log, "wb")) for i, log in enumerate(logs)]


def test_every_process_refuses_a_workdir_of_another_run(built_union, tmp_path):
  _, data_dir = built_union
  overrides = {"num_train_steps": 4, "checkpoint.asynchronous": False}
  workdir = str(tmp_path / "run")
  earlier = tiny_config(data_dir, **overrides, **{"optimizer.learning_rate": 0.5})
  run_config.check_and_write_config(earlier, workdir)
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  workers = _launch_processes(workdir, data_dir, overrides, logs)
  try:
    # A process left out of the refusal would wait for its peer in a collective.
    codes = [worker.wait(timeout=300) for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for code, log in zip(codes, logs):
    text = log.read_text(errors="replace")
    assert code != 0, text[-3000:]
    assert "holds a run with another config (different: optimizer.learning_rate)" in (
        text), text[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.5  # left as it was


def test_processes_agree_on_a_refusal_only_one_of_them_sees(monkeypatch, tmp_path):
  config = tiny.get_config()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  peer_refuses = {"flag": 1}
  monkeypatch.setattr(run_config.multihost_utils, "process_allgather",
                      lambda flag: np.array([flag, peer_refuses["flag"]]))
  with pytest.raises(ValueError, match=r"processes \[1\] found a run with another"):
    run_config.check_and_write_config(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()
  peer_refuses["flag"] = 0
  run_config.check_and_write_config(config, str(tmp_path))
  assert (tmp_path / "config.json").exists()  # written by process 0 once all agree


def _stop_at(monkeypatch, stop_step: int):
  """Makes the loop take its SIGTERM path (checkpoint, stop) once it reaches a step."""
  calls = {"n": 0}

  def should_stop(self):
    calls["n"] += 1
    return calls["n"] >= stop_step

  monkeypatch.setattr(guards.PreemptionNotice, "should_stop", should_stop)


@pytest.mark.parametrize("first,second", [(1, 8), (8, 1)])
def test_checkpoint_moves_between_device_counts_for_training(built_union, tmp_path,
                                                             monkeypatch, first,
                                                             second):
  _, data_dir = built_union
  config = tiny_config(data_dir, **{"input.image_size": 32, "num_train_steps": 6,
                                    "eval_every_steps": 6, "checkpoint_every_steps": 6,
                                    "log_every_steps": 3})
  reference_dir, moved_dir = str(tmp_path / "reference"), str(tmp_path / "moved")
  loop.train_and_evaluate(config, reference_dir,
                           loop.Trainer(config, reference_dir, jax.devices()[:first]))
  with monkeypatch.context() as patch:
    _stop_at(patch, 3)
    stopped = loop.train_and_evaluate(
        config, moved_dir, loop.Trainer(config, moved_dir, jax.devices()[:first]))
  assert int(stopped.step) == 3
  loop.train_and_evaluate(config, moved_dir,
                           loop.Trainer(config, moved_dir, jax.devices()[:second]))
  for a, b in zip(jax.tree.leaves(restored_params(config, reference_dir, 6)),
                  jax.tree.leaves(restored_params(config, moved_dir, 6))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
