"""Windows of T consecutive frames over the videos of an embedding store, and the grain
datasets of training and evaluation batches made of them.

Video of n frames, window length T, stride S (1 <= S <= T): window k starts at frame
k S - (T - S) // 2 (k = 0 .. ceil(n / S) - 1) and scores its frames k S .. k S + S - 1,
the S frames in its middle. Frames before 0 or after n - 1 are padding: a copy of the
first / last frame ("edge") or zeros ("zeros"), with every label mask 0. So every frame
of a video is scored by exactly one window, with (T - S) / 2 frames of context on each
side wherever the video has them. Training windows score every real frame they hold.
"""
from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

from affect_jax.data import pipeline
from affect_jax.errors import InputError
from affect_jax.temporal.store import LABEL_FIELDS, EmbeddingStore

PADDING_MODES = ("edge", "zeros")


@dataclasses.dataclass(frozen=True)
class WindowSettings:
  length: int
  stride: int
  padding: str = "edge"
  score_centre_only: bool = True  # False: every real frame scores (training)

  def __post_init__(self):
    if not 1 <= self.stride <= self.length:
      raise InputError(f"window stride {self.stride} must be in 1..window length "
                       f"{self.length} (config window.*)")
    if self.padding not in PADDING_MODES:
      raise InputError(f"window.padding={self.padding!r}; expected one of "
                       f"{PADDING_MODES}")

  @property
  def lead(self) -> int:
    """Frames of context before the scored ones."""
    return (self.length - self.stride) // 2


def window_starts(num_frames: int, settings: WindowSettings) -> np.ndarray:
  count = math.ceil(num_frames / settings.stride)
  return np.arange(count, dtype=np.int64) * settings.stride - settings.lead


def window_table(frame_counts, settings: WindowSettings) -> np.ndarray:
  """[W, 2] int64: (video number, first frame) of every window of every video."""
  parts = [np.stack([np.full(len(s), v), s], 1) for v, n in enumerate(frame_counts)
           for s in [window_starts(int(n), settings)]]
  return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def scored_positions(start: int, num_frames: int, settings: WindowSettings
                     ) -> np.ndarray:
  """[T] bool: which positions of the window starting at `start` it scores."""
  frames = start + np.arange(settings.length)
  real = (frames >= 0) & (frames < num_frames)
  if not settings.score_centre_only:
    return real
  offset = np.arange(settings.length)
  return real & (offset >= settings.lead) & (offset < settings.lead + settings.stride)


def assemble_window(rows: np.ndarray, start: int, num_frames: int,
                    settings: WindowSettings) -> dict:
  """One window from the rows of its real frames (`rows`: the video's frames
  max(start, 0) .. min(start + T, n) - 1): the embeddings [T, D], labels whose masks
  are 0 wherever the window does not score, `scored` [T] and `position` [T] (the
  frame's position in its video, -1 for padding)."""
  frames = start + np.arange(settings.length)
  real = (frames >= 0) & (frames < num_frames)
  taken = np.clip(frames, 0, num_frames - 1) - max(start, 0)
  window = {key: rows[key][taken] for key in ("embedding",) + LABEL_FIELDS}
  if settings.padding == "zeros":
    window["embedding"] = np.where(real[:, None], window["embedding"], 0.0)
  scored = scored_positions(start, num_frames, settings)
  for key in ("expression_mask", "va_mask"):
    window[key] = np.where(scored, window[key], 0.0).astype(np.float32)
  window["au_mask"] = np.where(scored[:, None], window["au_mask"], 0.0).astype(
      np.float32)
  window["scored"] = scored.astype(np.float32)
  window["position"] = np.where(real, frames, -1).astype(np.int32)
  return window


def empty_window(embedding_dim: int, settings: WindowSettings, dtype) -> dict:
  """A padding window: nothing scored, every mask 0."""
  rows = np.zeros((1,), dtype)
  window = assemble_window(rows, 0, 1, settings)
  window["embedding"] = np.zeros((settings.length, embedding_dim), np.float32)
  for key in ("scored", "expression_mask", "va_mask", "au_mask"):
    window[key] = np.zeros_like(window[key])
  window["position"] = np.full(settings.length, -1, np.int32)
  return window


class LoadWindows(grain.transforms.Map):
  """Window numbers of a batch (-1: a padding window) -> the stacked batch, with
  `window` (its number) and `video` (its video number, -1 for padding)."""

  def __init__(self, store: EmbeddingStore, table: np.ndarray, settings: WindowSettings):
    self._store = store
    self._table = table
    self._settings = settings

  def load(self, number: int) -> dict:
    if number < 0:
      window = empty_window(self._store.embedding_dim, self._settings, self._store.dtype)
      window.update(window=np.int32(-1), video=np.int32(-1))
      return window
    video, start = (int(x) for x in self._table[number])
    count = int(self._store.frame_counts[video])
    rows = self._store.video_rows(video, start, start + self._settings.length)
    window = assemble_window(rows, start, count, self._settings)
    window.update(window=np.int32(number), video=np.int32(video))
    return window

  def map(self, element):
    numbers = element[1] if isinstance(element, tuple) else element
    windows = [self.load(int(n)) for n in numbers]
    return {key: np.stack([w[key] for w in windows]) for key in windows[0]}


def train_dataset(store: EmbeddingStore, settings: WindowSettings, *,
                  global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Endless, reshuffled each epoch: this process's rows of every global batch of
  windows (the frame model's global order: one run whatever the process count)."""
  table = window_table(store.frame_counts, settings)
  if len(table) < global_batch_size:
    raise InputError(f"{store.folder}: {len(table)} training windows, fewer than one "
                     f"batch of {global_batch_size} (config input.batch_size)")
  if global_batch_size % process_count:
    raise InputError(f"batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  order = grain.MapDataset.range(len(table)).seed(seed).shuffle().repeat(None)
  local = global_batch_size // process_count
  ds = pipeline.ProcessShareOfGlobalBatches(order, global_batch_size, local,
                                            process_index)
  return ds.batch(local, drop_remainder=True).map(LoadWindows(store, table, settings))


def eval_dataset(store: EmbeddingStore, settings: WindowSettings, *,
                 local_batch_size: int, process_index: int = 0, process_count: int = 1
                 ) -> tuple[grain.MapDataset, int]:
  """Every window once, in order, padded to equal whole batches; (dataset, batches)."""
  table = window_table(store.frame_counts, settings)
  numbers = list(range(process_index, len(table), process_count))
  batches = pipeline.eval_num_batches(len(table), local_batch_size, process_count)
  numbers += [-1] * (batches * local_batch_size - len(numbers))
  ds = grain.MapDataset.source(numbers).batch(local_batch_size, drop_remainder=True)
  return ds.map(LoadWindows(store, table, settings)), batches
