"""ResNet backbone with torchvision's exact structure, and the multi-task affect network.

The backbone reproduces torchvision's ``resnet18`` (ResNet v1.5: the stride of a
downsampling block sits on its first 3x3 conv) layer for layer, so that torchvision
or timm weights can be imported without any change in numerics (see
``affect_jax.pretrained``). Inputs are NHWC floats.

Parameter tree of ``ResNet`` and its torchvision ``state_dict`` counterpart (``fc`` has
no counterpart: the backbone ends at global average pooling)::

    conv1/kernel                      conv1.weight                 (OIHW -> HWIO)
    bn1/{scale,bias}                  bn1.{weight,bias}
    bn1/{mean,var}   (batch_stats)    bn1.{running_mean,running_var}
    layer{s}_{b}/conv1, bn1,          layer{s}.{b}.conv1, bn1,
                 conv2, bn2             .conv2, bn2
    layer{s}_{b}/downsample_conv      layer{s}.{b}.downsample.0    (first block of
    layer{s}_{b}/downsample_bn        layer{s}.{b}.downsample.1     layers 2-4 only)

``MultiTaskNet`` nests the backbone under ``backbone`` and adds ``expression_head``,
``au_head`` and ``va_head`` (each ``TaskHead``: an optional ``hidden`` Dense layer and
an ``output`` Dense layer). ``pretrained.backbone_layout`` spells the mapping out key
by key.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from affect_jax import onednn_conv
from affect_jax.mesh_types import as_varying_like

TASKS = ("expression", "au", "va")
NUM_ACTION_UNITS = 12

# torchvision initialises convs with kaiming_normal_(mode="fan_out",
# nonlinearity="relu"): an untruncated normal with variance 2 / fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch pads the 3x3 convs and the stem pooling by 1 on every side. Flax's "SAME" pads
# (0, 1) for stride 2 on even sizes, which shifts every window by one pixel.
PAD_1 = ((1, 1), (1, 1))
PAD_3 = ((3, 3), (3, 3))

# Implementations of the same network (same parameters, same results up to float
# rounding): "xla" writes it with flax's Conv and max_pool, the form for GPU/TPU; "cpu"
# replaces what XLA:CPU runs slowly (convolutions on oneDNN, strided 1x1 shortcuts as
# matmuls; when training, BN with a closed-form backward pass and the stem's max-pool
# with an index-routed gradient; docs/PERFORMANCE.md has the measurements), and is what
# "auto" picks when JAX's default backend is the CPU. Outputs, BN updates and
# whole-network gradients agree to ~1e-5 (tests/test_models.py). An earlier custom_vjp
# max-pool (2026-11-25) compared the recomputed input with the output in its backward
# pass and dropped the gradient of windows that XLA recomputed with other rounding; the
# present one routes by the index its forward pass found.
IMPLEMENTATIONS = ("auto", "xla", "cpu")


def resolve_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  return implementation


# ----------------------------------------------------------------------------------
# XLA:CPU formulations.
# ----------------------------------------------------------------------------------


def _window_taps(padded, window, strides, out_hw):
  """(i, j, strided slice of `padded` seen by window offset (i, j)) for every offset."""
  batch, _, _, channels = padded.shape
  for i in range(window[0]):
    for j in range(window[1]):
      yield i, j, lax.slice(
          padded, (0, i, j, 0),
          (batch, i + strides[0] * (out_hw[0] - 1) + 1,
           j + strides[1] * (out_hw[1] - 1) + 1, channels),
          (1, strides[0], strides[1], 1))


def _pad_spatial(x, padding, value):
  return lax.pad(x, jnp.asarray(value, x.dtype),
                 ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _output_size(size, kernel, stride, padding):
  return (size + padding[0] + padding[1] - kernel) // stride + 1


def _pool_taps(x):
  """The nine strided slices (row-major window offsets) of a 3x3, stride-2 max-pool
  padded by 1 with -inf, as torch's stem pooling."""
  out_h, out_w = (_output_size(size, 3, 2, (1, 1)) for size in x.shape[1:3])
  padded = _pad_spatial(x, PAD_1, -jnp.inf)
  return [tap for _, _, tap in _window_taps(padded, (3, 3), (2, 2), (out_h, out_w))]


def _max_pool_with_argmax(x):
  """(max, index 0..8 of the first maximal tap in row-major window order, as torch)."""
  with jax.named_scope("max_pool"):  # names its ops in profiles
    return _first_maximum(_pool_taps(x))


def _first_maximum(taps):
  best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for k, tap in enumerate(taps[1:], start=1):
    index = jnp.where(tap > best, jnp.int8(k), index)
    best = jnp.maximum(best, tap)  # propagates a NaN, as torch's max-pool
  return best, index


