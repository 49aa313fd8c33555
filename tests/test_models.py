"""Tests of the ResNet backbone and the multi-task network.

Structure and shapes are checked on the real ResNet-18 through ``jax.eval_shape`` (no
compilation); behaviour is checked on a one-block-per-stage, 8-filter ResNet, which
runs the same code in a fraction of the time.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from affect_jax.cpu import layers
from affect_jax.model import multitask
from affect_jax.model import resnet

# torchvision's resnet18 / resnet34 have 11,689,512 / 21,797,672 parameters, of which
# fc (512 * 1000 + 1000) has 513,000.
TORCHVISION_PARAMS_WITHOUT_FC = {"resnet18": 11_176_512, "resnet34": 21_284_672}

TinyNet = functools.partial(multitask.MultiTaskNet, stage_sizes=(1, 1, 1, 1), num_filters=8)


def _rng(seed=0):
  # XLA:CPU takes seconds per parameter shape to compile the default threefry
  # generator; 'rbg' keys give the same initializers at a fraction of the cost.
  return jax.random.key(seed, impl="rbg")


def _images(batch=4, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)),
                     jnp.float32)


def _abstract_variables(model, size=112):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def _init(model, images):
  return jax.jit(functools.partial(model.init, train=False))(_rng(), images)


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of TinyNet(); dtype, dropout and bn_axis_name leave the tree unchanged."""
  return _init(TinyNet(), _images())


def _apply(model, variables, images, **kwargs):
  """model.apply compiled: op-by-op dispatch of a ResNet costs seconds per call on CPU."""
  static = tuple(k for k in ("train", "mutable", "return_features") if k in kwargs)
  return jax.jit(model.apply, static_argnames=static)(variables, images, **kwargs)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, backbone", [("resnet18", resnet.ResNet18),
                                            ("resnet34", resnet.ResNet34)])
def test_backbone_has_torchvision_parameter_count(name, backbone):
  variables = _abstract_variables(backbone())
  assert _count(variables["params"]) == TORCHVISION_PARAMS_WITHOUT_FC[name]


