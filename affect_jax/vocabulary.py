"""The project's words and sizes, each defined once.

The ABAW files' own vocabulary (AU names, expression names, the task names "expr", "au",
"va" of annotation folders and the dataset's summary, the 112-pixel crops) is
tfds_affwild2.annotations', which imports nothing from affect_jax; the model's names
for the same tasks ("expression", "au", "va": its heads, `config.model.tasks`, the
batch keys) are defined here with the one mapping between the two spellings.
"""
from __future__ import annotations

from tfds_affwild2.annotations import (
  AU_NAMES,
  EXPRESSION_NAMES_7,
  EXPRESSION_NAMES_8,
  IMAGE_SIZE,
)

TASKS = ("expression", "au", "va")  # the model's tasks, in the order of its heads
ABAW_TASK = {"expression": "expr", "au": "au", "va": "va"}  # the files' and summary's
NUM_AUS = len(AU_NAMES)
NUM_VA = 2  # valence, arousal

# Labels of a batch; each task's mask says which frames carry its label.
LABEL_KEYS = ("expression", "expression_mask", "au", "au_mask", "valence_arousal",
              "va_mask")

# Scores that compute_scores returns for each task a model has.
SCORES_OF_TASK = {"va": ("p_va", "ccc_valence", "ccc_arousal"),
                  "expression": ("expr_f1", "expr_accuracy", "p_expr_abaw2"),
                  "au": ("au_f1", "au_accuracy", "au_f1_best_thresholds", "p_au_abaw2")}
TASK_SCORE = {"expression": "expr_f1", "au": "au_f1", "va": "p_va"}  # each task's own


def expression_names(num_classes: int) -> tuple[str, ...]:
  """The class names of a model with 7 (ABAW2) or 8 (ABAW3 on) expression classes."""
  return EXPRESSION_NAMES_8[:num_classes]


def compared_scores(tasks_a, tasks_b) -> list[str]:
  """The scores two models both have: each shared task's own, and P_MTL when both
  have all three tasks."""
  shared = [t for t in TASKS if t in tasks_a and t in tasks_b]
  return [TASK_SCORE[t] for t in shared] + (["p_mtl"] if len(shared) == len(TASKS)
                                            else [])


__all__ = ["AU_NAMES", "EXPRESSION_NAMES_7", "EXPRESSION_NAMES_8", "IMAGE_SIZE", "TASKS",
           "ABAW_TASK", "NUM_AUS", "NUM_VA", "LABEL_KEYS", "SCORES_OF_TASK", "TASK_SCORE",
           "compared_scores", "expression_names"]
