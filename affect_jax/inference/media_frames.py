"""Frames of a photo, an animation or a video, as RGB uint8 arrays with their times.

Images and animations (GIF, APNG, multi-page TIFF, WebP) are read with Pillow, whatever
their mode: 16-bit and 32-bit grey scaled to 8 bits (Pillow's own conversion clips
them, so that a 16-bit photo reads as white), alpha laid over white, CMYK, palette and
1-bit images converted. Other videos (mp4, avi, mov, mkv, webm...) are decoded by
OpenCV's FFmpeg, one frame at a time, each with the time the container gives it (a
variable frame rate keeps its real times). A frame larger than MAX_FRAME_PIXELS is
refused from the file's header, before it is decoded. What cannot be read is an
InputError naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from affect_jax.errors import InputError

# 6000 x 6000: a face detector finds nothing it could not find in a smaller copy, and
# an 8000 x 8000 frame is 192 MB as RGB before any copy.
MAX_FRAME_PIXELS = 36_000_000
WHITE = 255


@dataclasses.dataclass(frozen=True)
class Frame:
  """One frame: its number (from 1, as ABAW numbers frames), its time in seconds from
  the start, and its pixels (RGB uint8 [H, W, 3])."""
  number: int
  seconds: float
  image: np.ndarray


def check_frame_size(path: str, width: int, height: int,
                     max_pixels: int = MAX_FRAME_PIXELS) -> None:
  if width * height > max_pixels:
    raise InputError(f"{path}: a {width}x{height} frame is larger than the "
                     f"{max_pixels:,} pixels analysed; resize it first (faces of 40 "
                     "pixels and more are found)")


def as_rgb8(pixels: np.ndarray) -> np.ndarray:
  """RGB uint8 [H, W, 3] from an array of any common layout: [H, W] grey, [H, W, 1],
  [H, W, 3] RGB, [H, W, 4] RGBA (laid over white); uint8, uint16 (scaled by 1/257),
  or floats in [0, 1]."""
  pixels = np.asarray(pixels)
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
    raise InputError(f"an image is [height, width], [height, width, 3] or [height, "
                     f"width, 4], not {list(pixels.shape)}")
  if min(pixels.shape[:2]) == 0:
    raise InputError(f"an image of {pixels.shape[0]}x{pixels.shape[1]} pixels is empty")
  if pixels.dtype == np.uint8:
    scaled = pixels.astype(np.float32) if pixels.ndim == 3 and pixels.shape[-1] == 4 \
      else pixels
  elif pixels.dtype == np.uint16:
    scaled = pixels.astype(np.float32) / 257.0
  elif np.issubdtype(pixels.dtype, np.floating):
    scaled = np.clip(np.nan_to_num(pixels.astype(np.float32)), 0.0, 1.0) * 255.0
  elif pixels.dtype == np.bool_:
    scaled = pixels.astype(np.float32) * 255.0
  else:
    raise InputError(f"images are uint8, uint16 or floats in [0, 1], not {pixels.dtype}")
  if scaled.ndim == 2:
    scaled = np.repeat(scaled[..., None], 3, axis=-1)
  elif scaled.shape[-1] == 4:
    alpha = scaled[..., 3:] / 255.0
    scaled = scaled[..., :3] * alpha + WHITE * (1.0 - alpha)
  if scaled.dtype != np.uint8:
    scaled = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(scaled)


def pillow_rgb8(image: Image.Image) -> np.ndarray:
  """A Pillow frame as RGB uint8: deep grey modes scaled, alpha over white."""
  mode = image.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
    return as_rgb8(np.asarray(image).astype(np.uint16))
  if mode == "I":  # 32-bit integers: 16-bit PNGs open so; wider values clip
    values = np.asarray(image)
    return as_rgb8(np.clip(values, 0, 65535).astype(np.uint16))
  if mode == "F":
    values = np.asarray(image, np.float32)
    return as_rgb8(values / 255.0 if values.max(initial=0.0) > 1.0 else values)
  if mode in ("RGBA", "LA", "PA") or (mode in ("P", "L", "RGB") and
                                      "transparency" in image.info):
    return as_rgb8(np.asarray(image.convert("RGBA")))
  return np.asarray(image.convert("RGB"))


def image_frames(path: str, image: Image.Image, max_pixels: int = MAX_FRAME_PIXELS
                 ) -> Iterator[Frame]:
  """Every frame of an opened image or animation, timed by its frame durations."""
  check_frame_size(path, *image.size, max_pixels=max_pixels)
  seconds = 0.0
  for number, frame in enumerate(ImageSequence.Iterator(image), start=1):
    yield Frame(number, seconds, pillow_rgb8(frame))
    seconds += float(frame.info.get("duration") or 0) / 1000.0


def iter_frames(path: str, max_pixels: int = MAX_FRAME_PIXELS) -> Iterator[Frame]:
  """The frames of an image, an animation or a video, one at a time."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise InputError(f"{path}: the file is empty (0 bytes)")
  try:
    with Image.open(path) as image:  # reads the header only
      yield from image_frames(path, image, max_pixels)
    return
  except UnidentifiedImageError:
    pass  # not an image: perhaps a video
  except Image.DecompressionBombError:
    raise InputError(f"{path}: the image is too large to decode safely") from None
  except (OSError, ValueError, SyntaxError) as error:
    if isinstance(error, InputError):
      raise
    raise InputError(f"{path}: cannot read the image: {error}") from None
  yield from video_frames(path, max_pixels)


def video_frames(path: str, max_pixels: int = MAX_FRAME_PIXELS) -> Iterator[Frame]:
  """A video's frames through OpenCV's FFmpeg, with the container's times."""
  import cv2  # pylint: disable=g-import-not-at-top
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise InputError(f"{path}: cannot read as an image or a video (not a format "
                       "Pillow or FFmpeg knows, or a damaged file)")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    check_frame_size(path, width, height, max_pixels)
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    number = 0
    while True:
      ok, bgr = capture.read()
      if not ok:
        break
      number += 1
      milliseconds = capture.get(cv2.CAP_PROP_POS_MSEC)
      seconds = (milliseconds / 1000.0 if milliseconds >= 0 and (number == 1 or
                 milliseconds > 0) else (number - 1) / fps if fps > 0 else 0.0)
      yield Frame(number, seconds, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if number == 0:  # FFmpeg opens some files it cannot decode (text named .jpg)
      raise InputError(f"{path}: cannot read as an image or a video (no frame "
                       "decodes)")
  finally:
    capture.release()


def read_frames(path: str) -> Iterator[np.ndarray]:
  """RGB uint8 frames of an image, an animation or a video, one at a time."""
  for frame in iter_frames(path):
    yield frame.image
