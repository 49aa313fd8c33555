"""2-D convolutions through oneDNN on the CPU: the "cpu" implementation's convolutions.

XLA:CPU runs convolutions on Eigen or YNNPACK. oneDNN (the library PyTorch uses on
CPUs) is 1.1-2x faster on most of ResNet-18's forward convolutions and input gradients
here, and computes kernel gradients without XLA's transposes of the activations
(docs/PERFORMANCE.md). ``conv2d`` calls it through three XLA FFI handlers
(``native/onednn_conv.cc``: forward, input gradient, kernel gradient) and is
differentiable through a ``custom_vjp``.

The handlers are compiled on first use with the machine's C++ compiler against the
headers of oneDNN's C API shipped in ``native/onednn/include`` and the ``libdnnl.so.3``
of the ``onednn-cpu-gomp`` wheel (the `cpu` extra, Linux x86-64), and cached under
``$AFFECT_JAX_CACHE`` (default ``~/.cache/affect_jax``), keyed by the sources, the
jaxlib version and the library's path and version. Where that cannot be done (another
platform, no compiler, no wheel, a library of another version than the headers') or
``AFFECT_JAX_ONEDNN=0`` is set, ``available()`` is False, the
reason is logged once, and the model keeps XLA's own convolutions: the results are the
same up to float rounding either way.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from affect_jax.cpu.varying import as_varying_like

NATIVE_DIR = Path(__file__).parent / "native"
SOURCE = NATIVE_DIR / "onednn_conv.cc"
HEADERS = NATIVE_DIR / "onednn" / "include"
LIBRARY_DISTRIBUTION = "onednn-cpu-gomp"
LIBRARY_NAME = "libdnnl.so.3"
HEADERS_VERSION = (3, 2)  # native/onednn/include, as the wheel's library
TARGETS = {  # FFI target name -> exported handler symbol
    "affect_onednn_conv_forward": "AffectOnednnConvForward",
    "affect_onednn_conv_input_grad": "AffectOnednnConvInputGrad",
    "affect_onednn_conv_kernel_grad": "AffectOnednnConvKernelGrad",
}
DISABLE_VARIABLE = "AFFECT_JAX_ONEDNN"
# Kernel gradients of maps this small (ResNet-18 at 112 px: layer4's 4x4) go to XLA:
# 0.951 -> 0.979 of PyTorch's train step (model_variants, docs/PERFORMANCE.md).
XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS = 64


@dataclasses.dataclass(frozen=True)
class Status:
  available: bool
  reason: str  # why not, or where the built library lies


def cache_dir() -> Path:
  return Path(os.environ.get("AFFECT_JAX_CACHE", Path.home() / ".cache" / "affect_jax"))


def find_dnnl_library() -> Path:
  """libdnnl.so.3 as installed by the onednn-cpu-gomp wheel (it lands in <prefix>/lib)."""
  try:
    files = importlib.metadata.files(LIBRARY_DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError as error:
    raise FileNotFoundError(
        f"the {LIBRARY_DISTRIBUTION} package is not installed: pip install "
        "'affect-jax[cpu]'") from error
  for file in files:
    if file.name == LIBRARY_NAME:
      return Path(file.locate()).resolve()
  raise FileNotFoundError(f"{LIBRARY_DISTRIBUTION} has no {LIBRARY_NAME}")


def dnnl_version(dnnl_library: Path) -> tuple[int, int, int]:
  """(major, minor, patch) that the library reports (dnnl_version())."""

  class Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int),
                ("patch", ctypes.c_int), ("hash", ctypes.c_char_p)]

  function = ctypes.CDLL(str(dnnl_library)).dnnl_version
  function.restype = ctypes.POINTER(Version)
  version = function().contents
  return version.major, version.minor, version.patch


def _build_key(dnnl_library: Path) -> str:
  digest = hashlib.sha256()
  for path in [SOURCE, *sorted(HEADERS.rglob("*.h"))]:
    digest.update(path.read_bytes())
  digest.update(jax.ffi.include_dir().encode())
  digest.update(importlib.metadata.version("jaxlib").encode())
  digest.update(f"{dnnl_library}:{dnnl_version(dnnl_library)}".encode())
  return digest.hexdigest()[:16]


def compile_command(output: Path, dnnl_library: Path) -> list[str]:
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise FileNotFoundError("no C++ compiler (g++ or c++) on PATH and CXX is unset")
  return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC",
          "-I", str(HEADERS), "-I", jax.ffi.include_dir(), str(SOURCE),
          "-L", str(dnnl_library.parent), f"-l:{dnnl_library.name}",
          f"-Wl,-rpath,{dnnl_library.parent}", "-Wl,--no-undefined", "-o", str(output)]


def build_library(dnnl_library: Path) -> Path:
  """The compiled handlers for this source and jaxlib, built once per cache key. Several
  processes (pytest workers, the hosts of a pod sharing a home) may ask at once: one
  builds under a file lock, the others then find the result."""
  directory = cache_dir() / "native"
  library = directory / f"libaffect_onednn_conv-{_build_key(dnnl_library)}.so"
  if library.exists():  # also where the cache is read-only
    return library
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / "build.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not library.exists():
      with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(compile_command(partial, dnnl_library),
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
          raise RuntimeError(f"compiling {SOURCE} failed:\n{result.stderr[-4000:]}")
        os.replace(partial, library)  # atomic: nobody loads a half-written file
  return library


def _one_openmp_thread_per_process_when_several() -> None:
  """One OpenMP thread for oneDNN in each process of a multi-process run, unless
  OMP_NUM_THREADS says otherwise; libgomp reads it once, when libdnnl loads it.

  Why: with jax 0.11.2, two processes of 2 CPU devices each, device-resident data and
  2 OpenMP threads trained to parameters 6e-4 away from one process of 4 devices after
  4 steps (tests/test_reliability.py, two-process test), deterministically; with one
  thread they agree to 2e-7, as with XLA's convolutions. Not understood (each
  convolution alone is exact with 1 or 2 threads, and jax 0.10.2 is unaffected), so
  the configuration that is known to be right is the one used. Such runs share a
  host's cores between processes anyway."""
  if jax.process_count() > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.info("oneDNN convolutions: one OpenMP thread per process (%d processes)",
                 jax.process_count())