def test_parameter_tree_uses_torchvision_module_names():
  variables = _abstract_variables(multitask.MultiTaskNet())
  backbone = variables["params"]["backbone"]
  assert set(backbone) == {"conv1", "bn1"} | {f"layer{s}_{b}" for s in range(1, 5)
                                              for b in range(2)}
  assert backbone["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert set(backbone["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert set(backbone["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_conv",
                                       "downsample_bn"}
  assert backbone["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
  assert backbone["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
  assert set(variables["batch_stats"]["backbone"]["layer3_0"]["downsample_bn"]) == {
      "mean", "var"}
  assert set(variables["params"]) == {"backbone", "expression_head", "au_head", "va_head"}


@pytest.mark.parametrize("tasks", [("expression",), ("au",), ("va",), ("expression", "va"),
                                   ("expression", "au", "va")])
@pytest.mark.parametrize("num_expr_classes", [7, 8])
def test_outputs_exist_only_for_enabled_tasks(tasks, num_expr_classes):
  model = multitask.MultiTaskNet(tasks=tasks, num_expr_classes=num_expr_classes)
  images = jnp.zeros((3, 112, 112, 3))
  variables = _abstract_variables(model)
  outputs = jax.eval_shape(
      lambda v: model.apply(v, images, train=False, return_features=True), variables)
  expected = {"expression": (3, num_expr_classes), "au": (3, 12), "va": (3, 2)}
  assert {k: v.shape for k, v in outputs.items()} == (
      {t: expected[t] for t in tasks} | {"features": (3, 512)})
  assert {k for k in variables["params"] if k.endswith("_head")} == {f"{t}_head" for t in tasks}


def test_unknown_task_is_refused():
  with pytest.raises(ValueError, match="subset"):
    _abstract_variables(multitask.MultiTaskNet(tasks=("expr",)))


def test_mlp_head_has_hidden_and_output_layers():
  variables = _abstract_variables(multitask.MultiTaskNet(tasks=("au",), head_hidden_dim=256))
  head = variables["params"]["au_head"]
  assert head["hidden"]["kernel"].shape == (512, 256)
  assert head["output"]["kernel"].shape == (256, 12)


def test_va_is_bounded_by_tanh(tiny_variables):
  model = TinyNet()
  images = 100.0 * _images()
  variables = jax.tree.map(jnp.copy, tiny_variables)
  # Scale the head so that the untransformed output would be far outside [-1, 1].
  variables["params"]["va_head"]["output"]["kernel"] *= 1000.0
  va = _apply(model, variables, images, train=False)["va"]
  assert jnp.all(jnp.abs(va) <= 1.0) and jnp.max(jnp.abs(va)) > 0.99


def test_eval_uses_running_statistics_and_train_updates_them(tiny_variables):
  model, variables = TinyNet(), tiny_variables
  images = _images()
  alone = _apply(model, variables, images[:1], train=False)["expression"]
  in_batch = _apply(model, variables, images, train=False)["expression"][:1]
  np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-5)

  apply_train = functools.partial(_apply, model, train=True, mutable=("batch_stats",))
  alone, _ = apply_train(variables, images[:1])
  in_batch, updates = apply_train(variables, images)
  # Batch statistics make a sample's training output depend on its batch.
  assert not np.allclose(alone["expression"], in_batch["expression"][:1], atol=1e-3)
  old_mean = variables["batch_stats"]["backbone"]["bn1"]["mean"]
  new_mean = updates["batch_stats"]["backbone"]["bn1"]["mean"]
  assert not np.allclose(old_mean, new_mean)
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, images, train=True)  # Updating BN needs a mutable collection.


def test_bfloat16_compute_keeps_float32_params_statistics_and_outputs(tiny_variables):
  images, variables = _images(), tiny_variables
  model_f32, model_bf16 = TinyNet(), TinyNet(dtype=jnp.bfloat16)
  initial = _abstract_variables(multitask.MultiTaskNet(dtype=jnp.bfloat16, head_hidden_dim=16))
  assert {x.dtype for x in jax.tree.leaves(initial)} == {jnp.dtype(jnp.float32)}

  outputs, updates = _apply(model_bf16, variables, images, train=True,
                            mutable=("batch_stats",), return_features=True)
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in outputs.values()} == {jnp.dtype(jnp.float32)}
  reference = _apply(model_f32, variables, images, train=False)
  outputs = _apply(model_bf16, variables, images, train=False)
  for task, value in outputs.items():
    np.testing.assert_allclose(value, reference[task], atol=0.1, err_msg=task)


def test_dropout_acts_only_in_training(tiny_variables):
  model, variables = TinyNet(dropout_rate=0.5), tiny_variables
  images = _images()

  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

  def expression(train, rng_seed):
    outputs = apply(variables, images, train=train, mutable=("batch_stats",),
                    rngs={"dropout": _rng(rng_seed)})[0]
    return outputs["expression"]

  np.testing.assert_array_equal(expression(False, 1), expression(False, 2))
  np.testing.assert_array_equal(expression(False, 1),
                                _apply(model, variables, images, train=False)["expression"])
  np.testing.assert_array_equal(expression(True, 1), expression(True, 1))
  assert not np.allclose(expression(True, 1), expression(True, 2))


def test_zero_init_last_bn_zeroes_only_the_last_gamma_of_each_block(tiny_variables):
  params = _init(TinyNet(zero_init_last_bn=True), _images())["params"]["backbone"]
  default_params = tiny_variables["params"]["backbone"]
  for block in ("layer1_0", "layer2_0", "layer4_0"):
    np.testing.assert_array_equal(params[block]["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(params[block]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(default_params[block]["bn2"]["scale"], 1.0)


def test_conv_init_is_kaiming_normal_fan_out():
  kernel = resnet.conv_kernel_init(_rng(), (3, 3, 256, 256))
  expected_std = np.sqrt(2.0 / (3 * 3 * 256))
  assert abs(float(jnp.std(kernel)) / expected_std - 1.0) < 0.02
  assert float(jnp.max(jnp.abs(kernel))) > 3.5 * expected_std  # Not truncated at 2 std.


def test_bn_statistics_are_synchronised_across_devices_under_shard_map(tiny_variables):
  """Training on 8 devices with bn_axis_name equals training on the global batch."""
  num_devices = jax.device_count()
  images = _images(batch=2 * num_devices)
  variables = tiny_variables
  mesh = Mesh(np.array(jax.devices()), ("data",))

  def train_forward(model, variables, images):
    return model.apply(variables, images, train=True, mutable=["batch_stats"])

  synced = jax.jit(jax.shard_map(
      functools.partial(train_forward, TinyNet(bn_axis_name="data")), mesh=mesh,
      in_specs=(P(), P("data")), out_specs=(P("data"), P())))
  outputs, updates = synced(variables, images)
  expected_outputs, expected_updates = jax.jit(functools.partial(train_forward, TinyNet()))(
      variables, images)
  for task, value in outputs.items():
    np.testing.assert_allclose(value, expected_outputs[task], rtol=1e-4, atol=1e-4)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected_updates)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_network_overfits_a_tiny_batch(tiny_variables):
  model, variables = TinyNet(), tiny_variables
  images = _images(batch=8)
  labels = jnp.arange(8)

  def loss_fn(params, batch_stats):
    outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                   train=True, mutable=["batch_stats"])
    log_probs = jax.nn.log_softmax(outputs["expression"])
    loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    return loss, updates["batch_stats"]

  @jax.jit
  def sgd_step(params, batch_stats):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, batch_stats, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  losses = []
  for _ in range(30):
    params, batch_stats, loss = sgd_step(params, batch_stats)
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0], losses


