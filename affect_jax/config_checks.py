"""Checks a training config before anything is built or compiled, and reports every
problem at once (unknown names, impossible values) with the key that holds it.

Unknown keys and wrong types given on the command line are already refused by
ml_collections (`--config.x=...` on a locked config); this covers values.
"""
from __future__ import annotations

from affect_jax import losses, models

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AUGMENT_POLICIES = ("none", "basic", "strong", "randaugment")
DEVICE_AUGMENT_POLICIES = ("none", "basic", "strong")  # affect_jax/device_data.py
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTINGS = ("fixed", "uncertainty")
INIT_PARTS = ("backbone", "backbone+heads")
# Scores compute_scores can return for the tasks a model has; the best checkpoint is
# chosen by one of them.
SCORES_OF_TASK = {"va": ("p_va", "ccc_valence", "ccc_arousal"),
                  "expression": ("expr_f1", "expr_accuracy"),
                  "au": ("au_f1", "au_accuracy", "au_f1_best_thresholds")}
# Below this input size ResNet-18's last stage works on 2x2 maps, where XLA:CPU's
# convolution is two orders of magnitude slower (measured: 0.5 GFLOP/s).
SMALLEST_IMAGE_SIZE = 32


def _one_of(problems: list, key: str, value, allowed) -> None:
  if value not in allowed:
    problems.append(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(problems: list, key: str, value) -> None:
  if not isinstance(value, (int, float)) or value <= 0:
    problems.append(f"{key}={value!r} must be a positive number")


def config_problems(config) -> list[str]:
  """Every problem of the config, as 'key=value ...' sentences (empty when valid)."""
  problems: list[str] = []
  tasks = tuple(config.model.tasks)
  unknown = [t for t in tasks if t not in models.TASKS]
  if not tasks or unknown or len(set(tasks)) != len(tasks):
    problems.append(f"model.tasks={tasks!r} must be a non-empty subset of "
                    f"{models.TASKS} without repeats")
  _one_of(problems, "model.num_expr_classes", config.model.num_expr_classes, (7, 8))
  _one_of(problems, "model.dtype", config.model.dtype, DTYPES)
  _one_of(problems, "loss.expression", config.loss.expression,
          losses.EXPRESSION_LOSS_KINDS)
  _one_of(problems, "loss.au", config.loss.au, losses.AU_LOSS_KINDS)
  _one_of(problems, "loss.va", config.loss.va, losses.VA_LOSS_KINDS)
  _one_of(problems, "loss.weighting", config.loss.weighting, WEIGHTINGS)
  for task, weight in config.loss.weights.items():
    if task not in models.TASKS or not isinstance(weight, (int, float)) or weight < 0:
      problems.append(f"loss.weights.{task}={weight!r}: tasks are {models.TASKS}, "
                      "weights non-negative numbers")
  _one_of(problems, "optimizer.name", config.optimizer.name, OPTIMIZERS)
  _one_of(problems, "optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  _positive(problems, "optimizer.learning_rate", config.optimizer.learning_rate)
  _one_of(problems, "input.augment", config.input.augment, AUGMENT_POLICIES)
  for key in ("input.batch_size", "input.eval_batch_size", "num_train_steps",
              "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    node, leaf = (config.input, key[6:]) if key.startswith("input.") else (config, key)
    _positive(problems, key, node[leaf])
  if config.input.image_size < SMALLEST_IMAGE_SIZE:
    problems.append(f"input.image_size={config.input.image_size} is below "
                    f"{SMALLEST_IMAGE_SIZE}")
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
  known_scores = [s for t in tasks if t in SCORES_OF_TASK for s in SCORES_OF_TASK[t]]
  if best and best not in known_scores + ["p_mtl"]:
    problems.append(f"checkpoint.best_metric={best!r} is not a score of this model's "
                    f"tasks: {', '.join(known_scores + ['p_mtl'])}")
  return problems


def validate_config(config) -> None:
  problems = config_problems(config)
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def check_dataset_classes(config, expression_names) -> None:
  """The model's expression head must have as many classes as the dataset."""
  if "expression" in config.model.tasks and expression_names and len(
      expression_names) != config.model.num_expr_classes:
    raise ValueError(
        f"dataset {config.dataset.name} has {len(expression_names)} expression "
        f"classes, model.num_expr_classes is {config.model.num_expr_classes}")
