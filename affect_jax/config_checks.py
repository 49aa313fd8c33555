"""Checks a training config before anything is built or compiled, and reports every
problem at once (unknown names, impossible values) with the key that holds it.

Unknown keys and wrong types given on the command line are already refused by
ml_collections (`--config.x=...` on a locked config); this covers values. Every numeric
setting has its range in one table (MODEL_RANGES, RUN_RANGES).
"""
from __future__ import annotations

import dataclasses
import math

from affect_jax import vocabulary
from affect_jax.errors import InputError
from affect_jax.model.implementation import IMPLEMENTATIONS
from affect_jax.train import losses

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AUGMENT_POLICIES = ("none", "basic", "strong", "randaugment")
# affect_jax/data/device_resident.py
DEVICE_AUGMENT_POLICIES = ("none", "basic", "strong")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTINGS = ("fixed", "uncertainty")
INIT_PARTS = ("backbone", "backbone+heads")


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a numeric setting may take: from `low` to `high`, each bound included
  unless `above_low` / `below_high`; `integer` for counts; `optional` where None means
  "not set"."""
  low: float
  high: float = math.inf
  integer: bool = False
  above_low: bool = False
  below_high: bool = False
  optional: bool = False

  def holds(self, value) -> bool:
    if value is None:
      return self.optional
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if (self.integer and not _is_int(value)) or not math.isfinite(value):
      return False
    above = value > self.low if self.above_low else value >= self.low
    below = value < self.high if self.below_high else value <= self.high
    return above and below

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a finite number"
    if self.high == math.inf:
      text = f"{kind} {'>' if self.above_low else '>='} {self.low:g}"
    else:
      text = (f"{kind} in {'(' if self.above_low else '['}{self.low:g}, "
              f"{self.high:g}{')' if self.below_high else ']'}")
    return text + (" or None" if self.optional else "")


def _count(low: int) -> Range:
  return Range(low, integer=True)


FRACTION = Range(0, 1, below_high=True)  # dropout, momentum: at 1 nothing is left
NON_NEGATIVE = Range(0)
# The keys that build the network: a restore for evaluation or prediction checks them.
MODEL_RANGES = {
    "model.num_filters": _count(1),
    "model.head_hidden_dim": _count(0),  # 0: linear heads
    "model.dropout_rate": FRACTION,
}
# What the trainer, optimizer, losses, input pipeline, evaluation and checkpoints read.
RUN_RANGES = {
    "seed": _count(0),  # NumPy and grain take non-negative seeds
    "input.batch_size": _count(1),
    "input.eval_batch_size": _count(1),
    # Below 32 ResNet-18's last stage works on 2x2 maps, where XLA:CPU's convolution is
    # two orders of magnitude slower (measured: 0.5 GFLOP/s).
    "input.image_size": _count(32),
    "input.worker_count": _count(0),  # 0: in-process
    "input.worker_buffer_size": _count(1),
    "loss.label_smoothing": Range(0, 1),
    "loss.focal_gamma": NON_NEGATIVE,
    "optimizer.learning_rate": Range(0, above_low=True),
    "optimizer.momentum": FRACTION,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.grad_clip_norm": NON_NEGATIVE,  # 0: no clipping
    "optimizer.warmup_steps": _count(0),
    "optimizer.backbone_lr_multiplier": NON_NEGATIVE,
    "optimizer.freeze_backbone_steps": _count(0),
    "init_from.step": Range(1, integer=True, optional=True),  # None: the latest
    "num_train_steps": _count(1),
    "log_every_steps": _count(1),
    "eval_every_steps": _count(1),
    "checkpoint_every_steps": _count(1),
    "eval_max_batches": _count(0),  # 0: the whole split
    "max_nonfinite_steps_in_row": _count(0),  # 0: never stop
    "checkpoint.keep": _count(1),  # Orbax keeps no periodic checkpoint at 0
}


def _value_at(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def range_problems(config, ranges: dict) -> list[str]:
  """'key=value must be ...' for each key of `ranges` whose value is outside its range.
  A key the config lacks (a run written before the key existed) is not checked."""
  problems = []
  for key, allowed in ranges.items():
    try:
      value = _value_at(config, key)
    except (KeyError, AttributeError):
      continue
    if not allowed.holds(value):
      problems.append(f"{key}={value!r} must be {allowed.describe()}")
  return problems


def _one_of(problems: list, key: str, value, allowed) -> None:
  if value not in allowed:
    problems.append(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def model_problems(config) -> list[str]:
  """The problems of the keys that build the network (config.model): what a restore
  for evaluation or prediction checks too."""
  problems: list[str] = []
  tasks = tuple(config.model.tasks)
  unknown = [t for t in tasks if t not in vocabulary.TASKS]
  if not tasks or unknown or len(set(tasks)) != len(tasks):
    problems.append(f"model.tasks={tasks!r} must be a non-empty subset of "
                    f"{vocabulary.TASKS} without repeats")
  _one_of(problems, "model.num_expr_classes", config.model.num_expr_classes, (7, 8))
  _one_of(problems, "model.dtype", config.model.dtype, DTYPES)
  _one_of(problems, "model.implementation", config.model.get("implementation", "auto"),
          IMPLEMENTATIONS)
  stages = tuple(config.model.stage_sizes)
  if not stages or not all(_is_int(n) and n > 0 for n in stages):
    problems.append(f"model.stage_sizes={stages!r} must be blocks per stage: "
                    "positive integers")
  return problems + range_problems(config, MODEL_RANGES)


def config_problems(config) -> list[str]:
  """Every problem of the config, as 'key=value ...' sentences (empty when valid)."""
  problems = model_problems(config) + range_problems(config, RUN_RANGES)
  tasks = tuple(config.model.tasks)
  _one_of(problems, "loss.expression", config.loss.expression,
          losses.EXPRESSION_LOSS_KINDS)
  _one_of(problems, "loss.au", config.loss.au, losses.AU_LOSS_KINDS)
  _one_of(problems, "loss.va", config.loss.va, losses.VA_LOSS_KINDS)
  _one_of(problems, "loss.weighting", config.loss.weighting, WEIGHTINGS)
  for task, weight in config.loss.weights.items():
    if task not in vocabulary.TASKS or not NON_NEGATIVE.holds(weight):
      problems.append(f"loss.weights.{task}={weight!r}: tasks are {vocabulary.TASKS}, "
                      "weights non-negative numbers")
  _one_of(problems, "optimizer.name", config.optimizer.name, OPTIMIZERS)
  _one_of(problems, "optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  _one_of(problems, "input.augment", config.input.augment, AUGMENT_POLICIES)
  if config.input.get("device_resident", False):
    if config.input.task_balanced:
      problems.append("input.device_resident=True draws uniform epochs on the device; "
                      "it cannot be combined with input.task_balanced=True")
    if config.input.augment not in DEVICE_AUGMENT_POLICIES:
      problems.append(f"input.device_resident=True augments on the device, which has "
                      f"the policies {', '.join(DEVICE_AUGMENT_POLICIES)}, not "
                      f"input.augment={config.input.augment!r}")
  _one_of(problems, "init_from.parts", config.init_from.parts, INIT_PARTS)
  best = config.checkpoint.best_metric
  known_scores = model_scores(tasks)
  if best and best not in known_scores:
    problems.append(f"checkpoint.best_metric={best!r} is not a score of this model's "
                    f"tasks: {', '.join(known_scores)}")
  return problems


def model_scores(tasks) -> list[str]:
  """The scores an evaluation of a model of `tasks` reports (eval/metrics.py): each
  task's own, and p_mtl only for a model of all three."""
  scores = [s for t in tasks if t in vocabulary.SCORES_OF_TASK
            for s in vocabulary.SCORES_OF_TASK[t]]
  return scores + (["p_mtl"] if set(vocabulary.TASKS) <= set(tasks) else [])


def _raise_if_any(problems: list[str]) -> None:
  if problems:  # one line: the command line prints an expected error as one line
    raise InputError("invalid config: " + "; ".join(problems))


def validate_config(config) -> None:
  """Training and evaluation: every key."""
  _raise_if_any(config_problems(config))


def validate_model_config(config) -> None:
  """Restoring a run to predict: the model's keys only. The training-only checks may
  have grown since the run was trained; they must not keep its checkpoints from use."""
  _raise_if_any(model_problems(config))


def check_dataset_classes(config, expression_names) -> None:
  """The model's expression head must have as many classes as the dataset."""
  if "expression" in config.model.tasks and expression_names and len(
      expression_names) != config.model.num_expr_classes:
    raise InputError(
        f"dataset {config.dataset.name} has {len(expression_names)} expression "
        f"classes, model.num_expr_classes is {config.model.num_expr_classes}")