@functools.cache
def load() -> Status:
  """Builds (once) and registers the FFI handlers; never raises."""
  if os.environ.get(DISABLE_VARIABLE, "1") == "0":
    return Status(False, f"{DISABLE_VARIABLE}=0")
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return Status(False, f"no {LIBRARY_DISTRIBUTION} wheel for "
                         f"{platform.system()} {platform.machine()}")
  try:
    dnnl_library = find_dnnl_library()
    _one_openmp_thread_per_process_when_several()
    version = dnnl_version(dnnl_library)  # loads libdnnl and with it libgomp
    if version[:2] != HEADERS_VERSION:
      return Status(False, f"{dnnl_library} is oneDNN {version}; the handlers are "
                           f"written against the headers of {HEADERS_VERSION}")
    library = build_library(dnnl_library)
    handlers = ctypes.cdll.LoadLibrary(str(library))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, symbol)),
                                  platform="cpu")
  except Exception as error:  # noqa: BLE001 -- any failure means XLA's convolutions
    return Status(False, f"{type(error).__name__}: {error}")
  return Status(True, str(library))


@functools.cache
def available() -> bool:
  status = load()
  if status.available:
    logging.info("oneDNN convolutions: %s", status.reason)
  else:
    logging.warning("oneDNN convolutions unavailable (%s); the \"cpu\" implementation "
                    "uses XLA's convolutions instead", status.reason)
  return status.available


def _check_shapes(x, kernel, strides, padding) -> None:
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d takes NHWC inputs and HWIO kernels, got ranks {x.ndim} "
                     f"and {kernel.ndim}")
  if x.shape[3] != kernel.shape[2]:
    raise ValueError(f"input channels {x.shape[3]} differ from the kernel's input "
                     f"features {kernel.shape[2]} (shapes {x.shape}, {kernel.shape})")
  out_hw = output_hw(x.shape, kernel.shape, strides, padding)
  if min(out_hw) < 1 or min(strides) < 1 or min(min(p) for p in padding) < 0:
    raise ValueError(f"no output for input {x.shape}, kernel {kernel.shape}, strides "
                     f"{strides} and padding {padding}")


def supports(x, kernel) -> bool:
  """Whether conv2d can take these operands: float32 NHWC / HWIO and oneDNN built. The
  handlers exist for the CPU only; the "cpu" implementation, their one user, is chosen
  for CPU meshes only (affect_jax.model.implementation)."""
  return (x.ndim == 4 and kernel.ndim == 4 and x.dtype == jnp.float32
          and kernel.dtype == jnp.float32 and available())


def _attributes(strides, padding) -> dict:
  (top, bottom), (left, right) = padding
  return {"stride_h": np.int64(strides[0]), "stride_w": np.int64(strides[1]),
          "pad_top": np.int64(top), "pad_bottom": np.int64(bottom),
          "pad_left": np.int64(left), "pad_right": np.int64(right)}


def output_hw(x_shape, kernel_shape, strides, padding) -> tuple[int, int]:
  return tuple((x_shape[1 + axis] + sum(padding[axis]) - kernel_shape[axis])
               // strides[axis] + 1 for axis in range(2))


def ffi_conv(target, result_shape, first, second, strides, padding, like):
  status = load()  # registers the handlers on first use
  if not status.available:
    raise RuntimeError(f"oneDNN convolutions are unavailable: {status.reason}")
  result = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(result_shape, jnp.float32),
                            vmap_method="sequential")(
                                first, second, **_attributes(strides, padding))
  return as_varying_like(result, like)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))
  on oneDNN, float32. Inside jax.shard_map the kernel must be typed varying like x
  (affect_jax.cpu.varying.as_varying_like), as for any custom_vjp taking a replicated parameter.
  Reverse mode only (jax.grad, jax.vjp): a custom_vjp has no forward-mode rule.
  Kernel gradients of maps of at most XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS output pixels
  are XLA's own: faster there than oneDNN's, whose are faster on larger maps."""
  return _forward(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  _check_shapes(x, kernel, strides, padding)  # here: jax.grad calls _conv2d_fwd only
  out_h, out_w = output_hw(x.shape, kernel.shape, strides, padding)
  return ffi_conv("affect_onednn_conv_forward",
               (x.shape[0], out_h, out_w, kernel.shape[3]), x, kernel, strides, padding,
               like=x)


def _conv2d_fwd(x, kernel, strides, padding):
  return _forward(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = ffi_conv("affect_onednn_conv_input_grad", x.shape, dy, kernel, strides, padding,
             like=dy)
  if dy.shape[1] * dy.shape[2] <= XLA_KERNEL_GRAD_MAX_OUTPUT_PIXELS:
    dkernel = jax.vjp(lambda k: lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")),
                      kernel)[1](dy)[0]
  else:
    dkernel = ffi_conv("affect_onednn_conv_kernel_grad", kernel.shape, x, dy, strides,
                    padding, like=dy)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
