"""Reads an ABAW release into per-frame examples, one split at a time, streaming.

A frame's labels are the union of what each task's file says of it, each task with its
own validity (mask). Frames are visited video by video, so memory holds one video's
labels at a time whatever the size of the release. The irregularities known in the real
data (absent face images, extra annotation lines, disregard markers) are counted in a
`SplitSummary`; malformed files raise `AnnotationError` naming the file and line.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from tfds_affwild2 import annotations
from tfds_affwild2.annotations import TASKS, AnnotationError, FrameLabel
from tfds_affwild2.layout import ReleaseLayout

log = logging.getLogger(__name__)
IMAGE_SIZE = annotations.IMAGE_SIZE
NO_LABEL = FrameLabel(False, None)


@dataclasses.dataclass
class Example:
  """One face frame with whatever labels the release gives it."""
  video: str
  frame: int
  image_path: str
  labels: dict  # task -> FrameLabel
  source: str  # the annotation file (and line) that listed the frame, for messages


@dataclasses.dataclass
class SplitSummary:
  """Counts gathered while reading one split; stored in the dataset's metadata."""
  num_expr_classes: int
  videos: int = 0
  frames: int = 0
  labelled: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(TASKS, 0))
  invalid_labels: dict = dataclasses.field(
      default_factory=lambda: dict.fromkeys(TASKS, 0))
  expr_class_counts: list = dataclasses.field(default_factory=list)
  au_positive_counts: list = dataclasses.field(
      default_factory=lambda: [0] * len(annotations.AU_NAMES))
  skipped: dict = dataclasses.field(default_factory=lambda: {
      "image_absent": 0, "no_valid_label": 0, "expr_class_outside_config": 0})

  def __post_init__(self):
    if not self.expr_class_counts:
      self.expr_class_counts = [0] * self.num_expr_classes

  def count_example(self, labels: dict) -> None:
    self.frames += 1
    for task, label in labels.items():
      if not label.valid:
        continue
      self.labelled[task] += 1
      if task == "expr":
        self.expr_class_counts[label.value] += 1
      elif task == "au":
        self.au_positive_counts = [
            c + int(v == 1) for c, v in zip(self.au_positive_counts, label.value)]

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class ImageIndex:
  """Finds `<video>/<frame>.jpg` over several image roots (ABAW6 uses two)."""

  def __init__(self, image_roots: Sequence[str]):
    if not image_roots:
      raise FileNotFoundError("the release has no image folder (cropped_aligned*)")
    self._video_folders: dict[str, str] = {}
    for root in image_roots:
      for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
          self._video_folders.setdefault(entry.name, entry.path)
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def has_video(self, video: str) -> bool:
    return video in self._video_folders

  def frames(self, video: str) -> dict[int, str]:
    """Frame number -> image path for one video (a few recent videos are cached)."""
    if video in self._cache:
      self._cache.move_to_end(video)
      return self._cache[video]
    folder = self._video_folders.get(video)
    frames = {}
    if folder is not None:
      for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".jpg" and stem.isdigit():
          frames[int(stem)] = os.path.join(folder, name)
    self._cache[video] = frames
    if len(self._cache) > 8:
      self._cache.popitem(last=False)
    return frames


def _task_files_by_video(layout: ReleaseLayout, split: str,
                         tasks: Sequence[str]) -> dict[str, dict[str, str]]:
  """video -> task -> annotation file, for the per-task folders of one split."""
  by_video: dict[str, dict[str, str]] = collections.defaultdict(dict)
  for task in tasks:
    folder = layout.task_split_dirs.get(task, {}).get(split)
    if folder is None:
      continue
    for name in sorted(os.listdir(folder)):
      if name.endswith(".txt"):
        by_video[name[:-4]][task] = os.path.join(folder, name)
  return dict(sorted(by_video.items()))


def _restrict_expression(label: FrameLabel, num_expr_classes: int,
                         summary: SplitSummary) -> FrameLabel:
  """An 8-class file read into a 7-class (ABAW2) dataset: 'Other' is masked out."""
  if label.valid and label.value >= num_expr_classes:
    summary.skipped["expr_class_outside_config"] += 1
    return NO_LABEL
  return label


def _emit_or_skip(example: Example, summary: SplitSummary) -> bool:
  for task, label in example.labels.items():
    if not label.valid:
      summary.invalid_labels[task] += 1
  if not any(label.valid for label in example.labels.values()):
    summary.skipped["no_valid_label"] += 1
    return False
  summary.count_example(example.labels)
  return True