@jax.custom_vjp
def max_pool_3x3_stride_2(x):
  """The stem's max-pool (3x3, stride 2, padding 1 with -inf) whose backward pass
  routes each output's gradient by the window index saved in the forward pass.

  XLA:CPU expands the gradient of `reduce_window` max into int32 iotas and a variadic
  reduce-window over the padded input (228 of ~1,700 ms of a batch-32 step). Here the
  backward is nine masked, interior-padded copies of the output gradient summed in one
  fusion: the stem block's fwd+bwd 299 -> 146 ms (benchmarks/stem_block.py). The index
  comes from the same values as the forward's maximum, so no recomputation with other
  rounding can lose a window's gradient (the bug of an earlier form that compared the
  recomputed input with the output). Ties go to the first maximal tap and a NaN
  propagates, as in torch."""
  return _max_pool_with_argmax(x)[0]


def _max_pool_fwd(x):
  pooled, index = _max_pool_with_argmax(x)
  return pooled, (index, x.shape)


def _max_pool_bwd(residuals, grad):
  with jax.named_scope("max_pool"):
    return _route_to_maxima(*residuals, grad)


def _route_to_maxima(index, input_shape, grad):
  """The input's gradient: each output's gradient added at its window's maximum."""
  _, height, width, _ = input_shape
  out_h, out_w = grad.shape[1:3]
  zero = jnp.zeros((), grad.dtype)
  total = None
  for k in range(9):
    i, j = divmod(k, 3)
    # Output (r, c) of tap (i, j) reads padded (2r + i, 2c + j) = input (2r + i - 1, ...):
    # scatter by interior padding (stride 2) with edge padding (negative: cropped).
    low_h, low_w = i - 1, j - 1
    placed = lax.pad(jnp.where(index == k, grad, zero), zero,
                     ((0, 0, 0), (low_h, height - low_h - 2 * out_h + 1, 1),
                      (low_w, width - low_w - 2 * out_w + 1, 1), (0, 0, 0)))
    total = placed if total is None else total + placed
  return (total,)


max_pool_3x3_stride_2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _patches_conv(x, kernel, strides, padding):
  """A convolution as one matmul of the input's window taps (im2col)."""
  kh, kw, cin, cout = kernel.shape
  out_hw = (_output_size(x.shape[1], kh, strides[0], padding[0]),
            _output_size(x.shape[2], kw, strides[1], padding[1]))
  taps = [tap for _, _, tap in _window_taps(_pad_spatial(x, padding, 0), (kh, kw),
                                            strides, out_hw)]
  patches = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
  y = lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                      (((3,), (0,)), ((), ())))
  return y


SMALL_OUTPUT_PIXELS = 16
# Below this many output pixels im2col beats oneDNN too, whose per-call kernel reorder
# dominates there: 3x3, 512 channels, batch 32, fwd+bwd: 2x2 maps 24.2 ms im2col
# against 31.0 oneDNN; 4x4 maps 111 against 87 (2026-11-25, one core).
TINY_OUTPUT_PIXELS = 4


