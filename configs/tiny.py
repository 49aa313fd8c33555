"""A seconds-long smoke run: one block per ResNet stage, 8 filters, batch 8.

The tests train with it; users can check an installation with it:
  affect-jax train --config configs/tiny.py --workdir /tmp/tiny \
      --config.dataset.data_dir=runs/demo/tfds
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.num_filters = 8
  config.input.batch_size = 8
  config.input.eval_batch_size = 16
  config.optimizer.warmup_steps = 2
  config.num_train_steps = 12
  config.log_every_steps = 3
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 3
  return config
