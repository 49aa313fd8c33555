"""The study: uni-task vs multi-task, initialisation, losses, augmentation, and a small
hyper-parameter search, each variant with three seeds, and a temporal head over each
mtl run, on the synthetic release (docs/study/ holds its report; docs/STUDY.md says
how it was run and what it cost).

  affect-jax study --config configs/study.py --study_dir runs/study \
      --config.base.dataset.data_dir=runs/demo/tfds --report_dir docs/study

`base` is an ordinary training config; each variant is a set of overrides on it (dotted
keys), trained once per seed in its own workdir `<study_dir>/<name>/seed<k>`. A variant
with `init_from_variant` warm-starts from that variant's finished workdir (the run of
the same seed), so the runner trains the other one first. configs/study_affwild2.py runs the same grid on real Aff-Wild2.
"""
import ml_collections

from configs import demo
from configs import temporal as temporal_configs

# The scores each uni-task model is judged by (and keeps its best checkpoint by).
UNI_TASK_METRIC = {"expression": "expr_f1", "au": "au_f1", "va": "p_va"}
# The second loss of each task, against the default ce / bce / ccc.
ALTERNATIVE_LOSS = {"expression": "weighted_ce", "au": "weighted_bce", "va": "mse"}
SHORT_TASK_NAME = {"expression": "expr", "au": "au", "va": "va"}


def variant(name, group, description, overrides=None, init_from_variant=""):
  return {"name": name, "group": group, "description": description,
          "overrides": dict(overrides or {}), "init_from_variant": init_from_variant}


def uni_task_variants():
  """Each task alone, with its default loss and with the alternative one."""
  variants = []
  for task, metric in UNI_TASK_METRIC.items():
    short = SHORT_TASK_NAME[task]
    only_task = {"model.tasks": (task,), "checkpoint.best_metric": metric}
    alternative = ALTERNATIVE_LOSS[task]
    variants.append(variant(f"uni_{short}", "uni-task", f"{task} head only",
                            only_task))
    variants.append(variant(f"uni_{short}_{alternative}", "uni-task",
                            f"{task} head only, {alternative} loss",
                            {**only_task, f"loss.{task}": alternative}))
  return variants


def multi_task_variants():
  """The multi-task model and one change at a time: initialisation, losses, augmentation."""
  return [
      variant("mtl", "multi-task", "three heads, random init, ce/bce/ccc, basic aug"),
      variant("mtl_init_expr", "initialisation",
              "backbone and expression head from uni_expr, then all three tasks",
              {"init_from.parts": "backbone+heads"}, init_from_variant="uni_expr"),
      variant("mtl_alt_losses", "loss", "weighted_ce / weighted_bce / mse",
              {f"loss.{task}": loss for task, loss in ALTERNATIVE_LOSS.items()}),
      variant("mtl_no_aug", "augmentation", "no augmentation",
              {"input.augment": "none"}),
  ]


def study_variants():
  return tuple(uni_task_variants() + multi_task_variants())


def report_config():
  report = ml_collections.ConfigDict()
  # last: each variant's final evaluation. best: its best evaluation by its own
  # checkpoint.best_metric (chosen on the validation split, hence optimistic).
  report.selection = "last"
  # The uni-task variants the multi-task ones are compared with, per task.
  report.uni_task_baselines = ml_collections.ConfigDict(
      {task: f"uni_{short}" for task, short in SHORT_TASK_NAME.items()})
  # Paired differences: each variant minus this one (besides multi- minus uni-task).
  report.baseline = "mtl"
  # Bootstrap over the validation videos: replicates, confidence, the generator's seed.
  report.bootstrap = ml_collections.ConfigDict(
      {"replicates": 1000, "confidence": 0.95, "seed": 0})
  return report


def temporal_config():
  """A bidirectional GRU over 32-frame windows of the mtl runs' embeddings, trained
  after each of them (a few seconds a hundred steps on the CPU)."""
  temporal = ml_collections.ConfigDict()
  temporal.variants = ("mtl",)
  base = temporal_configs.get_config()
  base.input.batch_size = 32
  base.input.eval_batch_size = 64
  base.optimizer.warmup_steps = 30
  base.num_train_steps = 300
  base.log_every_steps = 25
  base.eval_every_steps = 150
  base.checkpoint_every_steps = 150
  base.checkpoint.keep = 1
  temporal.base = base
  return temporal


def base_config():
  """The demo's setting, narrower (16 filters) and shorter (500 steps, about 3.5 epochs
  of the synthetic release's training frames): three seeds of seven variants and the
  mtl runs' temporal heads took 41 minutes of a shared 2-core CPU."""
  config = demo.get_config()
  config.model.num_filters = 16
  config.input.image_size = 112
  config.input.batch_size = 32
  config.optimizer.warmup_steps = 20
  config.num_train_steps = 500
  config.log_every_steps = 10
  config.eval_every_steps = 250  # two points on each validation curve
  config.checkpoint_every_steps = 250
  config.checkpoint.keep = 1
  return config


def get_config():
  config = ml_collections.ConfigDict()
  config.base = base_config()
  config.variants = study_variants()
  # Every variant (and search trial) runs once per seed, in <study_dir>/<name>/seed<k>;
  # () runs each once at base.seed, in <study_dir>/<name>.
  config.seeds = (0, 1, 2)
  config.temporal = temporal_config()

  config.search = ml_collections.ConfigDict()
  config.search.base_variant = "mtl"  # trials override this variant
  config.search.kind = "random"  # random (seeded, without repeats) | grid
  config.search.trials = 3
  config.search.seed = 0
  config.search.metric = "p_mtl"  # what the report ranks the trials by
  config.search.name_prefix = "search_"
  # (dotted key, abbreviation in the trial's name, values)
  config.search.space = (("optimizer.learning_rate", "lr", (5e-4, 1e-3, 4e-3, 8e-3)),
                         ("optimizer.weight_decay", "wd", (1e-4, 1e-2)))

  config.report = report_config()
  return config
