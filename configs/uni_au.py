"""Uni-task baseline: the default multi-task config with only the au head."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.tasks = ("au",)
  config.checkpoint.best_metric = "au_f1"
  return config
