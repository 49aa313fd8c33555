"""Data-parallel multi-task training and evaluation (Flax-examples style).

The steps are written per device, as under pmap: each device sees its slice of the
global batch, BatchNorm statistics are synchronised over the `data` axis, and every loss
normaliser is summed over it (see losses.py), so the loss on each device is the loss of
the global batch. They run as `jax.shard_map` under `jax.jit` over a Mesh of all devices
of all processes; with shard_map's replication checking (check_vma), differentiating the
global loss with respect to the replicated parameters yields the already all-reduced
gradient (the transpose of the implicit broadcast is a psum), so one code path serves 1
CPU, 8 GPUs and a multi-host pod, and 1-device and 8-device steps agree.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from affect_jax import (checkpoints, config_checks, device_data, initialization,
                        input_pipeline, losses, metrics, models)
from affect_jax.metric_writer import InputWaitMeter, MetricWriter, ProgressLogger

log = logging.getLogger(__name__)
AXIS = "data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Task names of the model and the dataset summary's names for the same tasks.
SUMMARY_TASK = {"expression": "expr", "au": "au", "va": "va"}


class TrainState(train_state.TrainState):
  batch_stats: Any


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """What the loss needs besides outputs and labels; constants of the compiled step."""
  tasks: tuple[str, ...]
  expression: str = "ce"
  au: str = "bce"
  va: str = "ccc"
  label_smoothing: float = 0.0
  focal_gamma: float = 2.0
  weighting: str = "fixed"
  weights: tuple[tuple[str, float], ...] = ()
  class_weights: tuple[float, ...] | None = None
  au_pos_weights: tuple[float, ...] | None = None


def create_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def create_model(model_config, *, axis_name: str | None = AXIS) -> models.MultiTaskNet:
  return models.MultiTaskNet(
      tasks=tuple(model_config.tasks), num_expr_classes=model_config.num_expr_classes,
      head_hidden_dim=model_config.head_hidden_dim,
      dropout_rate=model_config.dropout_rate,
      stage_sizes=tuple(model_config.stage_sizes), num_filters=model_config.num_filters,
      dtype=DTYPES[model_config.dtype],
      bn_axis_name=axis_name if model_config.sync_batch_norm else None)


def create_learning_rate_fn(config) -> optax.Schedule:
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.num_train_steps)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)
  if opt.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, max(warmup, 1)),
         optax.constant_schedule(opt.learning_rate)], [warmup])
  raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}; cosine or constant")


def decay_mask(params) -> Any:
  """True for weights that take weight decay: kernels, not BN parameters or biases."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: path[-1] == "kernel", params)


def _base_optimizer(opt, learning_rate_fn) -> optax.GradientTransformation:
  if opt.name == "sgd":
    parts = []
    if opt.weight_decay:
      parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(learning_rate_fn, momentum=opt.momentum,
                           nesterov=opt.nesterov))
    return optax.chain(*parts)
  if opt.name == "adamw":
    return optax.adamw(learning_rate_fn, weight_decay=opt.weight_decay, mask=decay_mask)
  raise ValueError(f"unknown optimizer.name {opt.name!r}; expected sgd or adamw")


