"""Uni-task baseline: the default multi-task config with only the expression head."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.tasks = ("expression",)
  config.checkpoint.best_metric = "expr_f1"
  return config
