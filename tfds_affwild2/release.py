"""Reads an ABAW release into per-frame examples, one split at a time, streaming.

A frame's labels are the union of what each task's file says of it, each task with its
own validity (mask). Frames are visited video by video, so memory holds one video's
labels at a time whatever the size of the release. The irregularities known in the real
data (absent face images, extra annotation lines, disregard markers) are counted in a
`SplitSummary`; malformed files raise `AnnotationError` naming the file and line.

Splits, by name:
- `train`, `validation`: the per-task `Train_Set`/`Training_Set` and `Validation_Set`
  folders merged per frame (or the MTL files, for the `mtl` config). A video annotated
  in both folders of one task is refused, naming it (`check_split_overlap`); a video in
  the train folder of one task and the validation folder of another is counted and
  reported (`SplitOverlap`), not refused, as the per-challenge splits of a release may
  do this.
- `test`: every frame that any test list names (every `*test_set*` file: lists of
  video names, which name all of a video's face frames, and sample files listing
  `<video>/<frame>.jpg`), each (video, frame) once however many lists name it. The
  split holds no labels and does not record which list named a frame: a submission for
  one challenge reads that challenge's list itself; the summary counts, per list, the
  entries and listed frames (`test_lists`).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

import tfds_affwild2.annotations as annotations
from tfds_affwild2.annotations import TASKS, AnnotationError, FrameLabel
from tfds_affwild2.errors import MissingReleasePartError, ReleaseError
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
  # Frames with a 0/1 value per AU: the AUs the split annotates are those above 0.
  au_labelled_counts: list = dataclasses.field(
      default_factory=lambda: [0] * len(annotations.AU_NAMES))
  # AUs outside the 12 (ABAW1's AU20): annotation lines whose 0/1 value was dropped.
  dropped_au_labels: dict = dataclasses.field(default_factory=dict)
  test_lists: dict = dataclasses.field(default_factory=dict)  # list -> counts (test)
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
        self.au_labelled_counts = [
            c + int(v >= 0) for c, v in zip(self.au_labelled_counts, label.value)]

  def annotated_aus(self) -> list[str]:
    return [name for name, count in zip(annotations.AU_NAMES, self.au_labelled_counts)
            if count]

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class ImageIndex:
  """Finds `<video>/<frame>.jpg` over several image roots (ABAW6 uses two). Two files
  of one frame (`1.jpg` and `00001.jpg`) are an error, never a silent pick."""

  def __init__(self, image_roots: Sequence[str]):
    if not image_roots:
      raise MissingReleasePartError("the release has no image folder (cropped_aligned*)")
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
      for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".jpg" and stem.isdigit():
          if int(stem) > annotations.MAX_FRAME_NUMBER:
            raise ReleaseError(f"{folder}/{name}: frame number beyond any video's (at "
                               f"most {annotations.MAX_FRAME_NUMBER})")
          if int(stem) in frames:  # `1.jpg` and `00001.jpg`: which is the frame?
            raise ReleaseError(
                f"{folder}: {os.path.basename(frames[int(stem)])} and {name} are both "
                f"frame {int(stem)}; keep one of them")
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
    per_task = {}
    for task, path in files.items():
      task_file = annotations.read_task_file_in_full(path, task)
      per_task[task] = task_file.labels
      for name, count in task_file.dropped_au_labels.items():
        summary.dropped_au_labels[name] = summary.dropped_au_labels.get(name, 0) + count
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
  for name, count in summary.dropped_au_labels.items():
    log.info("%s split: dropped %d %s labels (not among the 12 AUs)", split, count, name)


def iter_mtl_examples(layout: ReleaseLayout, split: str, summary: SplitSummary,
                      index: ImageIndex) -> Iterator[Example]:
  """Rows of the s-Aff-Wild2 MTL file of one split."""
  path = layout.mtl_files.get(split)
  if path is None:
    raise MissingReleasePartError(
        f"the release has no MTL annotation file for split {split}")
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


class FrameSet:
  """(video, frame) pairs seen so far, a bit per frame: the test lists of a real release
  name over a million frames, which a set of tuples would hold in ~100 MB."""

  def __init__(self):
    self._bits: dict[str, bytearray] = {}

  def add(self, video: str, frame: int) -> bool:
    """Adds the frame; False if it was already there."""
    bits = self._bits.setdefault(video, bytearray())
    byte, bit = divmod(frame, 8)
    if byte >= len(bits):
      bits.extend(bytes(byte + 1 - len(bits)))
    if bits[byte] >> bit & 1:
      return False
    bits[byte] |= 1 << bit
    return True

  def videos(self) -> int:
    return len(self._bits)


TEST_LIST_HEADERS = ("image", "image_location", "video", "name")


def _test_list_entries(list_path: str) -> Iterator[tuple[int, str]]:
  """(line number, first field) of each entry of a test list; headers and blank lines
  skipped."""
  for line_number, line in enumerate(annotations.iter_file_lines(list_path), start=1):
    entry = line.strip().split(",")[0].strip()
    if entry and entry.lower() not in TEST_LIST_HEADERS:
      yield line_number, entry


def _listed_frames(list_path: str, line_number: int, entry: str,
                   index: ImageIndex) -> dict[int, str | None]:
  """Frame -> image path (None: no face image) of one test-list entry: a video name
  (all its face frames) or one `<video>/<frame>.jpg`."""
  if "/" in entry or "\\" in entry:
    video, name = annotations.check_relative_image_path(list_path, line_number, entry)
    frame = annotations.frame_number(list_path, line_number, name)
    return {frame: index.frames(video).get(frame)}
  if not index.has_video(entry):
    raise AnnotationError(list_path, line_number,
                          f"test video {annotations.quoted(entry)} has no image folder")
  return dict(sorted(index.frames(entry).items()))


def iter_test_examples(layout: ReleaseLayout, summary: SplitSummary,
                       index: ImageIndex) -> Iterator[Example]:
  """Images named by the test lists (video names or image paths), each frame once
  however many lists name it (see the module docstring)."""
  no_labels = dict.fromkeys(TASKS, NO_LABEL)
  seen = FrameSet()
  summary.skipped.setdefault("listed_again", 0)
  for list_path in layout.test_lists:
    counts = {"entries": 0, "frames": 0, "first_listed_here": 0}
    summary.test_lists[os.path.relpath(list_path, layout.root)] = counts
    for line_number, entry in _test_list_entries(list_path):
      counts["entries"] += 1
      video = entry.replace("\\", "/").split("/")[0]
      for frame, image_path in _listed_frames(list_path, line_number, entry,
                                              index).items():
        counts["frames"] += 1
        if not seen.add(video, frame):
          summary.skipped["listed_again"] += 1
          continue
        counts["first_listed_here"] += 1
        if image_path is None:
          summary.skipped["image_absent"] += 1
          continue
        summary.frames += 1
        yield Example(video, frame, image_path, dict(no_labels),
                      f"{list_path}:{line_number}")
  summary.videos = seen.videos()


@dataclasses.dataclass(frozen=True)
class SplitOverlap:
  """A video annotated in the training split of some tasks and the validation split of
  others: its frames are in both splits of the dataset."""
  video: str
  train_tasks: tuple
  validation_tasks: tuple

  def describe(self) -> str:
    return (f"{self.video} (train: {','.join(self.train_tasks)}; validation: "
            f"{','.join(self.validation_tasks)})")


def check_split_overlap(layout: ReleaseLayout) -> list[SplitOverlap]:
  """Refuses a video annotated in both the train and the validation folder of one task
  (a leak no release makes); returns the videos in the train split of one task and the
  validation split of another (counted and reported: see the module docstring)."""
  splits_of: dict[str, dict[str, list]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for task, dirs in sorted(layout.task_split_dirs.items()):
    for split in ("train", "validation"):
      folder = dirs.get(split)
      for name in sorted(os.listdir(folder)) if folder else ():
        if name.endswith(".txt"):
          splits_of[name[:-4]][split].append(task)
  overlaps = []
  for video, splits in sorted(splits_of.items()):
    both = sorted(set(splits["train"]) & set(splits["validation"]))
    if both:
      task = both[0]
      raise ReleaseError(
          f"video {video} is annotated in both the train and the validation split of "
          f"{task.upper()}: {layout.task_split_dirs[task]['train']}/{video}.txt and "
          f"{layout.task_split_dirs[task]['validation']}/{video}.txt; a validation "
          "score would measure frames the model trained on: remove one of them")
    if splits["train"] and splits["validation"]:
      overlaps.append(SplitOverlap(video, tuple(splits["train"]),
                                   tuple(splits["validation"])))
  return overlaps


def _mtl_videos(path: str) -> set[str]:
  videos = set()
  for line in itertools.islice(annotations.iter_file_lines(path), 1, None):
    image = line.split(",", 1)[0].strip().replace("\\", "/")
    if "/" in image:
      videos.add(image.split("/", 1)[0])
  return videos


def check_mtl_split_overlap(layout: ReleaseLayout) -> list[SplitOverlap]:
  """The videos with rows in both MTL files (train and validation): counted and
  reported, as for per-task files of different tasks."""
  if not {"train", "validation"} <= set(layout.mtl_files):
    return []
  both = _mtl_videos(layout.mtl_files["train"]) & _mtl_videos(
      layout.mtl_files["validation"])
  return [SplitOverlap(video, ("mtl",), ("mtl",)) for video in sorted(both)]


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