def test_cpu_and_xla_implementations_compute_the_same_outputs():
  # "xla" is the default; "cpu" is an experimental faster form for XLA:CPU. 36 px put
  # layer4 on 2x2 maps, so every CPU form (max-pool gradient, strided 1x1 shortcut,
  # small-map im2col convolution) is exercised against its XLA counterpart.
  images = _images(batch=4, size=36, seed=3)
  xla, cpu = TinyNet(implementation="xla"), TinyNet(implementation="cpu")
  variables = _init(xla, images)
  assert jax.tree.structure(variables) == jax.tree.structure(_init(cpu, images))
  for train in (False, True):
    kwargs = {"train": True, "mutable": ("batch_stats",)} if train else {"train": False}
    out_xla = _apply(xla, variables, images, **kwargs)
    out_cpu = _apply(cpu, variables, images, **kwargs)
    for a, b in zip(jax.tree.leaves(out_xla), jax.tree.leaves(out_cpu)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _loss_and_gradients(model, variables, images):
  def loss(params):
    outputs, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             images, train=True, mutable=["batch_stats"],
                             return_features=True)
    return sum(jnp.sum(value**2) for value in outputs.values())
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


def _relu_input_margin(model, variables, images):
  """Smallest |input| of any ReLU of the backbone in training mode: a ReLU input
  closer to 0 than float32 rounding may flip between two exact implementations."""
  _, state = model.apply(variables, images, train=True,
                         mutable=["batch_stats", "intermediates"],
                         capture_intermediates=True)
  backbone = state["intermediates"]["backbone"]

  def output(tree):
    return np.asarray(tree["__call__"][0])

  # The "xla" stem pools before BN + ReLU, and its convolution's output is sign-folded:
  # its BN's input is recomputed with flax's convolution and BN.
  params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  stem_input = nn.Conv(params["conv1"]["kernel"].shape[-1], (7, 7), strides=2,
                       padding=resnet.PAD_3, use_bias=False).apply(
                           {"params": params["conv1"]}, images)
  stem, _ = nn.BatchNorm(use_running_average=False).apply(
      {"params": params["bn1"], "batch_stats": stats["bn1"]}, stem_input,
      mutable=["batch_stats"])
  margins = [np.abs(stem).min()]
  previous = nn.max_pool(jax.nn.relu(stem), (3, 3), strides=(2, 2), padding=resnet.PAD_1)
  for name in sorted(k for k in backbone if k.startswith("layer")):
    block = backbone[name]
    residual = output(block["downsample_bn"]) if "downsample_bn" in block else previous
    margins += [np.abs(output(block["bn1"])).min(),
                np.abs(residual + output(block["bn2"])).min()]
    previous = output(block)
  return float(min(margins))