def iter_per_task_examples(layout: ReleaseLayout, split: str, summary: SplitSummary,
                           index: ImageIndex, tasks: Sequence[str] = TASKS
                           ) -> Iterator[Example]:
  """Merges the per-task files of one split frame by frame (the per-task union)."""
  for video, files in _task_files_by_video(layout, split, tasks).items():
    summary.videos += 1
    per_task = {task: annotations.read_task_file(path, task)[0]
                for task, path in files.items()}
    if not index.has_video(video):
      log.warning("%s: no image folder for video %s in any image root",
                  next(iter(files.values())), video)
    images = index.frames(video)
    last_frame = max(len(labels) for labels in per_task.values())
    for frame in range(1, last_frame + 1):
      labels = {task: per_task[task][frame - 1] if frame <= len(per_task[task])
                else NO_LABEL for task in per_task}
      if frame not in images:
        summary.skipped["image_absent"] += 1
        continue
      if "expr" in labels:
        labels["expr"] = _restrict_expression(labels["expr"], summary.num_expr_classes,
                                              summary)
      source = f"{next(iter(files.values()))}:{frame + 1}"
      example = Example(video, frame, images[frame], labels, source)
      if _emit_or_skip(example, summary):
        yield example
  for key in ("image_absent", "no_valid_label", "expr_class_outside_config"):
    if summary.skipped[key]:
      log.info("%s split: skipped %d frames (%s)", split, summary.skipped[key], key)


def iter_mtl_examples(layout: ReleaseLayout, split: str, summary: SplitSummary,
                      index: ImageIndex) -> Iterator[Example]:
  """Rows of the s-Aff-Wild2 MTL file of one split."""
  path = layout.mtl_files.get(split)
  if path is None:
    raise FileNotFoundError(f"the release has no MTL annotation file for split {split}")
  videos = set()
  first_line_of = {}  # (video, frame) -> line: a duplicate row is an error
  for row in annotations.iter_mtl_file(path, num_expr_classes=8):
    key = (row.video, row.frame)
    if key in first_line_of:
      raise AnnotationError(path, row.line_number, f"{row.video}/{row.image_name} is "
                            f"already listed at line {first_line_of[key]}")
    first_line_of[key] = row.line_number
    videos.add(row.video)
    image_path = index.frames(row.video).get(row.frame)
    if image_path is None:
      summary.skipped["image_absent"] += 1
      continue
    labels = dict(row.labels)
    labels["expr"] = _restrict_expression(labels["expr"], summary.num_expr_classes,
                                          summary)
    example = Example(row.video, row.frame, image_path, labels,
                      f"{path}:{row.line_number}")
    if _emit_or_skip(example, summary):
      yield example
  summary.videos = len(videos)


def iter_test_examples(layout: ReleaseLayout, summary: SplitSummary,
                       index: ImageIndex) -> Iterator[Example]:
  """Images named by the test lists: video names (all their frames) or image paths."""
  no_labels = dict.fromkeys(TASKS, NO_LABEL)
  seen_videos = set()
  for list_path in layout.test_lists:
    with open(list_path, encoding="utf-8-sig") as f:
      for line_number, line in enumerate(f, start=1):
        entry = line.strip().split(",")[0].strip()
        if not entry or entry.lower() in ("image", "image_location", "video", "name"):
          continue
        if "/" in entry or "\\" in entry:
          video, name = annotations.check_relative_image_path(list_path, line_number,
                                                              entry)
          frame = annotations.frame_number(list_path, line_number, name)
          frames = {frame: index.frames(video).get(frame)}
        else:
          video = entry
          if not index.has_video(video):
            raise AnnotationError(list_path, line_number,
                                  f"test video {video!r} has no image folder")
          frames = dict(sorted(index.frames(video).items()))
        seen_videos.add(video)
        for frame, image_path in frames.items():
          if image_path is None:
            summary.skipped["image_absent"] += 1
            continue
          summary.frames += 1
          yield Example(video, frame, image_path, dict(no_labels),
                        f"{list_path}:{line_number}")
  summary.videos = len(seen_videos)


def read_checked_jpeg(example: Example, image_size: int = IMAGE_SIZE,
                      fix_mismatched: bool = False) -> bytes:
  """The frame's JPEG bytes, untouched, after checking it decodes to size x size x 3.

  With `fix_mismatched`, an image of another size or mode is converted and re-encoded
  (the only case where bytes change); without it, that is an error naming the file.
  """
  with open(example.image_path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # a full decode: truncated or corrupt files fail here
      fmt, mode, size = image.format, image.mode, image.size
      if fmt == "JPEG" and mode == "RGB" and size == (image_size, image_size):
        return data
      problem = f"{fmt} {mode} {size[0]}x{size[1]}, expected JPEG RGB " \
                f"{image_size}x{image_size}"
      if not fix_mismatched:
        raise ValueError(problem + " (pass --fix_mismatched_images to convert)")
      log.warning("%s: %s; converted", example.image_path, problem)
      fixed = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{example.image_path} (listed at {example.source}): bad image: "
                     f"{e}") from None
  buffer = io.BytesIO()
  fixed.save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def label_arrays(labels: dict) -> dict:
  """The TFDS feature values of one frame's labels (masked entries hold fillers)."""
  expr, au, va = (labels.get(t, NO_LABEL) for t in ("expr", "au", "va"))
  au_values = au.value if au.valid else np.full(len(annotations.AU_NAMES), -1, np.int8)
  return {
      "expression": np.int32(expr.value if expr.valid else -1),
      "expression_mask": bool(expr.valid),
      "au": np.maximum(au_values, 0).astype(np.int8),
      "au_mask": au_values >= 0,
      "valence_arousal": va.value if va.valid else np.zeros(2, np.float32),
      "va_mask": bool(va.valid),
  }
