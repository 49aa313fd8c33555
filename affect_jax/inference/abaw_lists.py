"""ABAW test lists and frame counts: what a submission must cover.

A test list names whole videos (`video`) or single images (`video/00001.jpg`). The
organisers' sample files (`CVPR_6th_ABAW_Expr_test_set_sample.txt`, ...) list every
frame 1..N of each of their videos one by one, frames without a face image included;
other lists name videos only. A submission for a list has a line for every image it
names and for every frame 1..N of every video it names; a per-video file has one line
per frame 1..N of its video.

N of a video is taken from, first to last:
  1. the frame counts given (`--frame_counts`: JSON or `video,frames` CSV),
  2. the video file's frame count (`--video_dir`: the release's videos),
  3. the organisers' lists given that name the video's frames 1..N one by one,
  4. only where no organisers' list is involved (predictions of a folder or a TFDS
     split): the last frame with a face image.
A list that names a video whose N none of these gives is an InputError saying how to
give it, not a submission that silently stops at the last face frame.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping, Sequence

from affect_jax.errors import InputError
from tfds_affwild2 import annotations
from tfds_affwild2.annotations import AnnotationError

# Header words of test lists (they are skipped, as the TFDS builder does).
LIST_HEADER_WORDS = ("image", "image_location", "video", "name")
# Suffixes of the two people of one video: both come from the same video file.
PERSON_SUFFIXES = ("_left", "_right")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
LAST_FACE_FRAME = "last face frame"


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
  if not os.path.isfile(path):
    raise InputError(f"test list {path}: no such file")
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
  if not os.path.isfile(path):
    raise InputError(f"--frame_counts {path}: no such file")
  if str(path).endswith(".json"):
    with open(path) as f:
      try:
        counts = json.load(f)
      except json.JSONDecodeError as error:
        raise InputError(f"{path}: not JSON: {error}") from None
    bad = [k for k, v in counts.items() if not isinstance(v, int) or v < 1]
    if bad:
      raise InputError(f"{path}: the frame count of {bad[0]!r} is not a positive "
                       f"integer: {counts[bad[0]]!r}")
    return {str(k): int(v) for k, v in counts.items()}
  counts = {}
  with open(path, encoding="utf-8-sig") as f:
    for line_number, line in enumerate(f, start=1):
      fields = [x.strip() for x in line.split(",")]
      if not line.strip() or (line_number == 1 and not fields[-1].isdigit()):
        continue
      if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) < 1:
        raise AnnotationError(path, line_number, f"expected 'video,frames', got "
                              f"{line.strip()!r}")
      counts[fields[0]] = int(fields[1])
  return counts


# ----------------------------------------------------------------------------------
# N of each video.
# ----------------------------------------------------------------------------------


def listed_frame_counts(lists: Mapping[str, Sequence[TestEntry]]) -> dict[str, int]:
  """N of each video that a list names frame by frame, 1..N without a gap (as the
  organisers' sample files do): {video: N}. Images named here and there say nothing
  of the video's length and give no N."""
  frames: dict[str, set[int]] = {}
  for entries in lists.values():
    for entry in entries:
      if entry.frame is not None:
        frames.setdefault(entry.video, set()).add(entry.frame)
  return {video: max(listed) for video, listed in frames.items()
          if len(listed) == max(listed)}


def video_file_of(video: str, video_dir: str) -> str | None:
  """The video file a (cropped) video comes from: `<video>.<ext>`, or for one person of
  a two-person video `<video without _left/_right>.<ext>`."""
  names = [video] + [video[:-len(s)] for s in PERSON_SUFFIXES if video.endswith(s)]
  for name in names:
    for extension in VIDEO_EXTENSIONS:
      path = os.path.join(video_dir, name + extension)
      if os.path.isfile(path):
        return path
  return None


def video_file_frame_counts(video_dir: str, videos: Iterable[str]) -> dict[str, int]:
  """Frame counts of the videos' files found in `video_dir` (videos without a file
  are left out)."""
  if not os.path.isdir(video_dir):
    raise InputError(f"--video_dir {video_dir}: no such folder")
  import cv2  # pylint: disable=g-import-not-at-top
  counts = {}
  for video in sorted(set(videos)):
    path = video_file_of(video, video_dir)
    if path is None:
      continue
    capture = cv2.VideoCapture(path)
    try:
      frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
      capture.release()
    if frames < 1:
      raise InputError(f"{path}: cannot read its frame count (not a video OpenCV reads)")
    counts[video] = frames
  return counts


@dataclasses.dataclass(frozen=True)
class FrameCounts:
  """N of each video and where it came from (for the summary and for messages)."""
  counts: dict[str, int]
  origins: dict[str, str]


def resolve_frame_counts(videos: Iterable[str], *, given: Mapping[str, int] | None = None,
                         video_files: Mapping[str, int] | None = None,
                         listed: Mapping[str, int] | None = None,
                         face_frames: Mapping[str, Sequence[int]] | None = None,
                         listed_in: str = "") -> FrameCounts:
  """N of every video (see the module docstring for the order). Without `face_frames`
  a video that no other source counts is an InputError naming it and `listed_in`."""
  sources = (("--frame_counts", given or {}), ("video file", video_files or {}),
             ("organisers' list", listed or {}))
  counts, origins, unknown = {}, {}, []
  for video in dict.fromkeys(videos):
    for origin, known in sources:
      if video in known:
        counts[video], origins[video] = int(known[video]), origin
        break
    else:
      if face_frames is not None and face_frames.get(video):
        counts[video], origins[video] = max(face_frames[video]), LAST_FACE_FRAME
      else:
        unknown.append(video)
  if unknown:
    where = f" ({listed_in})" if listed_in else ""
    raise InputError(
        f"the number of frames of {len(unknown)} listed videos is unknown{where}, e.g. "
        f"{', '.join(unknown[:3])}: a submission has a line for every frame 1..N; give "
        "--frame_counts, --video_dir (the release's videos) or the organisers' sample "
        "list that names their frames")
  return FrameCounts(counts, origins)


def check_counts_cover_faces(frame_counts: FrameCounts,
                             face_frames: Mapping[str, Sequence[int]]) -> None:
  """A face image of a frame beyond N means N is wrong (a frame count of another cut
  of the video, a list that stops early): an InputError naming the video."""
  for video, n in frame_counts.counts.items():
    last = max(face_frames.get(video) or [0])
    if last > n:
      raise InputError(f"video {video} has a face image of frame {last}, beyond its "
                       f"N={n} (from {frame_counts.origins[video]}): the frame count "
                       "is not this video's")


# ----------------------------------------------------------------------------------
# What a submission covers.
# ----------------------------------------------------------------------------------


def listed_images(entries: Iterable[TestEntry],
                  counts: Mapping[str, int]) -> list[tuple[str, int]]:
  """(video, frame) of every image a per-image submission must have, in list order and
  each once: listed images as they are, listed videos as their frames 1..N."""
  images: dict[tuple[str, int], None] = {}
  for entry in entries:
    if entry.frame is not None:
      images.setdefault((entry.video, entry.frame))
    else:
      for frame in range(1, counts[entry.video] + 1):
        images.setdefault((entry.video, frame))
  return list(images)


def listed_videos(entries: Iterable[TestEntry]) -> list[str]:
  """Every video the list names (as a whole or by its images), in list order."""
  return list(dict.fromkeys(entry.video for entry in entries))


def video_lengths(entries: Iterable[TestEntry], counts: Mapping[str, int]
                  ) -> dict[str, int]:
  """Frames each per-video file must have: N of every video the list names."""
  return {video: counts[video] for video in listed_videos(entries)}


def face_frames_of(entries: Sequence[TestEntry],
                   image_roots: Sequence[str]) -> dict[str, list[int]]:
  """Frames with a face image of each listed video, found in the image roots."""
  if not image_roots:
    return {}
  from tfds_affwild2 import release  # pylint: disable=g-import-not-at-top
  index = release.ImageIndex(list(image_roots))
  return {video: sorted(index.frames(video)) for video in listed_videos(entries)}