def test_cpu_and_xla_implementations_compute_the_same_gradients():
  # Whole-network parameter gradients under BN batch statistics. The "cpu" max-pool
  # backward pass once compared its (recomputed) input with the forward output, and
  # XLA:CPU recomputes BN + ReLU with different rounding for the two: some windows
  # matched no tap and dropped their gradient, bn1 bias was 8% off here (60% at 48 px).
  # "cpu" also has its own BN backward pass and max-pool gradient routing.
  images = _images(batch=16, size=40, seed=1)
  xla, cpu = TinyNet(implementation="xla"), TinyNet(implementation="cpu")
  variables = _init(xla, images)
  # Rounding-level differences must not flip a ReLU (seed 0 has an input at 8e-8,
  # which moves a few gradients by 5% under any change of rounding).
  assert _relu_input_margin(xla, variables, images) > 2e-5
  loss_xla, grads_xla = _loss_and_gradients(xla, variables, images)
  loss_cpu, grads_cpu = _loss_and_gradients(cpu, variables, images)
  np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(grads_xla),
                               jax.tree.leaves(grads_cpu)):
    relative = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert relative < 1e-4, (jax.tree_util.keystr(path), relative)


@pytest.mark.parametrize("size", [17, 18, 56])
def test_max_pool_equals_xla_in_values_and_gradients(size):
  g = _images(batch=2, size=(size + 1) // 2, seed=6)

  def loss(pool, x):
    return jnp.sum(pool(jax.nn.relu(x)) * g)

  def xla_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=resnet.PAD_1)

  # continuous values (no positive ties) with half of them zeroed by the ReLU
  x = _images(batch=2, size=size, seed=5) - 0.5
  np.testing.assert_array_equal(layers.max_pool_3x3_stride_2(x), xla_pool(x))
  for inputs in (x, jnp.round(x * 4)):  # rounded: ties among zeros and positives
    np.testing.assert_array_equal(layers.max_pool_3x3_stride_2(inputs), xla_pool(inputs))
  want = jax.grad(functools.partial(loss, xla_pool))(x)
  got = jax.grad(functools.partial(loss, layers.max_pool_3x3_stride_2))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)



def _bn_variables(rng, channels):
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=channels), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=channels), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32)}}


def _bn_loss_and_grads(module, activation, variables, x, g):
  def loss(params, x):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              x, mutable=["batch_stats"])
    return jnp.sum(activation(y).astype(jnp.float32) * g), (y, updates["batch_stats"])
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)


@pytest.mark.parametrize("relu", [False, True])
def test_train_batch_norm_equals_flax_in_outputs_statistics_and_gradients(relu):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(6, 5, 5, 16)), jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _bn_variables(rng, 16)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  fused = layers.TrainBatchNorm(momentum=0.9, epsilon=1e-5, relu=relu)
  (want_loss, (want_y, want_stats)), want_grads = _bn_loss_and_grads(
      flax_bn, jax.nn.relu if relu else (lambda y: y), variables, x, g)
  (got_loss, (got_y, got_stats)), got_grads = _bn_loss_and_grads(
      fused, lambda y: y, variables, x, g)
  np.testing.assert_allclose(got_y, jax.nn.relu(want_y) if relu else want_y,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves((got_stats, got_grads)),
                       jax.tree.leaves((want_stats, want_grads))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_train_batch_norm_matches_flax_on_bfloat16_inputs(dtype):
  # Statistics and parameters in float32, the output in flax's dtype (`dtype`, else the
  # input's promoted with the float32 parameters), values and gradients as flax's.
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(0.5, 2.0, size=(4, 3, 3, 8)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _bn_variables(rng, 8)
  fused = layers.TrainBatchNorm(momentum=0.9, dtype=dtype, relu=True)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
  (_, (y, stats)), (grads, grad_x) = _bn_loss_and_grads(
      fused, lambda y: y, variables, x, g)
  (_, (want_y, want_stats)), (want_grads, want_grad_x) = _bn_loss_and_grads(
      flax_bn, jax.nn.relu, variables, x, g)
  assert y.dtype == want_y.dtype and grad_x.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((stats, grads)))
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(jax.nn.relu(want_y), np.float32),
                             rtol=1e-2, atol=1e-2)
  for got, want in zip(jax.tree.leaves((stats, grads, grad_x)),
                       jax.tree.leaves((want_stats, want_grads, want_grad_x))):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("synchronised", [False, True])