def parameter_part(params) -> Any:
  """'backbone' for the shared ResNet's parameters, 'heads' for everything else."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: "backbone" if path[:2] == ("model", "backbone") else "heads",
      params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """optax optimizer; the backbone can learn at a multiple of the heads' rate and stay
  frozen (no update at all, weight decay included) for its first steps."""
  opt = config.optimizer
  multiplier = opt.get("backbone_lr_multiplier", 1.0)
  freeze_steps = opt.get("freeze_backbone_steps", 0)
  backbone = _base_optimizer(opt, lambda step: learning_rate_fn(step) * multiplier)
  if freeze_steps:
    backbone = optax.chain(backbone, optax.scale_by_schedule(
        lambda step: (step >= freeze_steps).astype(jnp.float32)))
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if multiplier == 1.0 and not freeze_steps:
    parts.append(_base_optimizer(opt, learning_rate_fn))
  else:
    parts.append(optax.multi_transform(
        {"backbone": backbone, "heads": _base_optimizer(opt, learning_rate_fn)},
        parameter_part))
  return optax.chain(*parts)


def initial_variables(model: models.MultiTaskNet, rng, image_size: int,
                      weighting: str) -> dict:
  """Model variables plus the loss's own trainable parameters (task log-variances)."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # BN sync needs a named axis; initialisation computes no statistics, so use a
  # twin model without it.
  variables = model.clone(bn_axis_name=None).init({"params": rng}, dummy, train=False)
  loss_params = {}
  if weighting == "uncertainty":
    loss_params = {task: jnp.zeros((), jnp.float32) for task in model.tasks}
  return {"params": {"model": variables["params"], "loss": loss_params},
          "batch_stats": variables.get("batch_stats", {})}


def _state_initializer(config, model, learning_rate_fn):
  tx = create_optimizer(config, learning_rate_fn)

  def init(rng):
    variables = initial_variables(model, rng, config.input.image_size,
                                  config.loss.weighting)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])

  return init


def init_key(seed: int):
  # The 'rbg' generator compiles in a fraction of threefry's time on XLA:CPU, where
  # threefry costs seconds per parameter shape; initialisation is its only user here.
  return jax.random.key(seed, impl="rbg")


def create_train_state(config, model, mesh: Mesh, learning_rate_fn) -> TrainState:
  """A replicated TrainState, initialised from config.seed on every device."""
  init = _state_initializer(config, model, learning_rate_fn)
  replicated = NamedSharding(mesh, P())
  return jax.jit(init, out_shardings=replicated)(init_key(config.seed))


