"""The demo: multi-task training on the synthetic release, sized for a laptop CPU.

README's first command builds the synthetic release and its TFDS dataset, then trains
with this config (`python -m affect_jax.demo` does all of it).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "affwild2/union"
  config.input.batch_size = 64
  config.input.eval_batch_size = 128
  config.input.augment = "basic"
  config.input.worker_count = 0
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 50
  config.num_train_steps = 600
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 100
  return config
