"""Multi-task ResNet-18 on a built Aff-Wild2 TFDS dataset (expression + AU + VA).

  affect-jax train --config configs/default.py --workdir runs/mtl \
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Point `dataset.data_dir` at the folder where `affect-jax build` wrote the
dataset. Durations are in steps; `steps_per_epoch` of s-Aff-Wild2 at batch 256 is ~556.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "affwild2/mtl"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"

  config.input = ml_collections.ConfigDict()
  config.input.batch_size = 256  # global, over all devices and processes
  config.input.eval_batch_size = 512
  config.input.image_size = 112
  config.input.augment = "basic"  # none | basic | strong | randaugment
  config.input.worker_count = 8  # grain worker processes per host (0: in-process)
  config.input.worker_buffer_size = 2
  config.input.task_balanced = False  # oversample frames carrying rarer task labels
  # Decode the training split once onto every device and draw + augment batches there
  # (no host pipeline in the step; needs the split to fit in half a device's memory).
  config.input.device_resident = False

  config.model = ml_collections.ConfigDict()
  config.model.tasks = ("expression", "au", "va")
  config.model.num_expr_classes = 8
  config.model.stage_sizes = (2, 2, 2, 2)  # ResNet-18
  config.model.num_filters = 64
  config.model.head_hidden_dim = 0  # 0: linear heads
  config.model.dropout_rate = 0.0
  config.model.dtype = "float32"  # bfloat16 on GPU/TPU for speed; params stay float32
  config.model.sync_batch_norm = True  # BN statistics over the global batch
  # "auto": "xla" (flax's layers) on GPU/TPU meshes, "cpu" (XLA:CPU's fast forms, same
  # parameters and results) on CPU meshes; "xla" forces the accelerator network anywhere.
  config.model.implementation = "auto"

  config.loss = ml_collections.ConfigDict()
  config.loss.expression = "ce"  # ce | weighted_ce | focal
  config.loss.au = "bce"  # bce | weighted_bce | focal
  config.loss.va = "ccc"  # ccc | mse | ccc+mse
  config.loss.label_smoothing = 0.0
  config.loss.focal_gamma = 2.0
  config.loss.weighting = "fixed"  # fixed | uncertainty (Kendall et al. 2018)
  config.loss.weights = ml_collections.ConfigDict(
      {"expression": 1.0, "au": 1.0, "va": 1.0})

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd (momentum) | adamw
  config.optimizer.learning_rate = 0.1  # peak, for batch 256
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4  # not applied to BN parameters and biases
  config.optimizer.grad_clip_norm = 0.0  # 0: no clipping
  config.optimizer.warmup_steps = 500
  config.optimizer.schedule = "cosine"  # cosine | constant
  config.optimizer.backbone_lr_multiplier = 1.0  # backbone rate = multiplier x heads'
  config.optimizer.freeze_backbone_steps = 0  # no backbone update before this step

  # Resume order: the workdir's latest checkpoint, else init_from, else from scratch.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.path = ""  # a training workdir, or converted pretrained weights
  config.init_from.step = ml_collections.config_dict.placeholder(int)  # default: latest
  config.init_from.parts = "backbone"  # backbone | backbone+heads

  config.num_train_steps = 20_000
  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  config.eval_max_batches = 0  # 0: the whole eval split
  config.max_nonfinite_steps_in_row = 10  # skipped updates in a row before stopping
  config.allow_config_change = False  # resume a workdir whose run had another config

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 3
  config.checkpoint.best_metric = "p_mtl"
  config.checkpoint.asynchronous = True
  return config
