"""configs/study.py's study with an optuna search in place of its random one: trials
drawn by a seeded TPE sampler over a log-uniform learning rate and two weight decays,
each trial's evaluations fed to a median pruner that stops the bad ones early
(docs/STUDY_OPTUNA.md).

  affect-jax study --config configs/study_optuna.py --study_dir runs/study \
      --config.base.dataset.data_dir=runs/demo/tfds
"""
from configs import study


def get_config():
  config = study.get_config()
  search = config.search
  search.kind = "optuna"
  search.trials = 8
  search.seed = 0
  search.metric = "p_mtl"  # the objective: this score at the final step
  # A list of values is a choice; {"low", "high", "log"} a range (floats, or integers
  # when both bounds are integers).
  search.space = (
      ("optimizer.learning_rate", "lr", {"low": 5e-4, "high": 1e-2, "log": True}),
      ("optimizer.weight_decay", "wd", (1e-4, 1e-2)))
  search.startup_trials = 4  # drawn at random before TPE models the results
  search.pruner = "median"  # median | none
  search.pruner_startup_trials = 2  # trials that end before any is pruned
  # The study evaluates every 250 of 500 steps, and a run is never pruned at its final
  # step: evaluations every 100 steps let the pruner judge a trial at 200, 300 and 400
  # (the first, at 100, is too early to judge a run by).
  config.base.eval_every_steps = 100
  search.pruner_warmup_steps = 200
  return config
