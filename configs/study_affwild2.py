"""The study's grid (configs/study.py) on real Aff-Wild2: s-Aff-Wild2's multi-task set,
the full ResNet-18 at 112x112, configs/default.py's 20k steps of batch 256, three seeds
per variant, and a temporal head of configs/temporal.py's size over each mtl run.

  affect-jax study --config configs/study_affwild2.py --study_dir runs/study \
      --config.base.dataset.data_dir=/data/tensorflow_datasets

With converted ImageNet (or face) weights (affect-jax convert), one
more variant starts the multi-task model from them:

  ... --config configs/study_affwild2.py:weights/resnet18_imagenet

docs/STUDY.md gives the whole procedure and what it costs.
"""
from configs import default
from configs import study
from configs import temporal


def pretrained_variant(weights_path: str) -> dict:
  return study.variant(
      "mtl_init_pretrained", "initialisation",
      f"backbone from the converted weights in {weights_path}",
      {"init_from.path": weights_path, "init_from.parts": "backbone"})


def get_config(weights_path: str = ""):
  config = study.get_config()
  config.base = default.get_config()
  config.base.model.dtype = "bfloat16"  # accelerators: ~2x the float32 throughput
  # Four evaluations over the run, as on the CPU: curves without the eval dominating.
  config.base.eval_every_steps = 5_000
  config.base.checkpoint.keep = 1
  config.temporal.base = temporal.get_config()  # 3,000 steps of 64 windows of 32 frames
  config.temporal.base.checkpoint.keep = 1
  if weights_path:
    config.variants = config.variants + (pretrained_variant(weights_path),)
  # SGD with Nesterov momentum: the rates around default.py's 0.1 (for batch 256).
  config.search.trials = 4
  config.search.space = (("optimizer.learning_rate", "lr", (0.025, 0.05, 0.2, 0.4)),
                         ("optimizer.weight_decay", "wd", (1e-4, 5e-4)))
  return config
