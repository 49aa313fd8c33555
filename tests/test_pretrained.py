"""Weight import: a torchvision-architecture ResNet-18 written in plain torch, saved as
``.pth`` and ``.safetensors``, must give the Flax backbone the same features.

torchvision cannot be installed next to this torch, so the reference network is
written out here with torchvision's module names (and hence its state_dict keys).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.model import multitask
from affect_jax.train import init_from
from affect_jax.model import resnet
from affect_jax.model import pretrained

import torch  # the test extra installs the CPU build
from safetensors import numpy as safetensors_numpy
nn = torch.nn


class TorchBasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock."""

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class TorchResNet18(nn.Module):
  """torchvision.models.resnet18; ``features`` is the input of ``fc``."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.layer1 = nn.Sequential(TorchBasicBlock(64, 64), TorchBasicBlock(64, 64))
    self.layer2 = nn.Sequential(TorchBasicBlock(64, 128, 2), TorchBasicBlock(128, 128))
    self.layer3 = nn.Sequential(TorchBasicBlock(128, 256, 2), TorchBasicBlock(256, 256))
    self.layer4 = nn.Sequential(TorchBasicBlock(256, 512, 2), TorchBasicBlock(512, 512))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.fc(self.features(x))


def _randomise_batch_norms(model, generator):
  """Random affine parameters and running statistics, so that eval-mode BN is no identity."""
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        channels = module.num_features
        module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
        module.bias.copy_(0.2 * torch.randn(channels, generator=generator))
        module.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
        module.num_batches_tracked.fill_(1234)


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = TorchResNet18()
  _randomise_batch_norms(model, torch.Generator().manual_seed(1))
  return model.eval()


@pytest.fixture(scope="module")
def numpy_state_dict(torch_model):
  return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def pth_file(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
  torch.save(torch_model.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def safetensors_file(numpy_state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
  safetensors_numpy.save_file(numpy_state_dict, str(path))
  return path


def _images_nchw(size, batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _torch_features(model, images_nchw):
  with torch.no_grad():
    return model.features(torch.from_numpy(images_nchw)).numpy()


@functools.partial(jax.jit, static_argnames=("train",))
def _flax_backbone(variables, images_nhwc, train):
  """ResNet-18 features and, in training, the updated batch statistics."""
  if train:
    return resnet.ResNet18().apply(variables, images_nhwc, train=True, mutable=["batch_stats"])
  return resnet.ResNet18().apply(variables, images_nhwc, train=False), None


def _flax_features(variables, images_nchw, train=False):
  return _flax_backbone(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), train)


def test_pth_state_dict_loads_as_numpy(pth_file, numpy_state_dict):
  loaded = pretrained.load_torch_state_dict(pth_file)
  assert loaded.keys() == numpy_state_dict.keys()
  assert all(isinstance(v, np.ndarray) for v in loaded.values())
  np.testing.assert_array_equal(loaded["layer3.0.downsample.0.weight"],
                                numpy_state_dict["layer3.0.downsample.0.weight"])


def test_wrapped_checkpoint_is_unwrapped(torch_model, tmp_path):
  path = tmp_path / "checkpoint.pth"
  torch.save({"epoch": 3, "model": {"state_dict": torch_model.state_dict()}}, path)
  assert "conv1.weight" in pretrained.load_torch_state_dict(path)


def test_pickled_objects_are_refused(tmp_path):
  path = tmp_path / "code.pth"
  torch.save({"conv1.weight": torch.zeros(1), "payload": functools.partial(print, "hi")}, path)
  with pytest.raises(pretrained.WeightImportError,
                     match="code.pth is not a torch state dict that can be read safely: "
                           ".*([Ww]eights only load failed|Unsupported)"):
    pretrained.load_torch_state_dict(path)


@pytest.mark.parametrize("name", ["notes.pth", "notes.safetensors"])
def test_a_file_that_is_no_weights_file_is_one_clear_error(tmp_path, name):
  path = tmp_path / name
  path.write_text("these are not weights\n")
  with pytest.raises(pretrained.WeightImportError, match=f"{name} is not a"):
    pretrained.load_state_dict(path)
  from affect_jax import errors
  assert errors.is_expected(pretrained.WeightImportError("x"))


def test_conversion_maps_every_backbone_tensor(numpy_state_dict):
  imported = pretrained.torchvision_state_dict_to_flax(numpy_state_dict)
  expected = jax.eval_shape(functools.partial(resnet.ResNet18().init, train=False),
                            jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(np.shape, imported) == jax.tree.map(lambda x: x.shape, expected)
  np.testing.assert_array_equal(imported["params"]["layer2_0"]["downsample_conv"]["kernel"],
                                numpy_state_dict["layer2.0.downsample.0.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(imported["batch_stats"]["layer4_1"]["bn2"]["var"],
                                numpy_state_dict["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("size", [112, 224])
@pytest.mark.parametrize("loader, file_fixture", [
    (pretrained.load_torch_state_dict, "pth_file"),
    (pretrained.load_safetensors_state_dict, "safetensors_file"),
    (pretrained.load_state_dict, "safetensors_file"),
])
def test_eval_features_match_torch(torch_model, loader, file_fixture, size, request):
  imported = pretrained.torchvision_state_dict_to_flax(
      loader(request.getfixturevalue(file_fixture)))
  images = _images_nchw(size)
  expected = _torch_features(torch_model, images)
  features, _ = _flax_features(imported, images)
  assert np.abs(expected).max() > 0.1  # The comparison is not between near-zeros.
  np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)


def test_train_mode_features_and_running_statistics_match_torch(torch_model, numpy_state_dict):
  imported = pretrained.torchvision_state_dict_to_flax(numpy_state_dict)
  images = _images_nchw(112, batch=4, seed=1)
  train_model = TorchResNet18()
  train_model.load_state_dict(torch_model.state_dict())
  expected = _torch_features(train_model.train(), images)
  features, updates = _flax_features(imported, images, train=True)
  np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)

  # Both frameworks update running averages with torch momentum 0.1 == Flax momentum
  # 0.9. torch feeds the running variance the unbiased batch variance (n / (n - 1));
  # Flax feeds the biased one, which matters where n = batch * H * W is small (layer4).
  block = train_model.layer4[1].bn2
  n = images.shape[0] * 4 * 4  # layer4 of a 112x112 image is 4x4.
  old_var = numpy_state_dict["layer4.1.bn2.running_var"]
  torch_batch_var = (block.running_var.numpy() - 0.9 * old_var) / 0.1
  flax_batch_var = (np.asarray(updates["batch_stats"]["layer4_1"]["bn2"]["var"]) - 0.9 * old_var) / 0.1
  np.testing.assert_allclose(flax_batch_var * n / (n - 1), torch_batch_var, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["layer4_1"]["bn2"]["mean"],
                             block.running_mean.numpy(), rtol=1e-4, atol=1e-5)


def _as_converted(imported):
  """An import laid out as converted weights are: the backbone under `backbone`."""
  return {collection: {"backbone": imported[collection]}
          for collection in ("params", "batch_stats")}


def test_warm_start_merge_replaces_backbone_and_keeps_heads(numpy_state_dict):
  model = multitask.MultiTaskNet(tasks=("expression", "va"))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  # Any values do; arange makes every leaf distinct from the import.
  variables = jax.tree.map(lambda s: jnp.arange(s.size, dtype=s.dtype).reshape(s.shape), shapes)
  imported = pretrained.torchvision_state_dict_to_flax(numpy_state_dict)
  merged, copied = init_from.merge_variables(variables, _as_converted(imported), "backbone")
  assert copied == ["backbone"]
  np.testing.assert_array_equal(merged["params"]["backbone"]["conv1"]["kernel"],
                                imported["params"]["conv1"]["kernel"])
  np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["bn1"]["mean"],
                                imported["batch_stats"]["bn1"]["mean"])
  assert all(a is b for a, b in zip(jax.tree.leaves(merged["params"]["expression_head"]),
                                    jax.tree.leaves(variables["params"]["expression_head"])))
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  assert variables["params"]["backbone"]["conv1"]["kernel"] is not merged["params"][
      "backbone"]["conv1"]["kernel"]  # The input is left as it was.

  # The merged model computes the imported backbone's features.
  images = _images_nchw(64)
  apply = jax.jit(functools.partial(model.apply, train=False, return_features=True))
  features = apply(merged, jnp.asarray(images.transpose(0, 2, 3, 1)))["features"]
  np.testing.assert_allclose(features, _flax_features(imported, images)[0], atol=1e-5)


def test_warm_start_merge_checks_shapes(numpy_state_dict):
  small = multitask.MultiTaskNet(num_filters=32)
  variables = jax.eval_shape(functools.partial(small.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  imported = pretrained.torchvision_state_dict_to_flax(numpy_state_dict)
  with pytest.raises(ValueError, match=r"backbone/\S+ has shape \((\d+, )*64,?\) in the "
                     r"source, \((\d+, )*32,?\) here"):
    init_from.merge_variables(variables, _as_converted(imported), "backbone")


def test_missing_key_is_named(numpy_state_dict):
  broken = dict(numpy_state_dict)
  del broken["layer3.1.bn1.running_var"]
  with pytest.raises(pretrained.WeightImportError, match=r"layer3\.1\.bn1\.running_var"):
    pretrained.torchvision_state_dict_to_flax(broken)


def test_wrong_shape_is_named(numpy_state_dict):
  broken = dict(numpy_state_dict)
  broken["layer2.0.conv1.weight"] = np.zeros((128, 64, 5, 5), np.float32)
  with pytest.raises(pretrained.WeightImportError,
                     match=r"layer2\.0\.conv1\.weight.*\(128, 64, 5, 5\)"):
    pretrained.torchvision_state_dict_to_flax(broken)


def test_unexpected_key_is_named_but_fc_and_counters_are_ignored(numpy_state_dict):
  imported = pretrained.torchvision_state_dict_to_flax(numpy_state_dict)
  assert "fc" not in imported["params"]
  broken = dict(numpy_state_dict, **{"layer1.0.conv3.weight": np.zeros((1,), np.float32)})
  with pytest.raises(pretrained.WeightImportError, match=r"layer1\.0\.conv3\.weight"):
    pretrained.torchvision_state_dict_to_flax(broken)