def abstract_train_state(config, model, mesh: Mesh, learning_rate_fn) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState, computing nothing:
  what a restore needs."""
  init = _state_initializer(config, model, learning_rate_fn)
  shapes = jax.eval_shape(init, init_key(config.seed))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def loss_settings_from_config(config, label_statistics: dict | None) -> LossSettings:
  """Fixes the loss; class / positive weights come from the training-set counts."""
  cfg = config.loss
  tasks = tuple(config.model.tasks)
  class_weights = pos_weights = None
  if "expression" in tasks and cfg.expression == "weighted_ce":
    counts = _required_counts(label_statistics, "expr_class_counts")
    class_weights = tuple(float(w) for w in losses.class_weights_from_counts(counts))
  if "au" in tasks and cfg.au == "weighted_bce":
    positives = _required_counts(label_statistics, "au_positive_counts")
    totals = [label_statistics["labelled"]["au"]] * len(positives)
    pos_weights = tuple(float(w) for w in losses.pos_weights_from_counts(positives,
                                                                          totals))
  return LossSettings(
      tasks=tasks, expression=cfg.expression, au=cfg.au, va=cfg.va,
      label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma,
      weighting=cfg.weighting, weights=tuple(sorted(cfg.weights.items())),
      class_weights=class_weights, au_pos_weights=pos_weights)


def _required_counts(label_statistics, key):
  if not label_statistics or key not in label_statistics:
    raise ValueError(f"a weighted loss needs the training split's {key}, which the "
                     "dataset's metadata summary lacks (rebuild it with "
                     "python -m tfds_affwild2.build)")
  return np.asarray(label_statistics[key], np.float64)


def task_losses(outputs, batch, settings: LossSettings, axis_name) -> dict:
  """The masked loss of each enabled task over the global batch."""
  result = {}
  if "expression" in settings.tasks:
    result["expression"] = losses.expression_loss(
        outputs["expression"], batch["expression"], batch["expression_mask"],
        kind=settings.expression, class_weights=_array_or_none(settings.class_weights),
        label_smoothing=settings.label_smoothing, focal_gamma=settings.focal_gamma,
        axis_name=axis_name)
  if "au" in settings.tasks:
    result["au"] = losses.au_loss(
        outputs["au"], batch["au"], batch["au_mask"], kind=settings.au,
        pos_weight=_array_or_none(settings.au_pos_weights),
        focal_gamma=settings.focal_gamma, axis_name=axis_name)
  if "va" in settings.tasks:
    result["va"] = losses.va_loss(outputs["va"], batch["valence_arousal"],
                                  batch["va_mask"], kind=settings.va,
                                  axis_name=axis_name)
  return result


def _array_or_none(values):
  return None if values is None else jnp.asarray(values, jnp.float32)


def train_step(state: TrainState, batch: dict, *, settings: LossSettings,
               learning_rate_fn: Callable, dtype, seed: int, axis_name: str = AXIS):
  """One SGD step on the global batch (per-device code; see the module docstring)."""
  dropout_rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                                      state.step),
                                   jax.lax.axis_index(axis_name))
  images = input_pipeline.normalize_images(batch["image"], dtype)

  def loss_fn(params):
    outputs, new_model_state = state.apply_fn(
        {"params": params["model"], "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    per_task = task_losses(outputs, batch, settings, axis_name)
    uncertainty = settings.weighting == "uncertainty"
    total, _ = losses.combine_task_losses(
        per_task, weights=None if uncertainty else dict(settings.weights),
        log_variances=params["loss"] if uncertainty else None)
    return total, (new_model_state, per_task)

  (total, (new_model_state, per_task)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # A non-finite loss or gradient (a bad batch, an overflow) must not poison the
  # weights: the update is skipped, the step still counts, the host counts the streak.
  finite = jnp.isfinite(total) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  updated = state.apply_gradients(grads=grads,
                                  batch_stats=new_model_state["batch_stats"])
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                           state.replace(step=updated.step))
  step_metrics = {f"loss_{task}": value for task, value in per_task.items()}
  step_metrics["loss"] = sum(per_task.values())
  step_metrics["finite"] = finite.astype(jnp.float32)
  step_metrics["learning_rate"] = learning_rate_fn(state.step)
  if settings.weighting == "uncertainty":
    step_metrics.update({f"log_variance_{t}": v for t, v in state.params["loss"].items()})
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict, *, num_expr_classes: int, dtype,
              au_thresholds=None, axis_name: str = AXIS):
  """Sufficient statistics of one global batch, and the per-frame outputs."""
  images = input_pipeline.normalize_images(batch["image"], dtype)
  outputs = state.apply_fn({"params": state.params["model"],
                            "batch_stats": state.batch_stats}, images, train=False)
  statistics = metrics.batch_statistics(outputs, batch,
                                        num_expr_classes=num_expr_classes,
                                        au_thresholds=au_thresholds,
                                        axis_name=axis_name)
  return statistics, outputs


# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default; its convolution
# kernel gradients are 2-4x slower than Eigen's here, so CPU steps keep YNNPACK for the
# reductions and dots only (train step 1.2x; docs/PERFORMANCE.md). A debug option:
# probed once, dropped where a jaxlib does not know it (an unknown option is an error).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
  cpu = jax.devices("cpu")[0]
  probe = jax.jit(lambda x: x + 1, compiler_options=dict(options))
  try:
    probe.lower(jax.ShapeDtypeStruct(
        (), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))).compile()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError and kin)
    log.info("XLA:CPU compile options %s not supported here (%s); using defaults",
             dict(options), str(e).splitlines()[0][:200])
    return False
  return True


def step_compiler_options(mesh: Mesh) -> dict:
  """Compile options of the train and eval steps on `mesh`: CPU_COMPILER_OPTIONS on a
  CPU mesh whose jaxlib accepts them, none elsewhere."""
  if any(d.platform != "cpu" for d in mesh.devices.flat):
    return {}
  options = tuple(sorted(CPU_COMPILER_OPTIONS.items()))
  return dict(options) if _cpu_accepts(options) else {}


def _compile(step, mesh: Mesh, out_specs, compiler_options: dict | None, **jit_kwargs):
  """`step` under shard_map over `mesh` (state replicated, batch split), jitted with
  compiler_options (None: step_compiler_options(mesh); {}: XLA's defaults)."""
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs)
  return jax.jit(sharded, compiler_options=(
      step_compiler_options(mesh) if compiler_options is None else compiler_options),
                 **jit_kwargs)


