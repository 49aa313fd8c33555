"""Pre-emption: SIGTERM in one process of several stops them all at the same step after
a checkpoint; the notice costs no host synchronisation while no signal comes.

A single process stopped by SIGTERM, checkpointing and resuming to the uninterrupted
result, is tested in test_train.py."""
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np

from affect_jax.train import guards
from tests.test_reliability import _environment, _free_port, _train_command
from tests.test_train import REPO, finalized_steps


def test_one_process_flags_sigterm_without_host_synchronisation(monkeypatch):
  def no_allgather(*args, **kwargs):
    raise AssertionError("a single process needs no allgather")

  monkeypatch.setattr(guards.multihost_utils, "process_allgather", no_allgather)
  before = signal.getsignal(signal.SIGTERM)
  with guards.PreemptionNotice() as notice:
    assert not any(notice.should_stop() for _ in range(25))
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.should_stop()  # the very next step
  assert signal.getsignal(signal.SIGTERM) is before


def test_several_processes_agree_only_every_few_steps(monkeypatch):
  every = guards.PreemptionNotice.MULTI_PROCESS_CHECK_EVERY
  gathered = []
  peer_received = {"flag": 0}

  def allgather(flag):
    gathered.append(int(flag))
    return np.array([flag, peer_received["flag"]])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(guards.multihost_utils, "process_allgather", allgather)
  with guards.PreemptionNotice() as notice:
    assert not any(notice.should_stop() for _ in range(3 * every))
    assert gathered == [0, 0, 0]  # one synchronisation per `every` steps, no more
    peer_received["flag"] = 1  # SIGTERM reached the other process only
    stops = [notice.should_stop() for _ in range(every)]
  assert stops == [False] * (every - 1) + [True]
  assert gathered == [0, 0, 0, 0]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_checkpointed_step(
    built_union, tmp_path):
  _, data_dir = built_union
  steps = 40
  overrides = {"num_train_steps": steps, "checkpoint_every_steps": 7,
               "eval_every_steps": steps, "log_every_steps": steps,
               "input.image_size": 32}
  workdir = str(tmp_path / "two_processes")
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  # Only process 0 writes JAX's persistent cache, and process 1's programs never hit
  # it: with the cache, process 0 would wait at the first collective for process 1's
  # compilation, longer than Gloo's 30 s when the machine is busy. Both compile.
  env = dict(_environment(2), JAX_ENABLE_COMPILATION_CACHE="false")
  workers = [subprocess.Popen(
      _train_command(workdir, data_dir, overrides) + [
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={i}"], cwd=REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=open(logs[i], "wb")) for i in range(2)]
  deadline = time.time() + 240
  while not finalized_steps(workdir) and time.time() < deadline:
    ended = [w.poll() is not None for w in workers]
    assert not any(ended), logs[ended.index(True)].read_text(errors="replace")[-3000:]
    time.sleep(0.02)
  workers[1].send_signal(signal.SIGTERM)  # a pre-empted host: its peer gets no signal
  texts = []
  for worker, log in zip(workers, logs):
    code = worker.wait(timeout=240)
    texts.append(log.read_text(errors="replace"))
    assert code == 0, texts[-1][-3000:]
  assert "SIGTERM received" not in texts[0]  # process 0 stops on process 1's notice
  stopped = [re.findall(r"stopped at step (\d+) after SIGTERM", text) for text in texts]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  stop_step = int(stopped[0][0])
  assert stop_step < steps
  assert stop_step % guards.PreemptionNotice.MULTI_PROCESS_CHECK_EVERY == 0
  # Not a periodic checkpoint step: the save there is the one SIGTERM asked for.
  assert stop_step % overrides["checkpoint_every_steps"]
  assert max(finalized_steps(workdir)) == stop_step  # nothing saved after it
