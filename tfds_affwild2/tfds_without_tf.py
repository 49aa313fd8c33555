"""Lets TFDS spill a large build to disk without TensorFlow.

TFDS's writer keeps serialized examples in memory up to a limit (1 GB by default) and
then moves them to on-disk buckets, which it opens with `tf.io.gfile`: without
TensorFlow installed, any release larger than the limit (the real Aff-Wild2 is ~13 GB
of JPEG) would fail mid-build. Those buckets are plain local files in the dataset's
folder, so Python's own file functions do the same job. `install()` gives TFDS's
shuffle module a stand-in for the few `tf` names it uses, when TensorFlow is absent.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import resource
import types


class _NeverRaised(Exception):
  """tf.errors.ResourceExhaustedError has no counterpart: open() raises OSError."""


def _open_file(path, mode: str = "rb"):
  try:
    return open(os.fspath(path), mode)
  except OSError as e:
    if e.errno != errno.EMFILE:
      raise
    # TFDS keeps up to 1000 buckets open at once; raise the soft limit to the hard one.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return open(os.fspath(path), mode)


def _remove(path) -> None:
  os.remove(os.fspath(path))


TF_STAND_IN = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=_open_file, exists=lambda p: os.path.exists(os.fspath(p)), remove=_remove)),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


def install() -> bool:
  """Installs the stand-in when TensorFlow is not installed; True if it did."""
  if importlib.util.find_spec("tensorflow") is not None:
    return False
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  shuffle.tf = TF_STAND_IN
  return True
