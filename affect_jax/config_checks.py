"""Checks a training config before anything is built or compiled, and reports every
problem at once (unknown names, impossible values) with the key that holds it.

Unknown keys and wrong types given on the command line are already refused by
ml_collections (`--config.x=...` on a locked config); this covers values.
"""
from __future__ import annotations

from affect_jax import vocabulary
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
# Below this input size ResNet-18's last stage works on 2x2 maps, where XLA:CPU's
# convolution is two orders of magnitude slower (measured: 0.5 GFLOP/s).
SMALLEST_IMAGE_SIZE = 32


def _one_of(problems: list, key: str, value, allowed) -> None:
  if value not in allowed:
    problems.append(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive(problems: list, key: str, value) -> None:
  if not isinstance(value, (int, float)) or value <= 0:
    problems.append(f"{key}={value!r} must be a positive number")


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
  if not _is_int(config.model.num_filters) or config.model.num_filters <= 0:
    problems.append(f"model.num_filters={config.model.num_filters!r} must be a "
                    "positive integer")
  if not _is_int(config.model.head_hidden_dim) or config.model.head_hidden_dim < 0:
    problems.append(f"model.head_hidden_dim={config.model.head_hidden_dim!r} must be "
                    "an integer, 0 for linear heads")
  if not 0 <= config.model.dropout_rate < 1:
    problems.append(f"model.dropout_rate={config.model.dropout_rate!r} must be in "
                    "[0, 1)")
  return problems


def config_problems(config) -> list[str]:
  """Every problem of the config, as 'key=value ...' sentences (empty when valid)."""
  problems = model_problems(config)
  tasks = tuple(config.model.tasks)
  _one_of(problems, "loss.expression", config.loss.expression,
          losses.EXPRESSION_LOSS_KINDS)
  _one_of(problems, "loss.au", config.loss.au, losses.AU_LOSS_KINDS)
  _one_of(problems, "loss.va", config.loss.va, losses.VA_LOSS_KINDS)
  _one_of(problems, "loss.weighting", config.loss.weighting, WEIGHTINGS)
  for task, weight in config.loss.weights.items():
    if task not in vocabulary.TASKS or not isinstance(weight, (int, float)) or weight < 0:
      problems.append(f"loss.weights.{task}={weight!r}: tasks are {vocabulary.TASKS}, "
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
  known_scores = [s for t in tasks if t in vocabulary.SCORES_OF_TASK
                  for s in vocabulary.SCORES_OF_TASK[t]]
  if best and best not in known_scores + ["p_mtl"]:
    problems.append(f"checkpoint.best_metric={best!r} is not a score of this model's "
                    f"tasks: {', '.join(known_scores + ['p_mtl'])}")
  return problems


def _raise_if_any(problems: list[str]) -> None:
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


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
    raise ValueError(
        f"dataset {config.dataset.name} has {len(expression_names)} expression "
        f"classes, model.num_expr_classes is {config.model.num_expr_classes}")