def compile_train_step(mesh: Mesh, compiler_options: dict | None = None, **step_kwargs):
  return _compile(functools.partial(train_step, **step_kwargs), mesh, (P(), P()),
                  compiler_options, donate_argnums=(0,))


def compile_eval_step(mesh: Mesh, compiler_options: dict | None = None, **step_kwargs):
  return _compile(functools.partial(eval_step, **step_kwargs), mesh, (P(), P(AXIS)),
                  compiler_options)


def device_batch(local_batch: dict, mesh: Mesh) -> dict:
  """A global batch array from each process's local part (no cross-host copies)."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Checks divisibility before anything compiles; returns this process's share."""
  devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(f"batch size {global_batch_size} must be a positive multiple of "
                     f"the number of devices ({devices})")
  return global_batch_size // jax.process_count()


def evaluate(eval_fn, state: TrainState, dataset, num_batches: int, mesh: Mesh, *,
             collect_outputs: bool = False, worker_count: int = 0,
             max_frames_per_fetch: int = metrics.MAX_FRAMES_PER_DEVICE_TOTAL):
  """One pass over an eval dataset; exact scores from summed statistics, totalled on
  the device and fetched every `max_frames_per_fetch` frames and at the end.

  Returns (scores, collected) where collected holds per-frame outputs, labels and
  record indices (padding removed) when `collect_outputs`.
  """
  accumulator = metrics.DeviceStatisticsAccumulator(max_frames_per_fetch)
  collected: dict[str, list] = {}
  iterator = input_pipeline.as_iterator(dataset, worker_count)
  try:
    for _, local_batch in zip(range(num_batches), iterator):
      batch = device_batch(local_batch, mesh)
      statistics, outputs = eval_fn(state, batch)
      accumulator.add(statistics, frames=batch["image"].shape[0])
      if collect_outputs:
        _collect(collected, outputs, local_batch)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  scores = metrics.compute_scores(accumulator.result())
  if collect_outputs:
    collected = {k: np.concatenate(v) for k, v in collected.items()}
    keep = collected["record_index"] >= 0
    collected = {k: v[keep] for k, v in collected.items()}
  return scores, collected


def _collect(collected: dict, outputs: dict, local_batch: dict) -> None:
  local = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)
                         if jax.process_count() > 1 else v) for k, v in outputs.items()}
  if jax.process_count() > 1:
    local_batch = {k: np.asarray(multihost_utils.process_allgather(
        v, tiled=True)) for k, v in local_batch.items() if k != "image"}
  for key, value in local.items():
    collected.setdefault(f"pred_{key}", []).append(value)
  for key, value in local_batch.items():
    if key != "image":
      collected.setdefault(key, []).append(np.asarray(value))