def test_train_batch_norm_over_devices_equals_flax(relu, synchronised):
  """Per-device shards under shard_map == flax's nn.BatchNorm: with synchronised
  statistics, on the whole batch at once (their gradients summed over the axis, the
  parameter gradients summed by shard_map); without, on each device's shard (the
  parameters cast to varying inside TrainBatchNorm, their gradients summed)."""
  num_devices = jax.device_count()
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(2 * num_devices, 4, 4, 8)), jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _bn_variables(rng, 8)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  axis_name = "data" if synchronised else None

  def loss_and_grads(module, activation, params, x, g):
    def loss(params, x):
      y, updates = module.apply({"params": params,
                                 "batch_stats": variables["batch_stats"]},
                                x, mutable=["batch_stats"])
      return jax.lax.psum(jnp.sum(activation(y) * g), "data"), updates["batch_stats"]
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  def sharded(module, activation, stats_spec):
    return jax.jit(jax.shard_map(
        functools.partial(loss_and_grads, module, activation), mesh=mesh,
        in_specs=(P(), P("data"), P("data")),
        out_specs=((P(), stats_spec), (P(), P("data")))))

  fused = layers.TrainBatchNorm(momentum=0.9, relu=relu, axis_name=axis_name)
  # Without synchronisation each device has its own running averages: compare them
  # per device (stacked along the mapped axis).
  stats_spec = P() if synchronised else P("data")
  (got_loss, got_stats), (got_params, got_x) = sharded(
      fused, lambda y: y, stats_spec)(variables["params"], x, g)
  reference = nn.BatchNorm(use_running_average=False, momentum=0.9,
                           axis_name=axis_name)
  (want_loss, want_stats), (want_params, want_x) = sharded(
      reference, jax.nn.relu if relu else (lambda y: y), stats_spec)(
          variables["params"], x, g)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves((got_stats, got_params, got_x)),
                       jax.tree.leaves((want_stats, want_params, want_x))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_max_pool_gives_tied_windows_gradient_to_the_first_maximum_as_torch():
  import torch  # pylint: disable=g-import-not-at-top  (a test extra)
  rng = np.random.default_rng(10)
  x = np.round(rng.normal(size=(2, 9, 10, 3)) * 2).astype(np.float32)  # many ties
  g = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  got = jax.grad(lambda x: jnp.sum(layers.max_pool_3x3_stride_2(x) * g))(jnp.asarray(x))
  x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  pooled = torch.nn.functional.max_pool2d(x_torch, 3, stride=2, padding=1)
  (pooled * torch.tensor(g.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_array_equal(layers.max_pool_3x3_stride_2(jnp.asarray(x)),
                                pooled.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, x_torch.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-6, atol=1e-6)


def test_max_pool_propagates_nan_as_torch():
  # A diverging run must not be hidden: a NaN anywhere in a window is its maximum.
  x = np.zeros((1, 6, 6, 1), np.float32)
  x[0, 2, 3, 0] = np.nan  # not the first tap of any window containing it
  pooled = np.asarray(layers.max_pool_3x3_stride_2(jnp.asarray(x)))
  want = np.asarray(nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2),
                                padding=resnet.PAD_1))
  np.testing.assert_array_equal(np.isnan(pooled), np.isnan(want))
  assert np.isnan(pooled).sum() == 2


