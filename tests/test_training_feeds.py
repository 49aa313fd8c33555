"""Where training batches come from: device-resident data (resumes exactly from the step
alone), the input-wait measurement, and the CPU compile options of the steps."""
import logging
import os
import re
import time

import jax
import numpy as np
import pytest

from affect_jax import config_checks
from affect_jax.train import checkpoints
from affect_jax.data import device_augment, device_resident
from affect_jax.train import feeds
from affect_jax.train import loop
from affect_jax.cpu import compile_options
from affect_jax.model import implementation
from affect_jax.eval.writers import InputWaitMeter
from tests.test_reliability import _stop_at
from tests.test_train import restored_params, tiny_config

SHORT_RUN = {"input.image_size": 32, "num_train_steps": 6, "eval_every_steps": 6,
             "checkpoint_every_steps": 6, "log_every_steps": 3}


def test_device_resident_run_trains_on_drawn_batches_and_resumes_exactly(
    built_union, tmp_path, monkeypatch):
  _, data_dir = built_union
  config = tiny_config(data_dir, **SHORT_RUN, **{"input.device_resident": True})
  reference_dir, resumed_dir = str(tmp_path / "reference"), str(tmp_path / "resumed")
  drawn_steps = []
  draw = device_resident.compile_draw_batch

  def recording_draw(*args, **kwargs):
    fn = draw(*args, **kwargs)
    return lambda dataset, step: (drawn_steps.append(int(step)), fn(dataset, step))[1]

  with monkeypatch.context() as patch:
    patch.setattr(device_resident, "compile_draw_batch", recording_draw)
    patch.setattr(feeds.HostFeed, "__init__", _must_not_be_used)
    reference = loop.train_and_evaluate(config, reference_dir)
    assert drawn_steps == [0, 1, 2, 3, 4, 5]
    _stop_at(patch, 3)
    stopped = loop.train_and_evaluate(config, resumed_dir)
  assert int(stopped.step) == 3
  # no data position in the checkpoint: the step is the position
  assert not os.path.exists(os.path.join(resumed_dir, "checkpoints", "3",
                                         checkpoints.DATA))
  drawn_steps.clear()
  with monkeypatch.context() as patch:
    patch.setattr(device_resident, "compile_draw_batch", recording_draw)
    loop.train_and_evaluate(config, resumed_dir)
  assert drawn_steps == [3, 4, 5]
  for a, b in zip(jax.tree.leaves(jax.device_get(reference.params)),
                  jax.tree.leaves(restored_params(config, resumed_dir, 6))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # the updates were real: the parameters moved from their initial values
  initial = loop.Trainer(config, str(tmp_path / "fresh")).new_state().params
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(jax.device_get(initial)),
      jax.tree.leaves(jax.device_get(reference.params)))]
  assert max(moved) > 1e-3


def test_draw_and_step_as_one_program_train_as_the_two_programs_do(built_union, tmp_path,
                                                                   monkeypatch):
  """The accelerator path (one program) against the CPU path (draw, then step), on the
  same devices and batches: the same parameters after a few steps."""
  _, data_dir = built_union
  config = tiny_config(data_dir, **{**SHORT_RUN, "num_train_steps": 3,
                                    "eval_every_steps": 100, "log_every_steps": 100},
                       **{"input.device_resident": True})
  separate = loop.train_and_evaluate(config, str(tmp_path / "separate"))
  fused_programs = []
  compile_fused = feeds.compile_resident_train_step

  def recording_compile(*args, **kwargs):
    fused_programs.append(compile_fused(*args, **kwargs))
    return fused_programs[-1]

  monkeypatch.setattr(feeds, "fuse_draw_and_step", lambda mesh: True)
  monkeypatch.setattr(feeds, "compile_resident_train_step", recording_compile)
  monkeypatch.setattr(device_resident, "compile_draw_batch", _must_not_be_used)
  fused = loop.train_and_evaluate(config, str(tmp_path / "fused"))
  assert len(fused_programs) == 1 and int(fused.step) == 3
  for a, b in zip(jax.tree.leaves(jax.device_get(separate.params)),
                  jax.tree.leaves(jax.device_get(fused.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _must_not_be_used(*args, **kwargs):
  raise AssertionError("the host pipeline was built for a device-resident run")


@pytest.mark.parametrize("overrides,message", [
    ({"input.task_balanced": True}, "task_balanced"),
    ({"input.augment": "randaugment"}, "randaugment"),
])
def test_device_resident_refuses_what_it_cannot_do(overrides, message):
  config = tiny_config("/nowhere", **{"input.device_resident": True}, **overrides)
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config)
  with pytest.raises(ValueError, match="host pipeline"):
    device_augment.augment_policy("randaugment")


def test_input_wait_meter_counts_only_judged_steps():
  meter = InputWaitMeter()
  meter.record(0.010, None)  # first step: not judged
  meter.record(0.030, True)
  meter.record(0.020, False)
  assert meter.interval() == pytest.approx({"input_wait_ms": 20.0,
                                            "input_bound_fraction": 0.5})
  meter.record(0.040, True)
  assert meter.interval() == pytest.approx({"input_wait_ms": 40.0,
                                            "input_bound_fraction": 1.0})
  assert meter.total() == pytest.approx({"input_wait_ms": 25.0,
                                         "input_bound_fraction": 2 / 3})


def _final_input_line(records) -> tuple[float, float]:
  for record in records:
    found = re.search(r"input: ([\d.]+) ms per step .* in (\d+)% of the steps",
                      record.getMessage())
    if found:
      return float(found.group(1)), float(found.group(2))
  raise AssertionError("no input summary logged")


def test_a_slow_input_pipeline_is_reported_as_input_bound(built_union, tmp_path,
                                                          monkeypatch, caplog):
  _, data_dir = built_union
  config = tiny_config(data_dir, **{**SHORT_RUN, "num_train_steps": 8,
                                    "log_every_steps": 100,
                                    "checkpoint_every_steps": 100,
                                    "eval_every_steps": 100})
  next_batch = feeds.HostFeed.next_batch

  def slow_next_batch(self, step):
    time.sleep(0.25)
    return next_batch(self, step)

  monkeypatch.setattr(feeds.HostFeed, "next_batch", slow_next_batch)
  caplog.set_level(logging.INFO, logger=loop.log.name)
  loop.train_and_evaluate(config, str(tmp_path / "slow"),
                           loop.Trainer(config, str(tmp_path / "slow")))
  wait_ms, bound_percent = _final_input_line(caplog.records)
  assert wait_ms >= 250
  assert bound_percent >= 80  # the tiny step takes milliseconds: the device idles


def test_cpu_steps_get_the_compile_options_a_jaxlib_accepts(monkeypatch):
  assert implementation.compiler_options("xla") == {}  # XLA's defaults off the CPU path
  assert (implementation.compiler_options("cpu")
          == compile_options.CPU_COMPILER_OPTIONS)
  monkeypatch.setattr(compile_options, "CPU_COMPILER_OPTIONS",
                      {"xla_no_such_option": "1"})
  assert implementation.compiler_options("cpu") == {}  # probed, refused, left out