class CpuConv(nn.Module):
  """Bias-free convolution with nn.Conv's parameter (`kernel`, HWIO), dtype handling
  and results, in the formulation XLA:CPU runs fastest for its shape:

  - 1x1 with stride (the downsample shortcuts): a strided slice and a matmul; XLA:CPU's
    kernel gradient of a strided 1x1 convolution is 1.6-6x slower than the matmul's;
  - anything else in float32 with more than TINY_OUTPUT_PIXELS output pixels: oneDNN
    through an XLA FFI call (affect_jax.onednn_conv; kernel gradients of maps of at
    most 64 pixels stay on XLA), 1.1-2x faster than XLA:CPU's convolutions on most
    layers here, when it could be built;
  - otherwise (bfloat16, no oneDNN, or tiny maps), outputs of at most
    SMALL_OUTPUT_PIXELS pixels (layer4 at 112x112: 4x4): im2col, one matmul over the
    concatenated window taps;
    XLA:CPU's convolutions are slow on tiny maps (0.8 GFLOP/s on 2x2, 100x slower than
    im2col; 1.2-1.4x on 4x4);
  - and the rest: lax.conv_general_dilated, as nn.Conv.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: Any = "VALID"
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x):
    if self.use_bias:
      raise ValueError("CpuConv has no bias")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    strides = (self.strides, self.strides)
    padding = ((0, 0), (0, 0)) if self.padding == "VALID" else tuple(
        tuple(p) for p in self.padding)
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
      x = x[:, ::strides[0], ::strides[1], :]
      return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
    out_pixels = (_output_size(x.shape[1], kh, strides[0], padding[0])
                  * _output_size(x.shape[2], kw, strides[1], padding[1]))
    if out_pixels > TINY_OUTPUT_PIXELS and onednn_conv.supports(x, kernel):
      return onednn_conv.conv2d(x, as_varying_like(kernel, x), strides, padding)
    if out_pixels <= SMALL_OUTPUT_PIXELS:
      return _patches_conv(x, kernel, strides, padding)
    return _conv(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name, relu: bool, dtype):
  """Training-mode BatchNorm over (N, H, W) per channel, optionally followed by ReLU,
  as flax's nn.BatchNorm (fast variance E[x^2] - E[x]^2 clipped at 0, statistics in
  float32 averaged over `axis_name`) -> (output in `dtype`, batch mean, batch var).

  Autodiff of nn.BatchNorm differentiates through the two means and emits several
  passes over the activations (46 ms fwd+bwd for the stem's 32x56x56x64 map here); this
  backward pass is the closed form: two channel sums (one fusion) and one elementwise
  pass (14 ms; benchmarks/stem_block.py). The mean and variance outputs carry no
  gradient: they feed the running averages only."""
  return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, relu, dtype)[0]


def _channel_means(values):
  """[len(values), C]: each value's mean over all but its last axis (one fusion)."""
  return jnp.stack([v.reshape(-1, v.shape[-1]).mean(0) for v in values])


def _global(means, axis_name):
  """Local means -> means over the global batch (equal shares), one collective."""
  return lax.pmean(means, axis_name) if axis_name is not None else means


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, relu, dtype):
  x32 = x.astype(jnp.float32)
  mean, mean_square = _global(_channel_means((x32, x32 * x32)), axis_name)
  var = jnp.maximum(mean_square - mean * mean, 0.0)
  inverse_std = lax.rsqrt(var + epsilon)
  gain = scale * inverse_std
  y = x32 * gain + (bias - mean * gain)
  if relu:
    y = jnp.maximum(y, 0.0)
  y = y.astype(dtype)
  return (y, mean, var), (x, y if relu else None, mean, inverse_std, scale)


def _batch_norm_train_bwd(epsilon, axis_name, relu, dtype, residuals, cotangents):
  del epsilon, dtype
  x, y, mean, inverse_std, scale = residuals
  grad = cotangents[0].astype(jnp.float32)  # the statistics' cotangents are ignored
  if relu:
    grad = jnp.where(y > 0, grad, 0.0)
  x32 = x.astype(jnp.float32)
  # Sums of g and g x, not of g (x - mean): XLA:CPU then keeps the backward pass at one
  # reduction fusion and one elementwise pass (10 against 25 ms on the stem's map); the
  # cancellation in mean(g x) - mean mean(g) is that of the forward's fast variance,
  # E[x^2] - E[x]^2, which flax's BN has too.
  local = _channel_means((grad, grad * x32))
  mean_grad, mean_grad_x = _global(local, axis_name)
  # With xhat = (x - mean) inverse_std: mean(g xhat) = inverse_std (mean(g x) - mean mean(g)),
  # and dx = gain (g - mean(g) - xhat mean(g xhat)) = g gain - x slope - offset.
  mean_grad_xhat = inverse_std * (mean_grad_x - mean * mean_grad)
  gain = scale * inverse_std
  slope = gain * inverse_std * mean_grad_xhat
  offset = gain * mean_grad - slope * mean
  grad_x = grad * gain - x32 * slope - offset
  # The parameter gradients of this device's share of the batch (shard_map sums them).
  count = x32.size // x32.shape[-1]
  sum_grad, sum_grad_x = local[0] * count, local[1] * count
  grad_scale = inverse_std * (sum_grad_x - mean * sum_grad)
  return (grad_x.astype(x.dtype), grad_scale.astype(scale.dtype),
          sum_grad.astype(scale.dtype))


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class TrainBatchNorm(nn.Module):
  """nn.BatchNorm in training mode (same parameters, running averages, dtypes and
  results up to float rounding) with `batch_norm_train`'s closed-form backward pass,
  and an optional ReLU fused in. The "cpu" implementation's BN when training.

  One limit: with `axis_name`, the gradient must be taken inside the mapped function
  (as the train step does under shard_map); jax.grad of jax.vmap(..., axis_name) runs
  the backward pass's pmean where the axis is no longer bound (nn.BatchNorm allows it).
  """

  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None
  scale_init: Any = nn.initializers.ones
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    initializing = self.is_initializing()
    x = jnp.asarray(x)
    # flax's output dtype: `dtype`, else x's promoted with the parameters'
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    y, mean, var = batch_norm_train(
        x, as_varying_like(jnp.asarray(scale, jnp.float32), x),
        as_varying_like(jnp.asarray(bias, jnp.float32), x), self.epsilon,
        None if initializing else self.axis_name, self.relu, dtype)
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def _norm_relu(norm, name: str, x):
  """norm(name=name) then a ReLU, fused into one op when norm makes a TrainBatchNorm."""
  if getattr(norm, "func", None) is TrainBatchNorm:
    return norm(name=name, relu=True)(x)
  return nn.relu(norm(name=name)(x))


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs and a residual, 1x1 conv when shapes change."""

  filters: int
  conv: Any
  norm: Any
  strides: int = 1
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), strides=self.strides, padding=PAD_1, name="conv1")(x)
    y = _norm_relu(self.norm, "bn1", y)
    y = self.conv(self.filters, (3, 3), padding=PAD_1, name="conv2")(y)
    last_scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = self.norm(name="bn2", scale_init=last_scale_init)(y)
    # Same condition as torchvision (stride != 1 or channels change).
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), strides=self.strides, padding="VALID",
                           name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


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
    implementation: "auto", "xla" or "cpu" (see IMPLEMENTATIONS); parameters and
      results do not depend on it.
  """

  stage_sizes: Sequence[int]
  num_filters: int = 64
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_last_bn: bool = False
  implementation: str = "auto"

  @nn.compact
  def __call__(self, images, *, train: bool):
    cpu = resolve_implementation(self.implementation) == "cpu"
    conv = functools.partial(CpuConv if cpu else nn.Conv, use_bias=False,
                             dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=conv_kernel_init)
    # Training BN with a closed-form backward pass on CPU (eval BN is an affine map).
    norm = functools.partial(TrainBatchNorm if cpu and train else nn.BatchNorm,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=jnp.float32,
                             axis_name=self.bn_axis_name)
    if not (cpu and train):
      norm = functools.partial(norm, use_running_average=not train)
    x = jnp.asarray(images, self.dtype)
    x = conv(self.num_filters, (7, 7), strides=2, padding=PAD_3, name="conv1")(x)
    x = _norm_relu(norm, "bn1", x)
    if cpu and train:  # its forward alone is slower than reduce_window's: eval keeps that
      x = max_pool_3x3_stride_2(x)
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_1)  # -inf padding, as torch
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.num_filters * 2**stage, conv=conv, norm=norm, strides=strides,
                       zero_init_last_bn=self.zero_init_last_bn,
                       name=f"layer{stage + 1}_{block}")(x)
    # Pool in float32: the mean over many bf16 values would lose precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))


