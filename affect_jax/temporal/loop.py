"""Training and evaluation of the temporal model over embedding stores, with the frame
model's guarantees and the frame model's own parts: resume from the workdir's latest
Orbax checkpoint (state + grain iterator position: a resumed run equals an
uninterrupted one), refusal to resume with another config, the data axis of
affect_jax/data_parallel.py (1 device equals 8), the non-finite guard, metrics.jsonl,
scalars.jsonl and TensorBoard."""
from __future__ import annotations

import logging

import jax
import numpy as np

from affect_jax import config_checks, data_parallel, vocabulary
from affect_jax.data import pipeline
from affect_jax.errors import InputError
from affect_jax.eval import accumulators, metrics
from affect_jax.eval.writers import MetricWriter, ProgressLogger
from affect_jax.temporal import embed, steps, windows
from affect_jax.temporal.model import KINDS, create_model
from affect_jax.temporal.store import EmbeddingStore
from affect_jax.train import checkpoints, losses, step_functions
from affect_jax.train.guards import NonFiniteGuard, PreemptionNotice
from affect_jax.train.optimizers import create_learning_rate_fn
from affect_jax.train.run_config import check_and_write_config

log = logging.getLogger(__name__)


def config_problems(config) -> list[str]:
  model = config.model
  problems = []
  if not model.tasks or set(model.tasks) - set(vocabulary.TASKS):
    problems.append(f"model.tasks={tuple(model.tasks)} must be a non-empty subset of "
                    f"{vocabulary.TASKS}")
  if model.kind not in KINDS:
    problems.append(f"model.kind={model.kind!r}; expected one of {KINDS}")
  if model.kind == "transformer" and model.hidden_dim % model.num_heads:
    problems.append(f"model.hidden_dim={model.hidden_dim} is not a multiple of "
                    f"model.num_heads={model.num_heads}")
  for task, kinds in (("expression", losses.EXPRESSION_LOSS_KINDS),
                      ("au", losses.AU_LOSS_KINDS), ("va", losses.VA_LOSS_KINDS)):
    if config.loss[task] not in kinds:
      problems.append(f"loss.{task}={config.loss[task]!r}; expected one of {kinds}")
  for key in ("window.length", "window.train_stride", "window.eval_stride",
              "input.batch_size", "input.eval_batch_size", "num_train_steps",
              "model.hidden_dim", "model.num_layers"):
    section, name = key.split(".") if "." in key else (None, key)
    value = config[section][name] if section else config[name]
    if not isinstance(value, int) or value < 1:
      problems.append(f"{key}={value!r} must be a positive integer")
  for key in ("train_stride", "eval_stride"):
    stride = config.window[key]
    if isinstance(stride, int) and not 1 <= stride <= config.window.length:
      problems.append(f"window.{key}={stride} must be in 1..window.length "
                      f"({config.window.length})")
  if config.window.padding not in windows.PADDING_MODES:
    problems.append(f"window.padding={config.window.padding!r}; expected one of "
                    f"{windows.PADDING_MODES}")
  best = config.checkpoint.best_metric
  if best and best not in config_checks.model_scores(model.tasks):
    problems.append(f"checkpoint.best_metric={best!r} is not a score of this model's "
                    f"tasks: {', '.join(config_checks.model_scores(model.tasks))}")
  if not config.frame_run.workdir and not config.embeddings.dir:
    problems.append("frame_run.workdir is empty: name the trained frame model's workdir")
  return problems


def validate_config(config) -> None:
  problems = config_problems(config)
  if problems:
    raise InputError("invalid temporal config:\n  " + "\n  ".join(problems))


def window_settings(config, training: bool) -> windows.WindowSettings:
  stride = config.window.train_stride if training else config.window.eval_stride
  return windows.WindowSettings(config.window.length, stride, config.window.padding,
                                score_centre_only=not training)


def check_store(config, store: EmbeddingStore) -> None:
  classes = store.index.get("num_expr_classes")
  if "expression" in config.model.tasks and classes not in (
      None, config.model.num_expr_classes):
    raise InputError(f"{store.folder} holds embeddings of a model with {classes} "
                     f"expression classes; model.num_expr_classes is "
                     f"{config.model.num_expr_classes}")


def label_statistics(store: EmbeddingStore, num_expr_classes: int) -> dict:
  """The training store's label counts as weighted losses read them: a count for each
  of the model's classes (a class no frame has counts 0, and gets weight 0)."""
  statistics = dict(store.label_statistics)
  counts = list(statistics["expr_class_counts"])
  statistics["expr_class_counts"] = counts + [0] * (num_expr_classes - len(counts))
  return statistics