def dataset_metadata(config) -> dict:
  """The built dataset's metadata: class names and the per-split label counts."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tfds_affwild2  # pylint: disable=g-import-not-at-top,unused-import
  try:
    builder = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir)
  except Exception as e:  # TFDS raises several types for a missing dataset
    raise FileNotFoundError(
        f"dataset {config.dataset.name} not found in data_dir "
        f"{config.dataset.data_dir!r} (build it with python -m tfds_affwild2.build): "
        f"{e}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {config.dataset.name} is not built in {builder.data_dir_root}; build "
        "it with python -m tfds_affwild2.build")
  return dict(builder.info.metadata)


class Trainer:
  """Everything a run needs, built once from the config: mesh, data, steps, state."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    config_checks.validate_config(config)
    self.config = config
    self.workdir = workdir
    self.metadata = dataset_metadata(config)
    self._sources = {}
    config_checks.check_dataset_classes(config, self.metadata.get("expression_names"))
    self.mesh = create_mesh(devices)
    self.local_batch = local_batch_size(config.input.batch_size, self.mesh)
    self.local_eval_batch = local_batch_size(config.input.eval_batch_size, self.mesh)
    self.model = create_model(config.model)
    self.learning_rate_fn = create_learning_rate_fn(config)
    self.dtype = DTYPES[config.model.dtype]
    self.settings = loss_settings_from_config(config, self._label_statistics())
    self.train_fn = compile_train_step(
        self.mesh, settings=self.settings, learning_rate_fn=self.learning_rate_fn,
        dtype=self.dtype, seed=config.seed)
    self.eval_fn = compile_eval_step(self.mesh,
                                     num_expr_classes=config.model.num_expr_classes,
                                     dtype=self.dtype)
    self.manager = checkpoints.create_checkpoint_manager(
        workdir, keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric or None,
        asynchronous=config.checkpoint.asynchronous)

  def _label_statistics(self):
    return self.metadata.get("summary", {}).get(self.config.dataset.train_split)

  def data_source(self, split: str):
    """Each split opened (and checked against TFDS's decoding) once per Trainer, not at
    every evaluation; the data pipeline and the non-finite report share the source."""
    if split not in self._sources:
      self._sources[split] = input_pipeline.open_data_source(
          self.config.dataset.name, split, self.config.dataset.data_dir)
    return self._sources[split]

  @property
  def train_source(self):
    return self.data_source(self.config.dataset.train_split)

  def train_iterator(self):
    ds = input_pipeline.train_dataset(
        self.train_source, global_batch_size=self.config.input.batch_size,
        seed=self.config.seed,
        augment=input_pipeline.AugmentConfig.from_policy(self.config.input.augment),
        process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=self.config.input.image_size,
        task_balanced=self.config.input.task_balanced)
    return input_pipeline.as_iterator(ds, self.config.input.worker_count,
                                      self.config.input.worker_buffer_size)

  def train_feed(self) -> "HostFeed | DeviceFeed":
    if self.config.input.get("device_resident", False):
      return DeviceFeed(self)
    return HostFeed(self)

  def eval_data(self, split: str | None = None):
    source = self.data_source(split or self.config.dataset.eval_split)
    ds = input_pipeline.eval_dataset(source, local_batch_size=self.local_eval_batch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     image_size=self.config.input.image_size)
    num_batches = input_pipeline.eval_num_batches(len(source), self.local_eval_batch,
                                                  jax.process_count())
    if self.config.eval_max_batches:
      num_batches = min(num_batches, self.config.eval_max_batches)
    return ds, num_batches

  def new_state(self) -> TrainState:
    return create_train_state(self.config, self.model, self.mesh, self.learning_rate_fn)

  def abstract_state(self) -> TrainState:
    return abstract_train_state(self.config, self.model, self.mesh,
                                self.learning_rate_fn)

  def evaluate(self, state, split: str | None = None, collect_outputs: bool = False):
    ds, num_batches = self.eval_data(split)
    return evaluate(self.eval_fn, state, ds, num_batches, self.mesh,
                    collect_outputs=collect_outputs,
                    worker_count=self.config.input.worker_count)


class HostFeed:
  """Training batches from the grain pipeline: each process's rows placed on the mesh;
  the iterator's position goes into every checkpoint."""

  def __init__(self, trainer: Trainer):
    self.checkpoint_iterator = trainer.train_iterator()
    self._mesh = trainer.mesh

  def next_batch(self, step: int) -> tuple[dict, Any]:
    del step  # the iterator knows its position
    local = next(self.checkpoint_iterator)
    return device_batch(local, self._mesh), local["record_index"]

  def close(self) -> None:
    if hasattr(self.checkpoint_iterator, "close"):
      self.checkpoint_iterator.close()


