"""Uni-task baseline: the default multi-task config with only the va head."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.tasks = ("va",)
  config.checkpoint.best_metric = "p_va"
  return config
