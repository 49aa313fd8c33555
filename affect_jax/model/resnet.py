"""ResNet backbone with torchvision's exact structure.

The backbone reproduces torchvision's ``resnet18`` (ResNet v1.5: the stride of a
downsampling block sits on its first 3x3 conv) layer for layer, so that torchvision
or timm weights can be imported without any change in numerics (see
``affect_jax.model.pretrained``). Inputs are NHWC floats.

Parameter tree of ``ResNet`` and its torchvision ``state_dict`` counterpart (``fc`` has
no counterpart: the backbone ends at global average pooling)::

    conv1/kernel                      conv1.weight                 (OIHW -> HWIO)
    bn1/{scale,bias}                  bn1.{weight,bias}
    bn1/{mean,var}   (batch_stats)    bn1.{running_mean,running_var}
    layer{s}_{b}/conv1, bn1,          layer{s}.{b}.conv1, bn1,
                 conv2, bn2             .conv2, bn2
    layer{s}_{b}/downsample_conv      layer{s}.{b}.downsample.0    (first block of
    layer{s}_{b}/downsample_bn        layer{s}.{b}.downsample.1     layers 2-4 only)

The network is written as flax writes ResNet: the blocks and the stem take their conv,
norm and pool layers as arguments (``Layers``). ``XLA_LAYERS`` are flax's own layers, the
network GPUs and TPUs run, with one rewrite of the stem when training
(``TrainStemNormPool``: max-pool before BN + ReLU, exact, fewer passes over its map);
``affect_jax.cpu.layers.CPU_LAYERS`` are the same layers in
XLA:CPU's fast forms (same parameters, same results up to float rounding).
``affect_jax.model.multitask`` adds the task heads; ``pretrained.backbone_layout`` spells
the torchvision mapping out key by key."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.normalization import _compute_stats
from jax import lax


# torchvision initialises convs with kaiming_normal_(mode="fan_out",
# nonlinearity="relu"): an untruncated normal with variance 2 / fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch pads the 3x3 convs and the stem pooling by 1 on every side. Flax's "SAME" pads
# (0, 1) for stride 2 on even sizes, which shifts every window by one pixel.
PAD_1 = ((1, 1), (1, 1))
PAD_3 = ((3, 3), (3, 3))


def stem_max_pool(x):
  """torch's stem pooling: 3x3, stride 2, padded by 1 with -inf."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_1)


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layer types a ResNet is built from.

  conv: a bias-free convolution with nn.Conv's signature and parameter (`kernel`, HWIO).
  train_norm: BatchNorm in training mode with nn.BatchNorm's parameters and statistics
    (None: nn.BatchNorm itself); evaluation always uses nn.BatchNorm's running averages.
  train_norm_fuses_relu: train_norm takes `relu=True` and applies the ReLU itself.
  train_max_pool: the stem's pooling when training (evaluation uses stem_max_pool).
  train_stem_norm_pool: when training, the stem's BN, ReLU and max-pool as one layer
    over a sign-folded flax convolution (TrainStemNormPool's interface); None: conv,
    train_norm, ReLU and train_max_pool one after the other.
  """

  conv: Any = nn.Conv
  train_norm: Any = None
  train_norm_fuses_relu: bool = False
  train_max_pool: Callable = stem_max_pool
  train_stem_norm_pool: Any = None


# The stem when training, without a pass over its 56x56 map between the convolution
# and the max-pool. BN + ReLU is, per channel, a monotone map of the convolution's
# output: non-decreasing where BN's scale is >= 0, non-increasing where it is < 0. With
# those channels' kernels negated (exact in floating point), it is non-decreasing
# everywhere, so it commutes with the window maximum, rounding included: the max-pool
# runs on the convolution's output and BN + ReLU on the pooled quarter. Autodiff then
# keeps no ReLU output, routes the max-pool's gradient by the convolution's output (the
# same window maxima: only ties that rounding creates in the ReLU's output can pick
# another tap, of equal value) and sums BN's backward terms over the pooled quarter.


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """flax's BatchNorm normalisation (flax.linen.normalization._normalize), op for op."""
  y = x - mean
  y = y * (lax.rsqrt(var + epsilon) * scale)
  return jnp.asarray(y + bias, dtype)


def sign_folded_conv(sign):
  """lax.conv_general_dilated with the kernel's output channels multiplied by `sign`
  (+-1 per channel): exactly sign * the convolution, as nn.Conv's
  `conv_general_dilated`."""
  def conv(inputs, kernel, *args, **kwargs):
    return lax.conv_general_dilated(inputs, kernel * sign.astype(kernel.dtype), *args,
                                    **kwargs)
  return conv


class TrainStemNormPool(nn.Module):
  """The stem's nn.BatchNorm (training mode), ReLU and max-pool over a convolution
  output whose channels are multiplied by `sign()`: nn.BatchNorm's parameters, running
  averages and results, pooled first (see above). The "xla" network's stem when
  training."""

  features: int
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None

  def setup(self):
    shape = (self.features,)
    self.scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype)
    self.bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
    self.ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
    self.ra_var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)

  def sign(self):
    """+-1 per channel: the sign that makes BN's scale non-negative."""
    return jnp.where(self.scale < 0, -1.0, 1.0).astype(jnp.float32)

  def __call__(self, signed, sign):
    initializing = self.is_initializing()
    # Statistics of `signed` = sign * x: the mean is sign * x's, exactly; the variance x's.
    mean, var = _compute_stats(signed, (0, 1, 2), dtype=self.dtype,
                               axis_name=None if initializing else self.axis_name)
    if not initializing:
      self.ra_mean.value = self.momentum * self.ra_mean.value + (1 - self.momentum) * (
          mean * sign)
      self.ra_var.value = self.momentum * self.ra_var.value + (1 - self.momentum) * var
    dtype = self.dtype or jnp.result_type(signed, self.scale, self.bias)
    # (sign x - sign mean) * (sign scale) = (x - mean) * scale, exactly.
    return jax.nn.relu(_normalize(stem_max_pool(signed), mean, var, self.scale * sign,
                                  self.bias, self.epsilon, dtype))


