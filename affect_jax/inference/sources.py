"""Where frames to predict come from: a TFDS split, a folder of cropped faces, or an
ABAW test list over image roots; each opened as a grain dataset of uint8 batches with
the frame's video name and number."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import grain
import numpy as np

from affect_jax import errors
from affect_jax.data import augment, pipeline, records
from affect_jax.inference import submission
from tfds_affwild2 import annotations, release

NAME_BYTES = 128  # video names travel through the pipeline as fixed-width uint8


class MissingSourceError(errors.InputError, FileNotFoundError):
  """A source that does not exist or holds no image (also a FileNotFoundError, as
  before)."""


def encode_name(name: str) -> np.ndarray:
  data = name.encode()
  if len(data) > NAME_BYTES:
    raise errors.InputError(f"video name longer than {NAME_BYTES} bytes: {name!r}")
  return np.frombuffer(data.ljust(NAME_BYTES, b"\0"), np.uint8)


def decode_names(rows: np.ndarray) -> list[str]:
  return [bytes(row).rstrip(b"\0").decode() for row in np.asarray(rows, np.uint8)]


class TfdsRecords:
  """A split of the TFDS dataset: images and labels by record index."""

  has_labels = True

  def __init__(self, data_source, image_size: int, description: str):
    self._source = data_source
    self._image_size = image_size
    self.description = description

  @property
  def records(self):
    """The split's raw records (TFDS's random-access data source)."""
    return self._source

  def __len__(self) -> int:
    return len(self._source)

  def example(self, position: int) -> dict:
    record = self._source[position]
    # The eval pipeline's own loader: the same pixels as Trainer.evaluate sees.
    example = pipeline.load_example(record, position,
                                          augment.AugmentConfig(), None,
                                          self._image_size)
    video = record["video"]
    example.update(position=np.int32(position), frame=np.int32(record["frame"]),
                   video=encode_name(video.decode() if isinstance(video, bytes)
                                     else str(video)))
    return example

  def padding(self) -> dict:
    example = pipeline.empty_example(self._image_size)
    example.update(position=np.int32(-1), frame=np.int32(-1),
                   video=np.zeros(NAME_BYTES, np.uint8))
    return example

  def image_paths(self, positions: np.ndarray) -> list[str]:
    return [""] * len(positions)

  def record_indices(self, positions: np.ndarray) -> np.ndarray:
    return np.asarray(positions, np.int32)


@dataclasses.dataclass(frozen=True)
class ImageItem:
  video: str
  frame: int
  path: str
  origin: str = ""  # where it was listed (file:line), for messages


class ImageFiles:
  """Face images on disk (cropped_aligned layout), one item per frame."""

  has_labels = False

  def __init__(self, items: Sequence[ImageItem], image_size: int, description: str):
    if not items:
      raise MissingSourceError(f"{description}: no face image to predict")
    self.items = list(items)
    self._image_size = image_size
    self.description = description

  def __len__(self) -> int:
    return len(self.items)

  def example(self, position: int) -> dict:
    item = self.items[position]
    return {"image": load_face_image(item, self._image_size),
            "position": np.int32(position), "frame": np.int32(item.frame),
            "video": encode_name(item.video)}

  def padding(self) -> dict:
    return {"image": np.zeros((self._image_size, self._image_size, 3), np.uint8),
            "position": np.int32(-1), "frame": np.int32(-1),
            "video": np.zeros(NAME_BYTES, np.uint8)}

  def image_paths(self, positions: np.ndarray) -> list[str]:
    return [self.items[p].path for p in positions]

  def record_indices(self, positions: np.ndarray) -> np.ndarray:
    return np.full(len(positions), -1, np.int32)


def load_face_image(item: ImageItem, image_size: int) -> np.ndarray:
  """uint8 [size, size, 3], resized as the eval pipeline resizes; a file that does not
  decode is an InputError naming it (and the list line that named it)."""
  try:
    with open(item.path, "rb") as f:
      image = records.decode_jpeg(f.read())
  except (OSError, ValueError) as error:
    where = f" (listed at {item.origin})" if item.origin else ""
    raise errors.InputError(f"{item.path}{where}: cannot read the image: "
                            f"{error}") from None
  return augment.augment_image(image, None, augment.AugmentConfig(),
                                      image_size)


def folder_items(path: str) -> list[ImageItem]:
  """`PATH/<video>/<frame>.jpg` (or `PATH/<frame>.jpg`: one video named after PATH)."""
  if not os.path.isdir(path):
    raise MissingSourceError(f"--source folder:{path}: the folder does not exist")
  has_own_frames = any(_frame_of(name) is not None for name in os.listdir(path))
  if has_own_frames:
    videos = {os.path.basename(os.path.normpath(path)): path}
  else:
    videos = {e.name: e.path for e in os.scandir(path) if e.is_dir()}
  items = []
  for video, folder in sorted(videos.items()):
    for name in os.listdir(folder):
      frame = _frame_of(name)
      if frame is not None:
        items.append(ImageItem(video, frame, os.path.join(folder, name)))
  if not items:
    raise MissingSourceError(f"--source folder:{path}: no '<video>/<frame "
                             "number>.jpg' image found")
  return sorted(items, key=lambda item: (item.video, item.frame))


def _frame_of(name: str) -> int | None:
  stem, ext = os.path.splitext(name)
  return int(stem) if ext.lower() in (".jpg", ".jpeg") and stem.isdigit() else None


def list_items(entries: Sequence[submission.TestEntry], image_roots: Sequence[str],
               list_path: str) -> tuple[list[ImageItem], dict[str, list[int]]]:
  """Face images of a test list's entries (each once) and the face frames of each
  listed video. Listed images without a file are left out (their submission lines
  are filled from neighbouring frames); a listed video without a folder is an error."""
  if not image_roots:
    raise errors.InputError("--source list:... needs --image_root (the cropped_aligned "
                            "folders the list's images are in)")
  index = release.ImageIndex(list(image_roots))
  items, seen = [], set()
  face_frames: dict[str, list[int]] = {}
  for entry in entries:
    if not index.has_video(entry.video):
      raise annotations.AnnotationError(
          list_path, entry.line_number, f"video {entry.video!r} has no folder in "
          f"{', '.join(image_roots)}")
    frames = index.frames(entry.video)
    face_frames[entry.video] = sorted(frames)
    wanted = [entry.frame] if entry.frame is not None else sorted(frames)
    for frame in wanted:
      if frame in frames and (entry.video, frame) not in seen:
        seen.add((entry.video, frame))
        items.append(ImageItem(entry.video, frame, frames[frame],
                               f"{list_path}:{entry.line_number}"))
  return items, face_frames


@dataclasses.dataclass
class OpenedSource:
  data: Any  # TfdsRecords or ImageFiles
  entries: list | None = None  # test list entries (list sources)
  face_frames: dict | None = None  # listed video -> frames with a face image


def open_source(spec: str, config, image_roots: Sequence[str] = ()) -> OpenedSource:
  """`tfds:SPLIT`, `folder:PATH` or `list:PATH` (see the module docstring)."""
  kind, _, value = spec.partition(":")
  size = config.input.image_size
  if kind == "tfds" and value:
    data = records.open_data_source(config.dataset.name, value,
                                           config.dataset.data_dir)
    return OpenedSource(TfdsRecords(data, size, f"{config.dataset.name} {value}"))
  if kind == "folder" and value:
    return OpenedSource(ImageFiles(folder_items(value), size, value))
  if kind == "list" and value:
    if not os.path.isfile(value):
      raise MissingSourceError(f"--source list:{value}: no such file")
    entries = submission.read_test_list(value)
    items, face_frames = list_items(entries, image_roots, value)
    return OpenedSource(ImageFiles(items, size, value), entries, face_frames)
  raise errors.InputError(f"--source {spec!r}: expected tfds:SPLIT, folder:PATH or "
                          "list:PATH")


class LoadPosition(grain.transforms.Map):
  """position -> example; -1 -> a padding example (dropped from the results)."""

  def __init__(self, data):
    self._data = data

  def map(self, position):
    return self._data.padding() if position < 0 else self._data.example(position)


def prediction_dataset(data, local_batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  """This process's strided share of the positions, padded to the same number of
  whole batches on every process."""
  positions = list(range(process_index, len(data), process_count))
  batches = pipeline.eval_num_batches(len(data), local_batch_size, process_count)
  positions += [-1] * (batches * local_batch_size - len(positions))
  return grain.MapDataset.source(positions).map(LoadPosition(data)).batch(
      local_batch_size, drop_remainder=True)