class DeviceFeed:
  """`config.input.device_resident`: the split decoded once onto the devices, each
  batch drawn and augmented there (affect_jax/device_data.py). Batch s is a function of
  (seed, s) alone, so checkpoints carry no data position and a resumed run continues
  with the very batches it would have drawn."""

  checkpoint_iterator = None

  def __init__(self, trainer: Trainer):
    config = trainer.config
    start = time.perf_counter()
    self.dataset = device_data.load_split_to_device(
        trainer.train_source, trainer.mesh, image_size=config.input.image_size)
    log.info("training split on the devices: %d records, %.2f GB, loaded in %.1f s",
             self.dataset.num_records, self.dataset.images.nbytes / 1e9,
             time.perf_counter() - start)
    self._draw = device_data.compile_draw_batch(
        trainer.mesh, global_batch_size=config.input.batch_size, seed=config.seed,
        augment=config.input.augment, image_size=config.input.image_size)

  def next_batch(self, step: int) -> tuple[dict, Any]:
    batch = self._draw(self.dataset, step - 1)  # training steps count from 1
    return batch, batch["record_index"]

  def close(self) -> None:
    pass


# Settings that may differ when a run is resumed: they change no result.
RESUMABLE_CHANGES = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "eval_max_batches", "allow_config_change", "dataset.data_dir",
                     "input.worker_count", "input.worker_buffer_size",
                     "input.eval_batch_size", "checkpoint.keep",
                     "checkpoint.asynchronous", "max_nonfinite_steps_in_row")


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
ADDED_KEYS = {"input.device_resident": False}


def config_differences(saved: dict, current: dict) -> list[str]:
  """Keys whose values differ between two configs, ignoring RESUMABLE_CHANGES."""
  old = {**ADDED_KEYS, **_flat_config(saved)}
  new = {**ADDED_KEYS, **_flat_config(current)}
  return sorted(k for k in old.keys() | new.keys()
                if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


def check_and_write_config(config, workdir: str) -> None:
  """Refuses to resume a workdir whose run had another config (unless
  config.allow_config_change); then records the config as `config.json`."""
  if jax.process_index() != 0:
    return  # process 0 checks and writes; a refusal there ends the whole run
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path) and not config.get("allow_config_change", False):
    with open(path) as f:
      differences = config_differences(json.load(f), current)
    if differences:
      raise ValueError(
          f"{workdir} holds a run with another config (different: "
          f"{', '.join(differences)}); use a new --workdir, or pass "
          "--config.allow_config_change=True to resume with the new values")
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)  # readers never see half a file


class NonFiniteLossError(RuntimeError):
  pass


class NonFiniteGuard:
  """Counts skipped (non-finite) steps; too many in a row stops the run with the step
  and the videos of the last bad batch."""

  def __init__(self, max_in_row: int, describe_records: Callable[[np.ndarray], str]):
    self.max_in_row = max_in_row
    self.in_row = 0
    self.total = 0
    self._describe = describe_records

  def check(self, step: int, finite: float, record_indices: np.ndarray) -> None:
    if finite:
      self.in_row = 0
      return
    self.in_row += 1
    self.total += 1
    log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, "
                "%d in all)", step, self.in_row, self.total)
    if self.max_in_row and self.in_row >= self.max_in_row:
      raise NonFiniteLossError(
          f"{self.in_row} steps in a row with a non-finite loss or gradients, the last "
          f"at step {step}; its batch held {self._describe(record_indices)}. Lower the "
          "learning rate, enable optimizer.grad_clip_norm, or check these frames.")