class TaskHead(nn.Module):
  """Linear head, or a one-hidden-layer ReLU MLP when hidden_dim > 0; float32 throughout.

  Heads are small, so computing them in float32 costs nothing under bf16 and keeps the
  logits exact. Flax's Dense init (LeCun normal, zero bias) is kept: torchvision's fc
  init is never imported.
  """

  num_outputs: int
  hidden_dim: int = 0

  @nn.compact
  def __call__(self, features):
    x = features
    if self.hidden_dim > 0:
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=jnp.float32, name="hidden")(x))
    return nn.Dense(self.num_outputs, dtype=jnp.float32, name="output")(x)


class MultiTaskNet(nn.Module):
  """Shared ResNet backbone -> pooled feature -> dropout -> one head per enabled task.

  ``__call__(images, train=..., return_features=False)`` returns a dict with, for the
  enabled tasks only: ``expression`` [B, num_expr_classes] logits, ``au`` [B, 12]
  logits, ``va`` [B, 2] in [-1, 1] (tanh); plus ``features`` [B, 512] (the pooled
  backbone output, before dropout) when ``return_features``. All float32. Dropout
  (train only) draws from the 'dropout' rng stream.
  """

  tasks: tuple[str, ...] = TASKS
  num_expr_classes: int = 8
  head_hidden_dim: int = 0
  dropout_rate: float = 0.0
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_filters: int = 64
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  zero_init_last_bn: bool = False
  implementation: str = "auto"

  @nn.compact
  def __call__(self, images, *, train: bool, return_features: bool = False):
    unknown = set(self.tasks) - set(TASKS)
    if unknown or not self.tasks:
      raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
    features = ResNet(stage_sizes=self.stage_sizes, num_filters=self.num_filters,
                      dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      bn_momentum=self.bn_momentum,
                      zero_init_last_bn=self.zero_init_last_bn,
                      implementation=self.implementation, name="backbone")(
                          images, train=train)
    head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    num_outputs = {"expression": self.num_expr_classes, "au": NUM_ACTION_UNITS, "va": 2}
    outputs = {task: TaskHead(num_outputs[task], self.head_hidden_dim,
                              name=f"{task}_head")(head_input)
               for task in TASKS if task in self.tasks}
    if "va" in outputs:
      outputs["va"] = jnp.tanh(outputs["va"])
    if return_features:
      outputs["features"] = features
    return outputs