XLA_LAYERS = Layers(train_stem_norm_pool=TrainStemNormPool)  # GPUs and TPUs run these


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs and a residual, 1x1 conv when shapes change."""

  filters: int
  conv: Any
  norm: Any
  norm_fuses_relu: bool = False
  strides: int = 1
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), strides=self.strides, padding=PAD_1, name="conv1")(x)
    y = norm_relu(self.norm, self.norm_fuses_relu, "bn1", y)
    y = self.conv(self.filters, (3, 3), padding=PAD_1, name="conv2")(y)
    last_scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = self.norm(name="bn2", scale_init=last_scale_init)(y)
    # Same condition as torchvision (stride != 1 or channels change).
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), strides=self.strides, padding="VALID",
                           name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


def norm_relu(norm, fused: bool, name: str, x):
  """norm(name=name) then a ReLU, in one layer where the norm layer fuses it."""
  if fused:
    return norm(name=name, relu=True)(x)
  return nn.relu(norm(name=name)(x))


class ResNet(nn.Module):
  """ResNet backbone without classifier: NHWC images -> [B, 8 * num_filters] float32.

  Attributes:
    stage_sizes: blocks per stage, (2, 2, 2, 2) for ResNet-18.
    num_filters: channels of the stem and of the first stage.
    dtype: compute dtype (e.g. jnp.bfloat16); params, BN statistics and the pooled
      output stay float32.
    bn_axis_name: mapped axis over which BN batch statistics are averaged in training
      (the data axis of ``jax.shard_map``); None for statistics of the local batch.
    bn_momentum: Flax convention (weight of the old value): 0.9 == torch momentum 0.1.
    bn_epsilon: 1e-5 as torch.
    zero_init_last_bn: start each block's last BN gamma at 0 (off, as torchvision).
    layers: the layer types (XLA_LAYERS, or the CPU's); parameters and results do not
      depend on them.
  """

  stage_sizes: Sequence[int]
  num_filters: int = 64
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_last_bn: bool = False
  layers: Layers = XLA_LAYERS

  @nn.compact
  def __call__(self, images, *, train: bool):
    layers = self.layers
    conv = functools.partial(layers.conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_kernel_init)
    bn_settings = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, param_dtype=jnp.float32,
                       axis_name=self.bn_axis_name)
    if train and layers.train_norm is not None:
      norm = functools.partial(layers.train_norm, **bn_settings)
      fuses_relu = layers.train_norm_fuses_relu
    else:
      norm = functools.partial(nn.BatchNorm, use_running_average=not train, **bn_settings)
      fuses_relu = False
    x = jnp.asarray(images, self.dtype)
    stem_conv = functools.partial(conv, self.num_filters, (7, 7), strides=2, padding=PAD_3,
                                  name="conv1")
    if train and layers.train_stem_norm_pool is not None:
      stem = layers.train_stem_norm_pool(self.num_filters, name="bn1", **bn_settings)
      sign = stem.sign()
      # layers.conv is nn.Conv here: its `conv_general_dilated` takes the sign fold.
      x = stem(stem_conv(conv_general_dilated=sign_folded_conv(sign))(x), sign)
    else:
      x = stem_conv()(x)
      x = norm_relu(norm, fuses_relu, "bn1", x)
      x = layers.train_max_pool(x) if train else stem_max_pool(x)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.num_filters * 2**stage, conv=conv, norm=norm,
                       norm_fuses_relu=fuses_relu, strides=strides,
                       zero_init_last_bn=self.zero_init_last_bn,
                       name=f"layer{stage + 1}_{block}")(x)
    # Pool in float32: the mean over many bf16 values would lose precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))

