"""A temporal head (GRU or Transformer) over the frame embeddings of a trained run.

  affect-jax temporal --config configs/temporal.py --workdir runs/temporal \\
      --config.frame_run.workdir=runs/mtl --config.frame_run.data_dir=DATA

The embeddings of the frame run's checkpoint (the best, else the latest, unless
frame_run.step) are computed once per split into `<workdir>/embeddings/<split>/` (or
`embeddings.dir`); training, resuming and evaluation read them from there. Windows of
`window.length` frames; training windows start every `window.train_stride` frames;
evaluation windows every `window.eval_stride` frames, each scoring the eval_stride frames
in its middle, so every frame is scored once. Durations are in steps (a step is
`input.batch_size` windows).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.frame_run = ml_collections.ConfigDict()
  config.frame_run.workdir = ""  # the trained frame model's workdir
  config.frame_run.step = ml_collections.config_dict.placeholder(int)  # default: best
  config.frame_run.data_dir = ml_collections.config_dict.placeholder(str)  # its TFDS dir
  config.frame_run.train_split = "train"
  config.frame_run.eval_split = "validation"

  config.embeddings = ml_collections.ConfigDict()
  config.embeddings.dir = ""  # default: <workdir>/embeddings
  config.embeddings.batch_size = 256  # frames per embedding batch (all devices)

  config.window = ml_collections.ConfigDict()
  config.window.length = 32
  config.window.train_stride = 8
  config.window.eval_stride = 16
  config.window.padding = "edge"  # edge (repeat the first/last frame) | zeros

  config.input = ml_collections.ConfigDict()
  config.input.batch_size = 64  # windows per step, all devices
  config.input.eval_batch_size = 64

  config.model = ml_collections.ConfigDict()
  config.model.kind = "gru"  # gru | transformer
  config.model.tasks = ("expression", "au", "va")
  config.model.num_expr_classes = 8  # the frame run's (checked)
  config.model.hidden_dim = 128
  config.model.num_layers = 1
  config.model.num_heads = 4  # transformer
  config.model.bidirectional = True  # gru
  config.model.dropout_rate = 0.1

  config.loss = ml_collections.ConfigDict()
  config.loss.expression = "ce"  # ce | weighted_ce | focal
  config.loss.au = "bce"  # bce | weighted_bce | focal
  config.loss.va = "ccc"  # ccc | mse | ccc+mse
  config.loss.label_smoothing = 0.0
  config.loss.focal_gamma = 2.0
  config.loss.weighting = "fixed"  # fixed | uncertainty
  config.loss.weights = ml_collections.ConfigDict(
      {"expression": 1.0, "au": 1.0, "va": 1.0})

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # sgd | adamw
  config.optimizer.learning_rate = 1e-3
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.warmup_steps = 100
  config.optimizer.schedule = "cosine"  # cosine | constant

  config.num_train_steps = 3_000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.max_nonfinite_steps_in_row = 10
  config.allow_config_change = False

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 3
  config.checkpoint.best_metric = "p_mtl"
  config.checkpoint.asynchronous = True
  return config
