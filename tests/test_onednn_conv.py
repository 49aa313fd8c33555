"""oneDNN convolutions (affect_jax/cpu/onednn_conv.py) against a float64 NumPy reference."""
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.model import resnet
from affect_jax.cpu import layers, onednn_conv

# (input NHWC, kernel HWIO, strides, padding): ResNet-18's kinds of convolution at
# small sizes, plus odd sizes, asymmetric strides and paddings, and a 1x1.
CASES = [
    ((2, 17, 15, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),      # stem
    ((3, 9, 9, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),        # 3x3, stride 1
    ((2, 10, 9, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),      # 3x3, stride 2
    ((2, 4, 4, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),     # layer4's 4x4 map
    ((2, 11, 8, 5), (3, 2, 5, 7), (2, 1), ((0, 2), (1, 0))),       # asymmetric
    ((2, 6, 6, 8), (1, 1, 8, 4), (1, 1), ((0, 0), (0, 0))),        # 1x1
]


def _padded(x, padding):
  return np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))


def _taps(out_hw, kernel_hw, strides):
  """(i, j, rows, columns): the input rows and columns that kernel tap (i, j) reads."""
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      yield (i, j, slice(i, i + strides[0] * (out_hw[0] - 1) + 1, strides[0]),
             slice(j, j + strides[1] * (out_hw[1] - 1) + 1, strides[1]))


def reference_conv_and_grads(x, kernel, strides, padding, dy):
  """float64 forward, input gradient and kernel gradient, one kernel tap at a time."""
  x, kernel, dy = (np.asarray(a, np.float64) for a in (x, kernel, dy))
  xp = _padded(x, padding)
  out_hw = dy.shape[1:3]
  y = np.zeros(dy.shape)
  dxp = np.zeros(xp.shape)
  dkernel = np.zeros(kernel.shape)
  for i, j, rows, cols in _taps(out_hw, kernel.shape[:2], strides):
    window = xp[:, rows, cols, :]
    y += window @ kernel[i, j]
    dxp[:, rows, cols, :] += dy @ kernel[i, j].T
    dkernel[i, j] = np.einsum("nhwc,nhwo->co", window, dy)
  (top, _), (left, _) = padding
  dx = dxp[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return y, dx, dkernel


def test_onednn_is_built_where_ci_runs():
  """CI (Linux x86-64) must exercise the oneDNN path, not fall back silently."""
  if platform.system() == "Linux" and platform.machine() == "x86_64":
    status = onednn_conv.load()
    assert status.available, status.reason


@pytest.mark.parametrize("xla_kernel_grad_max_pixels", [0, 64])
@pytest.mark.parametrize("x_shape,kernel_shape,strides,padding", CASES)
def test_forward_and_gradients_match_float64_reference(x_shape, kernel_shape, strides,
                                                       padding,
                                                       xla_kernel_grad_max_pixels,
                                                       monkeypatch):
  """Every case with the kernel gradient on oneDNN (0) and as the model runs it (64:
  XLA's on small maps)."""
  monkeypatch.setattr(onednn_conv, "XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS",
                      xla_kernel_grad_max_pixels)
  rng = np.random.default_rng(sum(x_shape) + sum(kernel_shape))
  x = rng.standard_normal(x_shape).astype(np.float32)
  kernel = rng.standard_normal(kernel_shape).astype(np.float32)
  out_hw = onednn_conv.output_hw(x_shape, kernel_shape, strides, padding)
  dy = rng.standard_normal((x_shape[0], *out_hw, kernel_shape[3])).astype(np.float32)
  y_ref, dx_ref, dkernel_ref = reference_conv_and_grads(x, kernel, strides, padding, dy)

  y, vjp = jax.vjp(lambda a, b: onednn_conv.conv2d(a, b, strides, padding), x, kernel)
  dx, dkernel = vjp(jnp.asarray(dy))
  for got, want in ((y, y_ref), (dx, dx_ref), (dkernel, dkernel_ref)):
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_mismatched_shapes_are_refused_not_read_out_of_bounds():
  x = jnp.ones((2, 8, 8, 8), jnp.float32)
  with pytest.raises(ValueError, match="input channels 8 differ"):
    onednn_conv.conv2d(x, jnp.ones((3, 3, 4, 4), jnp.float32), (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="no output"):
    onednn_conv.conv2d(x, jnp.ones((9, 9, 8, 4), jnp.float32), (1, 1), ((0, 0), (0, 0)))
  # The handler checks too: a result shape that does not fit the operands.
  with pytest.raises(Exception, match="output size does not match"):
    onednn_conv.ffi_conv("affect_onednn_conv_forward", (2, 5, 5, 4), x,
                      jnp.ones((3, 3, 8, 4), jnp.float32), (1, 1), ((1, 1), (1, 1)),
                      like=x).block_until_ready()


def test_jitted_vmapped_conv_equals_the_loop_over_the_mapped_axis():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
  conv = lambda a: onednn_conv.conv2d(a, kernel, (1, 1), ((1, 1), (1, 1)))
  mapped = jax.jit(jax.vmap(conv))(x)
  np.testing.assert_array_equal(np.asarray(mapped), np.stack([conv(a) for a in x]))


def test_cpu_resnet_gives_the_same_outputs_and_gradients_with_and_without_onednn(
    monkeypatch):
  """CpuConv goes to oneDNN for float32 (not 1x1 strided) convolutions; with oneDNN
  unavailable it keeps XLA's. Both must compute the same network."""
  net = resnet.ResNet(stage_sizes=(1, 1), num_filters=8, layers=layers.CPU_LAYERS)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = net.init(jax.random.key(0), images, train=False)

  def loss(params):
    features, _ = net.apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(features * jnp.arange(features.shape[-1]))

  calls = []
  real_conv2d = onednn_conv.conv2d
  monkeypatch.setattr(onednn_conv, "conv2d",
                      lambda *args: calls.append(args[2:]) or real_conv2d(*args))
  with_onednn = jax.value_and_grad(loss)(variables["params"])
  assert len(calls) == 5  # the stem and both blocks' 3x3 convs (the strided 1x1 is a matmul)
  monkeypatch.setattr(onednn_conv, "supports", lambda x, kernel: False)
  without = jax.value_and_grad(loss)(variables["params"])
  np.testing.assert_allclose(with_onednn[0], without[0], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(with_onednn[1]), jax.tree.leaves(without[1])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_disabled_by_environment_and_failed_builds_say_why(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn_conv.DISABLE_VARIABLE, "0")
  status = onednn_conv.load.__wrapped__()
  assert not status.available and onednn_conv.DISABLE_VARIABLE in status.reason

  monkeypatch.delenv(onednn_conv.DISABLE_VARIABLE)
  monkeypatch.setenv("AFFECT_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  with pytest.raises(RuntimeError, match="onednn_conv.cc"):
    onednn_conv.build_library(onednn_conv.find_dnnl_library())
  assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built is kept


def test_concurrent_first_builds_share_one_library(tmp_path):
  """Two processes building into an empty cache at once (pytest workers, pod hosts)
  both get the same, complete, loadable library (the lock saves the second build; the
  atomic rename alone keeps the file whole)."""
  script = ("import ctypes, sys; from affect_jax.cpu import onednn_conv as o; "
            "p = o.build_library(o.find_dnnl_library()); ctypes.CDLL(str(p)); print(p)")
  env_cache = {"AFFECT_JAX_CACHE": str(tmp_path)}
  processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, **env_cache})
               for _ in range(2)]
  outputs = [process.communicate()[0].strip() for process in processes]
  assert [process.returncode for process in processes] == [0, 0]
  assert outputs[0] == outputs[1]
  assert len(list((tmp_path / "native").glob("*.so"))) == 1
