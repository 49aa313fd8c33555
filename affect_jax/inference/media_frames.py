"""Frames of a photo, an animation or a video, as RGB uint8 arrays, one at a time.

Images and animations (GIF, APNG, multi-page TIFF, WebP) are read with Pillow; other
videos (mp4, avi, ...) with imageio, which needs `imageio-ffmpeg` for them.
"""
from __future__ import annotations

import itertools
import os
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError


def read_frames(path: str) -> Iterator[np.ndarray]:
  """RGB uint8 frames of an image, an animation or a video, one at a time."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with Image.open(path) as image:
      for frame in ImageSequence.Iterator(image):
        yield np.asarray(frame.convert("RGB"))
    return
  except UnidentifiedImageError:
    pass  # not an image: perhaps a video
  except (OSError, ValueError, SyntaxError) as error:
    raise ValueError(f"{path}: cannot read the image: {error}") from None
  yield from _video_frames(path)


def _video_frames(path: str) -> Iterator[np.ndarray]:
  try:
    import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path}: not an image Pillow can read; reading videos needs "
                     "imageio (pip install imageio imageio-ffmpeg)") from None
  try:
    frames = iio.imiter(path)
    with warnings.catch_warnings():  # imageio's plugin search warns of its deprecations
      warnings.simplefilter("ignore", DeprecationWarning)
      first = next(frames, None)
    for frame in itertools.chain([] if first is None else [first], frames):
      frame = np.asarray(frame)
      if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
      yield np.ascontiguousarray(frame[..., :3]).astype(np.uint8)
  except Exception as error:  # pylint: disable=broad-except  # plugins raise anything
    raise ValueError(f"{path}: cannot read as an image or a video: {error}") from None
