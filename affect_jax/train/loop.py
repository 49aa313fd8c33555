"""Data-parallel multi-task training and evaluation (Flax-examples style).

The steps are written per device, as under pmap: each device sees its slice of the
global batch, BatchNorm statistics are synchronised over the `data` axis, and every loss
normaliser is summed over it (see losses.py), so the loss on each device is the loss of
the global batch. They run as `jax.shard_map` under `jax.jit` over a Mesh of all devices
of all processes; with shard_map's replication checking (check_vma), differentiating the
global loss with respect to the replicated parameters yields the already all-reduced
gradient (the transpose of the implicit broadcast is a psum), so one code path serves 1
CPU, 8 GPUs and a multi-host pod, and 1-device and 8-device steps agree."""
from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable

import jax
import ml_collections
from clu import parameter_overview

from affect_jax import config_checks
from affect_jax.data import augment, pipeline, records
from affect_jax.data_parallel import create_mesh, local_batch_size
from affect_jax.errors import InputError
from affect_jax.eval.evaluation import evaluate
from affect_jax.eval.writers import InputWaitMeter, MetricWriter, ProgressLogger
from affect_jax.model import implementation
from affect_jax.model.multitask import DTYPES, create_model
from affect_jax.train import checkpoints, init_from
from affect_jax.train.feeds import DeviceFeed, HostFeed
from affect_jax.train.guards import NonFiniteGuard, PreemptionNotice, _record_videos
from affect_jax.train.optimizers import create_learning_rate_fn
from affect_jax.train.run_config import check_and_write_config, dataset_identity
from affect_jax.train.step_functions import (
  compile_eval_step,
  compile_train_step,
  loss_settings_from_config,
)
from affect_jax.train.train_state import (
  TrainState,
  abstract_train_state,
  create_train_state,
)

log = logging.getLogger(__name__)


class MissingDatasetError(InputError, FileNotFoundError):
  """The config's dataset is not built where it says (also a FileNotFoundError)."""


def dataset_builder(config):
  """The TFDS builder of the config's built dataset (records.built_dataset_builder)."""
  try:
    return records.built_dataset_builder(config.dataset.name, config.dataset.data_dir)
  except InputError as e:
    raise MissingDatasetError(str(e)) from None


def builder_identity(config, builder) -> dict:
  """run_config.dataset_identity of a built dataset."""
  split_sizes = {name: (split.shard_lengths, int(split.num_bytes))
                 for name, split in builder.info.splits.items()}
  return dataset_identity(config.dataset.name, builder.info.version,
                          builder.data_dir_root, dict(builder.info.metadata),
                          split_sizes)


def _local_batch(key: str, global_batch_size: int, mesh) -> int:
  try:
    return local_batch_size(global_batch_size, mesh)
  except ValueError as e:  # says what is wrong; the key says where
    raise InputError(f"{key}: {e}") from None