class PreemptionNotice:
  """SIGTERM (what a pre-empted cloud VM receives) asks the loop to checkpoint and stop
  at the next step; all processes stop at the same step.

  With several processes the flag is agreed on through an allgather, a host
  synchronisation: it is done every `MULTI_PROCESS_CHECK_EVERY` calls (one call per
  step in every process, so they all check at the same steps), not every step.
  """

  MULTI_PROCESS_CHECK_EVERY = 10

  def __init__(self):
    self._received = False
    self._previous = None
    self._calls = 0

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and stopping")
    self._received = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self._received
    self._calls += 1
    if self._calls % self.MULTI_PROCESS_CHECK_EVERY:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._received))
    return bool(np.any(flags))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _host_values(values) -> np.ndarray:
  """A host copy of per-record values: host rows, or a (global) device array."""
  if isinstance(values, jax.Array) and not values.is_fully_addressable:
    values = multihost_utils.process_allgather(values, tiled=True)
  return np.asarray(values)


def _record_videos(source) -> Callable[[np.ndarray], str]:
  def describe(indices):
    indices = _host_values(indices)
    names = sorted({_text(source[int(i)]["video"]) for i in indices if i >= 0})
    return f"records {sorted(int(i) for i in indices)[:16]} of videos {names[:8]}"
  return describe


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       trainer: Trainer | None = None) -> TrainState:
  """Trains (resuming from the workdir's latest checkpoint, else config.init_from, else
  from scratch), evaluates, checkpoints; SIGTERM saves and stops early. A caller that
  evaluates afterwards can pass its Trainer to reuse the compiled steps."""
  trainer = trainer or Trainer(config, workdir)
  check_and_write_config(config, workdir)
  writer = MetricWriter(workdir)
  feed = trainer.train_feed()
  latest = trainer.manager.latest_step()
  if latest is not None:
    log.info("resuming from checkpoint at step %d in %s", latest, workdir)
    state = checkpoints.restore_checkpoint(trainer.manager, latest,
                                           trainer.abstract_state(),
                                           feed.checkpoint_iterator)
  else:
    state = trainer.new_state()
    if config.init_from.path:
      state, copied = initialization.warm_start(state, config.init_from.path,
                                                config.init_from.parts,
                                                config.init_from.step)
      log.info("initialised %s from %s", ", ".join(copied), config.init_from.path)
  start_step = int(state.step)
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
        batch, record_index = feed.next_batch(step)
        waits.record(time.perf_counter() - started,
                     None if synchronised or pending is None else pending[1].is_ready())
        state, step_metrics = trainer.train_fn(state, batch)
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
        scores = None
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
          scores, _ = trainer.evaluate(state)
          writer.write_scores(step, config.dataset.eval_split, scores)
        stop = preemption.should_stop()
        if step % config.checkpoint_every_steps == 0 or scores is not None or stop:
          checkpoints.save_checkpoint(trainer.manager, step, state,
                                      feed.checkpoint_iterator, scores, force=stop)
          synchronised = True
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


def restore_for_eval(trainer: Trainer, step: int | None = None,
                     current: TrainState | None = None) -> TrainState:
  """The given step's state, else the best checkpoint, else the latest; `current` is
  returned as it is when it already is that step."""
  manager = trainer.manager
  step = step or manager.best_step() or manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {trainer.workdir}/checkpoints")
  if current is not None and int(current.step) == step:
    return current
  return checkpoints.restore_checkpoint(manager, step, trainer.abstract_state())


def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        split: str | None = None, devices=None) -> tuple[int, dict]:
  """`--mode eval`: restores a checkpoint (written on any number of devices) onto
  `devices` (default: all), evaluates, appends to metrics.jsonl."""
  trainer = Trainer(config, workdir, devices)
  state = restore_for_eval(trainer, step)
  split = split or config.dataset.eval_split
  scores, _ = trainer.evaluate(state, split)
  step = int(state.step)
  writer = MetricWriter(workdir)
  writer.write_scores(step, split, scores, mode="eval")
  writer.close()
  log.info("step %d %s: %s", step, split, json.dumps(
      {k: v for k, v in scores.items() if isinstance(v, float)}))
  return step, scores
