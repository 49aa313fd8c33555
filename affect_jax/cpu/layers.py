"""The ResNet's layers in the forms XLA:CPU runs fastest: the "cpu" implementation.

Same parameters, statistics and results (up to float rounding) as flax's layers, which
the "xla" implementation uses (tests/test_models.py compares outputs, BN updates and
whole-network gradients to ~1e-5); docs/PERFORMANCE.md has the measurements behind each
form:

- ``CpuConv``: strided 1x1 shortcuts as matmuls, oneDNN convolutions through XLA FFI
  (``onednn_conv``), im2col matmuls on tiny maps;
- ``TrainBatchNorm``: training BN with a closed-form backward pass and a fused ReLU;
- ``max_pool_3x3_stride_2``: the stem's max-pool with a gradient routed by the index its
  forward pass found.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from affect_jax.cpu import onednn_conv
from affect_jax.cpu.varying import as_varying_like
from affect_jax.model.resnet import PAD_1, Layers, conv_kernel_init


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
  rounding can lose a window's gradient (which comparing a recomputed input with the
  output would). Ties go to the first maximal tap and a NaN propagates, as in torch."""
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
# dominates there (docs/PERFORMANCE.md: 2x2 maps faster with im2col, 4x4 with oneDNN).
TINY_OUTPUT_PIXELS = 4


class CpuConv(nn.Module):
  """Bias-free convolution with nn.Conv's parameter (`kernel`, HWIO), dtype handling
  and results, in the formulation XLA:CPU runs fastest for its shape:

  - 1x1 with stride (the downsample shortcuts): a strided slice and a matmul; XLA:CPU's
    kernel gradient of a strided 1x1 convolution is 1.6-6x slower than the matmul's;
  - anything else in float32 with more than TINY_OUTPUT_PIXELS output pixels: oneDNN
    through an XLA FFI call (affect_jax.cpu.onednn_conv; kernel gradients of maps of at
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


CPU_LAYERS = Layers(conv=CpuConv, train_norm=TrainBatchNorm, train_norm_fuses_relu=True,
                    train_max_pool=max_pool_3x3_stride_2)