class TemporalTrainer:
  """Stores, mesh, model, compiled steps and checkpoint manager of one run."""

  def __init__(self, config, workdir: str, devices=None, stores=None):
    validate_config(config)
    self.config, self.workdir = config, workdir
    self.stores = stores or {
        split: embed.split_store(config, workdir, config.frame_run[f"{split}_split"])
        for split in ("train", "eval")}
    for store in self.stores.values():
      check_store(config, store)
    self.mesh = data_parallel.create_mesh(devices)
    self.local_batch = self._local_batch(config.input.batch_size, "input.batch_size")
    self.local_eval_batch = self._local_batch(config.input.eval_batch_size,
                                              "input.eval_batch_size")
    self.model = create_model(config)
    self.embedding_dim = self.stores["train"].embedding_dim
    self.learning_rate_fn = create_learning_rate_fn(config)
    settings = step_functions.loss_settings_from_config(
        config, label_statistics(self.stores["train"], config.model.num_expr_classes))
    self.train_fn = steps.compile_train_step(
        self.mesh, settings=settings, learning_rate_fn=self.learning_rate_fn,
        seed=config.seed)
    self.eval_fn = steps.compile_eval_step(
        self.mesh, num_expr_classes=config.model.num_expr_classes)
    self.manager = checkpoints.create_checkpoint_manager(
        workdir, keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric or None,
        asynchronous=config.checkpoint.asynchronous)

  def _local_batch(self, size: int, key: str) -> int:
    if size % self.mesh.devices.size:
      raise InputError(f"{key}={size} is not a multiple of the {self.mesh.devices.size} "
                       "devices")
    return size // jax.process_count()

  def train_iterator(self):
    ds = windows.train_dataset(
        self.stores["train"], window_settings(self.config, True),
        global_batch_size=self.config.input.batch_size, seed=self.config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    return pipeline.as_iterator(ds)

  def new_state(self):
    return steps.create_state(self.config, self.model, self.embedding_dim, self.mesh,
                              self.learning_rate_fn)

  def abstract_state(self):
    return steps.abstract_state(self.config, self.model, self.embedding_dim, self.mesh,
                                self.learning_rate_fn)

  def evaluate(self, state, split: str = "eval", collect_outputs: bool = False):
    """Exact scores over every frame of the split's videos, each scored once; with
    `collect_outputs`, also each scored frame's probabilities (see `evaluate_windows`)."""
    return evaluate_windows(self.eval_fn, state, self.stores[split],
                            window_settings(self.config, False), self.local_eval_batch,
                            self.mesh, collect_outputs)

  def describe_windows(self, numbers) -> str:
    table = windows.window_table(self.stores["train"].frame_counts,
                                 window_settings(self.config, True))
    numbers = [int(n) for n in np.asarray(numbers) if n >= 0]
    names = self.stores["train"].video_names
    shown = [f"{names[table[n, 0]]} from frame position {table[n, 1]}"
             for n in numbers[:8]]
    return f"windows {numbers[:16]} ({'; '.join(shown)})"


def evaluate_windows(eval_fn, state, store: EmbeddingStore,
                     settings: windows.WindowSettings, local_batch: int, mesh,
                     collect_outputs: bool = False):
  """(scores, collected): `collected` holds, when asked, `video` and `position` of every
  scored frame and `pred_<task>` its outputs (window order; one row per frame)."""
  ds, num_batches = windows.eval_dataset(store, settings, local_batch_size=local_batch,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
  accumulator = accumulators.DeviceStatisticsAccumulator()
  collected: dict[str, list] = {}
  for local in (ds[i] for i in range(num_batches)):
    batch = data_parallel.device_batch(local, mesh)
    statistics, outputs = eval_fn(state, batch)
    frames = int(np.prod(batch["scored"].shape))
    accumulator.add(statistics, frames=frames)
    if collect_outputs:
      _collect(collected, embed.host_arrays(outputs),
               embed.host_arrays({k: local[k] for k in ("video", "position", "scored")}))
  scores = metrics.compute_scores(accumulator.result())
  return scores, {k: np.concatenate(v) for k, v in collected.items()}


def _collect(collected: dict, outputs: dict, rows: dict) -> None:
  scored = rows["scored"] > 0  # [B, T]
  video = np.broadcast_to(rows["video"][:, None], scored.shape)
  collected.setdefault("video", []).append(video[scored])
  collected.setdefault("position", []).append(rows["position"][scored])
  for key, value in outputs.items():
    collected.setdefault(f"pred_{key}", []).append(value[scored])


def train_and_evaluate(config, workdir: str, trainer: TemporalTrainer | None = None):
  """Trains (resuming from the workdir's latest checkpoint), evaluates, checkpoints;
  SIGTERM saves and stops. Returns the final state."""
  trainer = trainer or TemporalTrainer(config, workdir)
  check_and_write_config(config, workdir)
  writer = MetricWriter(workdir)
  iterator = trainer.train_iterator()
  if trainer.manager.latest_step() is not None:
    state = checkpoints.restore_newest_readable(trainer.manager,
                                                trainer.abstract_state(), iterator)
    log.info("resuming from checkpoint at step %d in %s", int(state.step), workdir)
  else:
    state = trainer.new_state()
  progress = ProgressLogger(config.num_train_steps, int(state.step),
                            images_per_step=config.input.batch_size)
  guard = NonFiniteGuard(config.max_nonfinite_steps_in_row, trainer.describe_windows)
  pending = None  # the previous step's finite flag, read one step late (no stall)
  eval_split = config.frame_run.eval_split
  try:
    with PreemptionNotice() as preemption:
      for step in range(int(state.step) + 1, config.num_train_steps + 1):
        local = next(iterator)
        state, step_metrics = trainer.train_fn(
            state, data_parallel.device_batch(local, trainer.mesh))
        if pending is not None:
          guard.check(pending[0], float(pending[1]), pending[2])
        pending = (step, step_metrics["finite"], local["window"])
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          values["skipped_steps"] = guard.total
          writer.write_scalars(step, values, prefix="train")
          progress.log(step, values)
        scores = None
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
          scores, _ = trainer.evaluate(state)
          writer.write_scores(step, eval_split, scores)
        stop = preemption.should_stop()
        if step % config.checkpoint_every_steps == 0 or scores is not None or stop:
          checkpoints.save_checkpoint(trainer.manager, step, state, iterator, scores,
                                      force=stop)
        if stop:
          log.warning("stopped at step %d after SIGTERM; the next start resumes", step)
          break
      if pending is not None:
        guard.check(pending[0], float(pending[1]), pending[2])
  finally:
    trainer.manager.wait_until_finished()
    writer.close()
  return state
