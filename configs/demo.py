"""The demo: multi-task training on the synthetic release, sized for a laptop CPU.

README's first command builds the synthetic release and its TFDS dataset, then trains
with this config (`affect-jax demo` does all of it).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "affwild2/union"
  # ResNet-18's depth at half its width: a quarter of the FLOPs, so that a 2-core CPU
  # trains several epochs in minutes (XLA:CPU convolutions run at ~50 GFLOP/s here).
  # --config.model.num_filters=64 gives the full ResNet-18.
  config.model.num_filters = 32
  config.input.batch_size = 32
  config.input.eval_batch_size = 128
  config.input.augment = "basic"
  config.input.worker_count = 0
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 50
  config.num_train_steps = 500
  config.log_every_steps = 25
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 50
  return config