def _with_signed_stem_scales(variables):
  """The stem BN's scale made negative on every third channel and 0 on one: the
  "xla" stem folds the sign into its convolution."""
  params = jax.tree.map(lambda x: x, variables["params"])
  scale = params["bn1"]["scale"]
  channel = jnp.arange(scale.shape[0])
  params["bn1"]["scale"] = jnp.where(channel % 3 == 0, -scale, scale).at[1].set(0.0)
  return {**variables, "params": params}


def test_xla_stem_pools_before_bn_and_relu_bit_for_bit():
  """BN + ReLU is monotone per channel once the sign is folded into the convolution,
  so pooling first gives flax's stem output exactly, in bfloat16 too."""
  images = _images(batch=4, size=24, seed=7)
  bn = _bn_variables(np.random.default_rng(7), 64)
  variables = _with_signed_stem_scales(
      {"params": {"conv1": {"kernel": resnet.conv_kernel_init(_rng(), (7, 7, 3, 64))},
                  "bn1": bn["params"]}, "batch_stats": {"bn1": bn["batch_stats"]}})
  params, stats = variables["params"], variables["batch_stats"]
  for dtype in (jnp.float32, jnp.bfloat16):
    conv = nn.Conv(64, (7, 7), strides=2, padding=resnet.PAD_3, use_bias=False,
                   dtype=dtype)
    features = conv.apply({"params": params["conv1"]}, images)
    norm = nn.BatchNorm(use_running_average=False, dtype=dtype)
    bn_variables = {"params": params["bn1"], "batch_stats": stats["bn1"]}

    def flax_stem(features, norm=norm, bn_variables=bn_variables):
      y, updates = norm.apply(bn_variables, features, mutable=["batch_stats"])
      return resnet.stem_max_pool(jax.nn.relu(y)), updates

    stem = resnet.TrainStemNormPool(64, dtype=dtype)

    def xla_stem(features, stem=stem, bn_variables=bn_variables):
      sign = stem.apply(bn_variables, method="sign")
      return stem.apply(bn_variables, features * sign.astype(dtype), sign,
                        mutable=["batch_stats"])

    want, got = jax.jit(flax_stem)(features), jax.jit(xla_stem)(features)
    np.testing.assert_array_equal(got[0], want[0])
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_xla_stem_equals_flax_layers_over_devices():
  """The "xla" stem (sign-folded convolution, max-pool, BN + ReLU) against flax's
  convolution, BatchNorm, ReLU and max-pool: outputs, running statistics and parameter
  gradients of a train step under shard_map with BN statistics over the devices."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  images = _images(batch=2 * jax.device_count(), size=20, seed=4)
  nets = [resnet.ResNet(stage_sizes=(1, 1, 1, 1), num_filters=8, bn_axis_name="data",
                        layers=layers) for layers in (resnet.XLA_LAYERS, resnet.Layers())]
  variables = _with_signed_stem_scales(_init(nets[1], images))
  weights = jnp.asarray(np.random.default_rng(5).normal(size=(images.shape[0], 64)),
                        jnp.float32)  # one per feature of the 8-filter ResNet

  def train_step(net, variables, images, weights):
    def loss(params):
      features, updates = net.apply({"params": params,
                                     "batch_stats": variables["batch_stats"]},
                                    images, train=True, mutable=["batch_stats"])
      return jnp.sum(features * weights), (features, updates)
    grads, (features, updates) = jax.grad(loss, has_aux=True)(variables["params"])
    return features, updates, jax.lax.psum(grads, "data")

  results = [jax.jit(jax.shard_map(
      functools.partial(train_step, net), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P(), P())))(
          variables, images, weights) for net in nets]
  (got, want) = results
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Gradients: the two backward passes sum in different orders (BN's cancellations).
  for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(want[2]),
                          jax.tree.leaves(got[2])):
    relative = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert relative < 1e-5, (jax.tree_util.keystr(path), relative)
