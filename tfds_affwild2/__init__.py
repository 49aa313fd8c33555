"""Aff-Wild2 (ABAW) as a TensorFlow Datasets builder, without TensorFlow.

Importing this package registers the `affwild2` builder, so that
`tfds.builder('affwild2/union', data_dir=...)` finds a dataset built with
`python -m tfds_affwild2.build`.
"""
from tfds_affwild2.affwild2 import Affwild2, Affwild2Config

__all__ = ["Affwild2", "Affwild2Config"]
