"""The embedding store: per-frame backbone features of one split, with each frame's
labels and masks, as one ArrayRecord file of fixed-size rows sorted by (video, frame)
and an `index.json` naming each video's first row and frame count.

A row is one frame (`row_dtype`: frame number, labels, masks, embedding), so a window of
T consecutive frames of a video is one range read; nothing holds a split in memory. The
index is written last, atomically: a folder with an index is a complete store.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from array_record.python import array_record_module

from affect_jax.errors import InputError
from affect_jax.vocabulary import NUM_AUS, NUM_VA

FRAMES_FILE = "frames.array_record"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
# Windows are read as ranges of neighbouring rows: small uncompressed groups keep a
# range read to the rows it needs (float features barely compress anyway).
WRITER_OPTIONS = "group_size:16,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0"
LABEL_FIELDS = ("expression", "expression_mask", "au", "au_mask", "valence_arousal",
                "va_mask")


def row_dtype(embedding_dim: int) -> np.dtype:
  """One frame's row: its frame number and position in the source it was computed from
  (a TFDS record index, an image's place in a list), the frame model's label keys, the
  embedding."""
  return np.dtype([("frame", "<i4"), ("source_index", "<i4"), ("expression", "<i4"), ("expression_mask", "<f4"),
                   ("au", "<f4", (NUM_AUS,)), ("au_mask", "<f4", (NUM_AUS,)),
                   ("valence_arousal", "<f4", (NUM_VA,)), ("va_mask", "<f4"),
                   ("embedding", "<f4", (embedding_dim,))])


def label_statistics(rows: np.ndarray) -> dict:
  """Label counts in the form of the dataset summary (what weighted losses read)."""
  expression = rows["expression"][rows["expression_mask"] > 0]
  au_labelled = np.all(rows["au_mask"] > 0, axis=1)
  return {"expr_class_counts": np.bincount(expression, minlength=1).tolist(),
          "au_positive_counts": (rows["au"][au_labelled] > 0.5).sum(0).tolist(),
          "labelled": {"expr": int(expression.size), "au": int(au_labelled.sum()),
                       "va": int((rows["va_mask"] > 0).sum())}}


def _merge_statistics(total: dict, part: dict) -> dict:
  if not total:
    return part
  width = max(len(total["expr_class_counts"]), len(part["expr_class_counts"]))
  pad = lambda counts: np.pad(counts, (0, width - len(counts)))  # noqa: E731
  return {"expr_class_counts": (pad(total["expr_class_counts"])
                                + pad(part["expr_class_counts"])).tolist(),
          "au_positive_counts": (np.add(total["au_positive_counts"],
                                        part["au_positive_counts"])).tolist(),
          "labelled": {k: total["labelled"][k] + part["labelled"][k]
                       for k in total["labelled"]}}


class StoreWriter:
  """Writes rows in (video, frame) order, video after video; `close` writes the index.

  Rows arrive in chunks of any size; a chunk may end in the middle of a video. A video
  that comes back after another one, or frames out of order, are a ValueError: the
  index could not describe them.
  """

  def __init__(self, folder: str, embedding_dim: int, metadata: dict):
    os.makedirs(folder, exist_ok=True)
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
      os.remove(index_path)  # the store is incomplete until the new index is written
    self.folder = folder
    self.dtype = row_dtype(embedding_dim)
    self._metadata = dict(metadata, embedding_dim=embedding_dim)
    self._writer = array_record_module.ArrayRecordWriter(
        os.path.join(folder, FRAMES_FILE), WRITER_OPTIONS)
    self._videos: list[list] = []  # [name, first row, frames]
    self._last_frame = None
    self._rows = 0
    self._statistics: dict = {}

  def add(self, videos, rows: np.ndarray) -> None:
    """`videos`: the video name of each row; `rows`: a `row_dtype` array."""
    for name, row in zip(videos, rows):
      if not self._videos or self._videos[-1][0] != name:
        if any(v[0] == name for v in self._videos):
          raise ValueError(f"video {name!r} is not contiguous in the rows written")
        self._videos.append([name, self._rows, 0])
        self._last_frame = None
      frame = int(row["frame"])
      if self._last_frame is not None and frame <= self._last_frame:
        raise ValueError(f"video {name!r}: frame {frame} after frame {self._last_frame}")
      self._last_frame = frame
      self._writer.write(row.tobytes())
      self._videos[-1][2] += 1
      self._rows += 1
    self._statistics = _merge_statistics(self._statistics, label_statistics(rows))

  def close(self) -> "EmbeddingStore":
    self._writer.close()
    index = dict(self._metadata, format=FORMAT_VERSION, frames=self._rows,
                 videos=self._videos, label_statistics=self._statistics)
    path = os.path.join(self.folder, INDEX_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(index, f)
    os.replace(path + ".tmp", path)
    return EmbeddingStore(self.folder)


@dataclasses.dataclass
class EmbeddingStore:
  """A written store, read by ranges of rows (the file opened on first read, so a
  store can travel to grain's worker processes)."""
  folder: str

  def __post_init__(self):
    path = os.path.join(self.folder, INDEX_FILE)
    if not os.path.exists(path):
      raise InputError(f"{self.folder} holds no complete embedding store (no "
                       f"{INDEX_FILE}): compute it with affect-jax temporal")
    with open(path) as f:
      self.index = json.load(f)
    if self.index.get("format") != FORMAT_VERSION:
      raise InputError(f"{path}: embedding store format {self.index.get('format')}, "
                       f"this version reads {FORMAT_VERSION}: compute it again")
    self.dtype = row_dtype(self.index["embedding_dim"])
    self.video_names = [v[0] for v in self.index["videos"]]
    self.first_rows = np.array([v[1] for v in self.index["videos"]], np.int64)
    self.frame_counts = np.array([v[2] for v in self.index["videos"]], np.int64)
    self._reader = None

  def __getstate__(self):
    return {"folder": self.folder}

  def __setstate__(self, state):
    self.folder = state["folder"]
    self.__post_init__()

  @property
  def embedding_dim(self) -> int:
    return int(self.index["embedding_dim"])

  @property
  def label_statistics(self) -> dict:
    return self.index["label_statistics"]

  def __len__(self) -> int:
    return int(self.index["frames"])

  def rows(self, first: int, count: int) -> np.ndarray:
    """`count` rows from row `first` (a `row_dtype` array)."""
    if count <= 0:
      return np.zeros((0,), self.dtype)
    if self._reader is None:
      self._reader = array_record_module.ArrayRecordReader(
          os.path.join(self.folder, FRAMES_FILE), READER_OPTIONS)
    return np.frombuffer(b"".join(self._reader.read(first, first + count)), self.dtype)

  def video_rows(self, video: int, start: int = 0, stop: int | None = None
                 ) -> np.ndarray:
    """Frames [start, stop) of video number `video` (positions within the video)."""
    count = int(self.frame_counts[video])
    stop = count if stop is None else min(stop, count)
    start = max(start, 0)
    return self.rows(int(self.first_rows[video]) + start, stop - start)
