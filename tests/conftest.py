"""Test session set-up shared by every test module.

Eight simulated CPU devices let the data-parallel code paths run here exactly as they
run on an 8-GPU host; the flag must be set before JAX is first imported.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Subprocesses and repeated Trainers compile the same small programs again: a shared
# persistent cache turns those compiles into loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "affect_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# The oneDNN convolution handlers, compiled once and shared by the test processes.
os.environ.setdefault("AFFECT_JAX_CACHE", os.path.join(
    tempfile.gettempdir(), f"affect_jax_test_cache_{os.getuid()}"))  # loaded code: per user

import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_release(tmp_path_factory):
  """A small synthetic ABAW6 release (with s-Aff-Wild2 MTL files): (path, ground truth)."""
  from tfds_affwild2 import synthetic
  root = tmp_path_factory.mktemp("release")
  truth = synthetic.generate_release(str(root), seed=3, num_videos=10,
                                     frames_per_video=30)
  return str(root), truth


@pytest.fixture(scope="session")
def built_union(synthetic_release, tmp_path_factory):
  """The `affwild2/union` TFDS dataset of the synthetic release: (builder, data_dir)."""
  from tfds_affwild2 import build
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = build.build_dataset(synthetic_release[0], data_dir, "union")
  return builder, data_dir


def read_json(path):
  with open(path) as f:
    return json.load(f)


# The uninterrupted run of test_train's resume test; test_predict restores the same
# checkpoints, so each implementation trains once per session.
UNINTERRUPTED_RUN = {"num_train_steps": 24, "checkpoint_every_steps": 4,
                     "eval_every_steps": 12, "log_every_steps": 4}


@pytest.fixture(scope="session")
def uninterrupted_run(built_union, tmp_path_factory):
  """`run(implementation, dtype)`: (config, workdir) of the tiny config trained for
  UNINTERRUPTED_RUN's steps with that model.implementation and model.dtype."""
  from affect_jax.train import loop
  from tests.test_train import tiny_config
  runs = {}

  def run(implementation: str, dtype: str = "float32"):
    if (implementation, dtype) not in runs:
      config = tiny_config(built_union[1], **UNINTERRUPTED_RUN, **{
          "model.implementation": implementation, "model.dtype": dtype})
      workdir = str(tmp_path_factory.mktemp(f"uninterrupted_{implementation}_{dtype}"))
      loop.train_and_evaluate(config, workdir)
      runs[implementation, dtype] = config, workdir
    return runs[implementation, dtype]

  return run