class Trainer:
  """Everything a run needs, built once from the config: mesh, data, steps, state."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    config_checks.validate_config(config)
    self.config = config
    self.workdir = workdir
    builder = dataset_builder(config)
    self.metadata = dict(builder.info.metadata)
    self.dataset_identity = builder_identity(config, builder)
    self._sources = {}
    config_checks.check_dataset_classes(config, self.metadata.get("expression_names"))
    self.mesh = create_mesh(devices)
    self.local_batch = _local_batch("input.batch_size", config.input.batch_size,
                                    self.mesh)
    self.local_eval_batch = _local_batch("input.eval_batch_size",
                                         config.input.eval_batch_size, self.mesh)
    # Decided once, for the mesh the steps are compiled for.
    self.implementation = implementation.implementation_for(config.model, self.mesh)
    compiler_options = implementation.compiler_options(self.implementation)
    self.model = create_model(config.model, self.implementation)
    self.learning_rate_fn = create_learning_rate_fn(config)
    self.dtype = DTYPES[config.model.dtype]
    self.settings = loss_settings_from_config(config, self._label_statistics())
    self.train_fn = compile_train_step(
        self.mesh, compiler_options, settings=self.settings,
        learning_rate_fn=self.learning_rate_fn, dtype=self.dtype, seed=config.seed)
    self.eval_fn = compile_eval_step(self.mesh, compiler_options,
                                     num_expr_classes=config.model.num_expr_classes,
                                     dtype=self.dtype)

  @functools.cached_property
  def manager(self):
    """The run's checkpoints, opened at first use: a run refused for another config or
    dataset creates nothing in the workdir, and an evaluation restores through its own
    manager. Checkpoints whose scores cannot be read are moved aside."""
    return checkpoints.create_checkpoint_manager(
        self.workdir, keep=self.config.checkpoint.keep,
        best_metric=self.config.checkpoint.best_metric or None,
        asynchronous=self.config.checkpoint.asynchronous, set_aside_unreadable=True)

  def _label_statistics(self):
    return self.metadata.get("summary", {}).get(self.config.dataset.train_split)

  def data_source(self, split: str):
    """Each split opened (and checked against TFDS's decoding) once per Trainer, not at
    every evaluation; the data pipeline and the non-finite report share the source."""
    if split not in self._sources:
      self._sources[split] = records.open_data_source(
          self.config.dataset.name, split, self.config.dataset.data_dir)
    return self._sources[split]

  @property
  def train_source(self):
    return self.data_source(self.config.dataset.train_split)

  def train_iterator(self):
    ds = pipeline.train_dataset(
        self.train_source, global_batch_size=self.config.input.batch_size,
        seed=self.config.seed,
        augment=augment.AugmentConfig.from_policy(self.config.input.augment),
        process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=self.config.input.image_size,
        task_balanced=self.config.input.task_balanced)
    return pipeline.as_iterator(ds, self.config.input.worker_count,
                                      self.config.input.worker_buffer_size)

  def train_feed(self) -> "HostFeed | DeviceFeed":
    if self.config.input.get("device_resident", False):
      return DeviceFeed(self)
    return HostFeed(self)

  def eval_data(self, split: str | None = None):
    source = self.data_source(split or self.config.dataset.eval_split)
    ds = pipeline.eval_dataset(source, local_batch_size=self.local_eval_batch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     image_size=self.config.input.image_size)
    num_batches = pipeline.eval_num_batches(len(source), self.local_eval_batch,
                                                  jax.process_count())
    if self.config.eval_max_batches:
      num_batches = min(num_batches, self.config.eval_max_batches)
    return ds, num_batches

  def new_state(self) -> TrainState:
    return create_train_state(self.config, self.model, self.mesh, self.learning_rate_fn)

  def abstract_state(self) -> TrainState:
    return abstract_train_state(self.config, self.model, self.mesh,
                                self.learning_rate_fn)

  def restore_for_eval(self, step: int | None = None, current=None) -> TrainState:
    """checkpoints.restore_for_eval onto this Trainer's mesh."""
    return checkpoints.restore_for_eval(self.config, self.workdir, self.mesh, step,
                                        current)

  def evaluate(self, state, split: str | None = None, collect_outputs: bool = False):
    ds, num_batches = self.eval_data(split)
    return evaluate(self.eval_fn, state, ds, num_batches, self.mesh,
                    collect_outputs=collect_outputs,
                    worker_count=self.config.input.worker_count)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       trainer: Trainer | None = None,
                       on_evaluation: Callable[[int, dict], bool] | None = None
                       ) -> TrainState:
  """Trains (resuming from the workdir's latest checkpoint, else config.init_from, else
  from scratch), evaluates, checkpoints; SIGTERM saves and stops early. A caller that
  evaluates afterwards can pass its Trainer to reuse the compiled steps.

  `on_evaluation(step, scores)` sees each evaluation once it is logged; returning True
  stops the run after that step's checkpoint (a search pruning a trial), so the workdir
  stays consistent and a later start resumes from there. With several processes it
  must answer the same on each (they save the checkpoint together)."""
  trainer = trainer or Trainer(config, workdir)
  check_and_write_config(config, workdir, trainer.dataset_identity)
  latest = trainer.manager.latest_step()  # opened by every process at this point
  writer = MetricWriter(workdir)
  feed = trainer.train_feed()
  if latest is not None:
    state = checkpoints.restore_newest_readable(trainer.manager, trainer.abstract_state(),
                                                feed.checkpoint_iterator)
    log.info("resuming from checkpoint at step %d in %s", int(state.step), workdir)
  else:
    state = trainer.new_state()
    if config.init_from.path:
      state, copied = init_from.warm_start(state, config.init_from.path,
                                                config.init_from.parts,
                                                config.init_from.step)
      log.info("initialised %s from %s", ", ".join(copied), config.init_from.path)
  start_step = int(state.step)
  writer.start_at(start_step)
  if jax.process_index() == 0:
    log.info("parameters:\n%s", parameter_overview.get_parameter_overview(
        state.params, include_stats=False, max_lines=12))
  progress = ProgressLogger(config.num_train_steps, start_step,
                            images_per_step=config.input.batch_size)
  guard = NonFiniteGuard(config.get("max_nonfinite_steps_in_row", 10),
                         _record_videos(trainer.train_source))
  waits = InputWaitMeter()
  pending = None  # the previous step's finite flag, read one step late (no stall)
  synchronised = True  # the host waited for the device: nothing to judge next step
  try:
    with PreemptionNotice() as preemption:
      for step in range(start_step + 1, config.num_train_steps + 1):
        started = time.perf_counter()
        drawn = feed.next_batch(step)
        waits.record(time.perf_counter() - started,
                     None if synchronised or pending is None else pending[1].is_ready())
        state, step_metrics, record_index = feed.train(trainer.train_fn, state, drawn)
        synchronised = False
        if pending is not None:
          guard.check(pending[0], float(pending[1]), pending[2])
        pending = (step, step_metrics["finite"], record_index)
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          values["skipped_steps"] = guard.total
          values.update(waits.interval())
          writer.write_scalars(step, values, prefix="train")
          progress.log(step, values)
          synchronised = True
        scores, asked_to_stop = None, False
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
          scores, _ = trainer.evaluate(state)
          writer.write_scores(step, config.dataset.eval_split, scores)
          asked_to_stop = bool(on_evaluation and on_evaluation(step, scores))
        stop = preemption.should_stop()
        if step % config.checkpoint_every_steps == 0 or scores is not None or stop:
          checkpoints.save_checkpoint(trainer.manager, step, state,
                                      feed.checkpoint_iterator, scores,
                                      force=stop or asked_to_stop)
          synchronised = True
        if asked_to_stop:
          log.info("stopped at step %d: the evaluation callback asked to", step)
          break
        if stop:
          log.warning("stopped at step %d after SIGTERM; the next start resumes", step)
          break
      if pending is not None:
        guard.check(pending[0], float(pending[1]), pending[2])
  finally:
    trainer.manager.wait_until_finished()
    feed.close()
    writer.close()
  total = waits.total()
  log.info("input: %.1f ms per step waiting for batches; the device waited for data "
           "in %.0f%% of the steps judged", total["input_wait_ms"],
           100 * total["input_bound_fraction"])
  return state


def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        split: str | None = None, devices=None) -> tuple[int, dict]:
  """`--mode eval`: restores a checkpoint (written on any number of devices) onto
  `devices` (default: all), evaluates, appends to metrics.jsonl."""
  trainer = Trainer(config, workdir, devices)
  state = trainer.restore_for_eval(step)
  split = split or config.dataset.eval_split
  scores, _ = trainer.evaluate(state, split)
  step = int(state.step)
  writer = MetricWriter(workdir)
  writer.write_scores(step, split, scores, mode="eval")
  writer.close()
  log.info("step %d %s: %s", step, split, json.dumps(
      {k: v for k, v in scores.items() if isinstance(v, float)}))
  return step, scores


