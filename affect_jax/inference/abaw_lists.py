"""ABAW test lists and frame counts: what a submission must cover.

A test list names whole videos (`video`) or single images (`video/00001.jpg`); a
per-image submission has a line for every listed image and every face image of every
listed video, a per-video one a line for every frame of every listed video.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping, Sequence

from tfds_affwild2 import annotations
from tfds_affwild2.annotations import AnnotationError

# Header words of test lists (they are skipped, as the TFDS builder does).
LIST_HEADER_WORDS = ("image", "image_location", "video", "name")


@dataclasses.dataclass(frozen=True)
class TestEntry:
  """One line of a test list: a whole video (frame None) or one image."""
  line_number: int
  video: str
  frame: int | None = None
  image_name: str | None = None  # as listed, e.g. "00001.jpg"


def read_test_list(path) -> list[TestEntry]:
  """Lines are video names or `video/frame.jpg` (first comma field); headers and
  blank lines are skipped. Bad lines raise AnnotationError naming file and line."""
  entries = []
  with open(path, encoding="utf-8-sig") as f:
    for line_number, line in enumerate(f, start=1):
      entry = line.strip().split(",")[0].strip()
      if not entry or entry.lower() in LIST_HEADER_WORDS:
        continue
      if "/" in entry or "\\" in entry:
        video, name = annotations.check_relative_image_path(path, line_number, entry)
        frame = annotations.frame_number(path, line_number, name)
        entries.append(TestEntry(line_number, video, frame, name))
      else:
        entries.append(TestEntry(line_number, entry))
  if not entries:
    raise AnnotationError(path, 1, "the test list names no video and no image")
  return entries


def read_frame_counts(path) -> dict[str, int]:
  """Frames per video (of the video file, not only face images): a JSON object or
  `video,frames` CSV lines (a header line is skipped)."""
  if str(path).endswith(".json"):
    with open(path) as f:
      return {str(k): int(v) for k, v in json.load(f).items()}
  counts = {}
  with open(path, encoding="utf-8-sig") as f:
    for line_number, line in enumerate(f, start=1):
      fields = [x.strip() for x in line.split(",")]
      if not line.strip() or (line_number == 1 and not fields[-1].isdigit()):
        continue
      if len(fields) != 2 or not fields[1].isdigit():
        raise AnnotationError(path, line_number, f"expected 'video,frames', got "
                              f"{line.strip()!r}")
      counts[fields[0]] = int(fields[1])
  return counts


def listed_images(entries: Iterable[TestEntry],
                  face_frames: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
  """(video, frame) of every image a per-image submission must have, in list order:
  listed images as they are, listed videos as all their face images."""
  images = []
  for entry in entries:
    if entry.frame is not None:
      images.append((entry.video, entry.frame))
    else:
      images.extend((entry.video, f) for f in sorted(face_frames.get(entry.video, ())))
  return images


def video_lengths(entries: Iterable[TestEntry], face_frames: Mapping[str, Sequence[int]],
                  frame_counts: Mapping[str, int] | None = None) -> dict[str, int]:
  """Frames each per-video file must have: the video's frame count when known, else
  its last frame with a face image (or the last listed frame)."""
  lengths: dict[str, int] = {}
  for entry in entries:
    last = max([*face_frames.get(entry.video, ()), entry.frame or 0])
    lengths[entry.video] = max(lengths.get(entry.video, 0), last)
  if frame_counts:
    lengths.update({v: frame_counts[v] for v in lengths if v in frame_counts})
  return lengths


def face_frames_of(entries: Sequence[TestEntry],
                   image_roots: Sequence[str]) -> dict[str, list[int]]:
  """Frames with a face image of each listed video, found in the image roots."""
  videos = sorted({e.video for e in entries})
  if not image_roots:
    if any(e.frame is None for e in entries):
      raise ValueError("the test list names whole videos: give the image roots "
                       "(cropped_aligned folders) to know their frames")
    return {}
  from tfds_affwild2 import release  # pylint: disable=g-import-not-at-top
  index = release.ImageIndex(list(image_roots))
  return {video: sorted(index.frames(video)) for video in videos}
