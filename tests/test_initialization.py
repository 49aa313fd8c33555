"""Warm starts (converted pretrained weights, earlier runs, partial restore) and the
optimizer's per-part learning rates and frozen backbone."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from affect_jax.train import checkpoints
from affect_jax.train import init_from
from affect_jax.model import pretrained
from affect_jax import data_parallel
from affect_jax.model import implementation, multitask
from affect_jax.train import optimizers
from affect_jax.train import train_state
from configs import tiny


def small_config(**model):
  config = tiny.get_config()
  config.input.image_size = 32
  for key, value in model.items():
    config.model[key] = value
  return config


def random_state_dict(rng, **layout):
  """torchvision key names with random values (positive running variances)."""
  state_dict = {}
  for module, _, shape in pretrained.backbone_layout(**layout):
    if len(shape) == 4:
      state_dict[f"{module}.weight"] = rng.normal(size=shape).astype(np.float32)
      continue
    for name in ("weight", "bias", "running_mean", "running_var"):
      value = rng.normal(size=shape).astype(np.float32)
      state_dict[f"{module}.{name}"] = np.abs(value) + 0.5 if name == "running_var" \
          else value
  return state_dict


def make_state(config):
  mesh = data_parallel.create_mesh(jax.devices()[:1])
  model = multitask.create_model(config.model,
                                 implementation.implementation_for(config.model, mesh))
  return train_state.create_train_state(config, model, mesh,
                                  optimizers.create_learning_rate_fn(config))


def test_converted_safetensors_weights_start_the_backbone(tmp_path):
  state_dict = random_state_dict(np.random.default_rng(0), num_filters=8,
                                 stage_sizes=(1, 1, 1, 1))
  weights = str(tmp_path / "resnet.safetensors")
  save_file(state_dict, weights)
  imported = pretrained.torchvision_state_dict_to_flax(state_dict, stage_sizes=(1, 1, 1, 1),
                                                       num_filters=8)
  converted = str(tmp_path / "converted")
  variables = {"params": {"backbone": imported["params"]},
               "batch_stats": {"backbone": imported["batch_stats"]}}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(converted, variables)
  state = make_state(small_config())
  started, copied = init_from.warm_start(state, converted, "backbone")
  assert copied == ["backbone"]
  np.testing.assert_array_equal(
      started.params["model"]["backbone"]["conv1"]["kernel"],
      imported["params"]["conv1"]["kernel"])
  np.testing.assert_array_equal(started.batch_stats["backbone"]["bn1"]["var"],
                                imported["batch_stats"]["bn1"]["var"])
  np.testing.assert_array_equal(started.params["model"]["au_head"]["output"]["kernel"],
                                state.params["model"]["au_head"]["output"]["kernel"])


def test_convert_command_reads_safetensors_with_full_resnet18_names(tmp_path):
  state_dict = random_state_dict(np.random.default_rng(1))
  state_dict["fc.weight"] = np.zeros((1000, 512), np.float32)
  save_file(state_dict, str(tmp_path / "r18.safetensors"))
  assert init_from.main(["--input", str(tmp_path / "r18.safetensors"),
                              "--output", str(tmp_path / "out")]) == 0
  loaded = init_from.load_init_variables(str(tmp_path / "out"))
  np.testing.assert_array_equal(loaded["params"]["backbone"]["layer4_1"]["conv2"]["kernel"],
                                state_dict["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))


def test_partial_restore_from_an_earlier_run(tmp_path):
  source_config = small_config()
  source = make_state(source_config)
  manager = checkpoints.create_checkpoint_manager(str(tmp_path), best_metric=None,
                                                  asynchronous=False)
  checkpoints.save_checkpoint(manager, 7, source)
  manager.wait_until_finished()
  target = make_state(small_config(num_expr_classes=7))  # another EXPR head size
  started, copied = init_from.warm_start(target, str(tmp_path), "backbone+heads")
  assert copied == ["au_head", "backbone", "va_head"]
  model, source_model = started.params["model"], source.params["model"]
  for part in ("backbone", "au_head", "va_head"):
    for a, b in zip(jax.tree.leaves(model[part]), jax.tree.leaves(source_model[part])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(model["expression_head"]["output"]["kernel"],
                                target.params["model"]["expression_head"]["output"]["kernel"])
  only_backbone, copied = init_from.warm_start(target, str(tmp_path), "backbone")
  assert copied == ["backbone"]
  with pytest.raises(ValueError, match="init_from.parts"):
    init_from.warm_start(target, str(tmp_path), "everything")
  wider = make_state(small_config(num_filters=16))
  with pytest.raises(ValueError, match="has shape"):
    init_from.warm_start(wider, str(tmp_path), "backbone")


def _params():
  return {"model": {"backbone": {"w": jnp.ones(3)}, "au_head": {"kernel": jnp.ones(2)}},
          "loss": {}}


def _updates(config, steps):
  tx = optimizers.create_optimizer(config, lambda step: 0.1)
  params = _params()
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  history = []
  for _ in range(steps):
    updates, opt_state = tx.update(grads, opt_state, params)
    history.append(updates)
    params = optax.apply_updates(params, updates)
  return history


def test_frozen_backbone_and_backbone_learning_rate_multiplier():
  config = tiny.get_config()
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.freeze_backbone_steps = 2
  history = _updates(config, 3)
  for step in (0, 1):
    assert not np.any(history[step]["model"]["backbone"]["w"])
    assert np.all(history[step]["model"]["au_head"]["kernel"] != 0)
  assert np.all(history[2]["model"]["backbone"]["w"] != 0)

  config.optimizer.freeze_backbone_steps = 0
  config.optimizer.backbone_lr_multiplier = 0.1
  update = _updates(config, 1)[0]
  np.testing.assert_allclose(update["model"]["backbone"]["w"],
                             0.1 * update["model"]["au_head"]["kernel"][0], rtol=1e-6)


def test_learning_rate_schedules_and_optimizers():
  config = tiny.get_config()
  config.num_train_steps = 100
  config.optimizer.learning_rate = 0.2
  config.optimizer.warmup_steps = 10
  cosine = optimizers.create_learning_rate_fn(config)
  assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(0.2)
  assert float(cosine(55)) == pytest.approx(0.1, rel=1e-3)  # half-way down the cosine
  assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
  config.optimizer.schedule = "constant"
  constant = optimizers.create_learning_rate_fn(config)
  assert float(constant(5)) == pytest.approx(0.1) and float(constant(90)) == \
      pytest.approx(0.2)
  for name in ("sgd", "adamw"):
    config.optimizer.name = name
    config.optimizer.grad_clip_norm = 1.0
    history = _updates(config, 2)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(history))
  config.optimizer.name = "lion"
  with pytest.raises(ValueError, match="optimizer.name"):
    optimizers.create_optimizer(config, constant)


def test_weight_decay_skips_batch_norm_and_biases():
  mask = optimizers.decay_mask({"model": {"backbone": {
      "conv1": {"kernel": 1}, "bn1": {"scale": 1, "bias": 1}},
      "au_head": {"output": {"kernel": 1, "bias": 1}}}, "loss": {"au": 1}})
  assert mask["model"]["backbone"] == {"conv1": {"kernel": True},
                                       "bn1": {"scale": False, "bias": False}}
  assert mask["model"]["au_head"]["output"] == {"kernel": True, "bias": False}
  assert mask["loss"] == {"au": False}
