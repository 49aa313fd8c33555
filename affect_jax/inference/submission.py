"""ABAW submission files: writers for each challenge year's format, and a validator.

Formats (see shared ABAW_FORMAT.md, "Submission files"):
  per_video       ABAW1-3 uni-task: `<out>/{VA,EXPR,AU}/<video>.txt`, the task's header,
                  then one line per frame of the whole video (line k+1 is frame k).
  mtl             ABAW3+ multi-task: one file `<out>/MTL.txt`, header
                  `image,valence,arousal,expression,aus`, one line per listed image
                  (`video/00001.jpg,v,a,expression,AU1,...,AU26`).
  image_location  ABAW5+ uni-task: `<out>/{VA,EXPR,AU}.txt`, header
                  `image_location,valence,arousal` / `image_location,Neutral,...,Other` /
                  `image_location,AU1,...,AU26`, one line per listed image.

A frame that must be written but has no prediction (no face image, so nothing to
predict from) takes the previous predicted frame's values; frames before the first
prediction of a video take the first one.

Everything here is pure Python and NumPy: writers take decisions already made (VA
values, a class index, 0/1 AUs); `affect-jax predict` makes them from a model. What a
submission must cover (test lists, frame counts) is affect_jax.inference.abaw_lists'.
The validate command:

  affect-jax validate SUBMISSION_DIR --format mtl --test_list test_set.txt \\
      --image_root cropped_aligned
  (or python -m affect_jax.inference.submission validate SUBMISSION_DIR ...)
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterable, Mapping, Sequence

import numpy as np
from absl import flags

from affect_jax import cli
from affect_jax.inference.abaw_lists import (
  TestEntry,
  face_frames_of,
  listed_images,
  read_frame_counts,
  read_test_list,
  video_lengths,
)
from tfds_affwild2 import annotations
from tfds_affwild2.annotations import AU_NAMES

FORMATS = ("per_video", "mtl", "image_location")
TASKS = ("va", "expr", "au")
TASK_LABEL = {"va": "VA", "expr": "EXPR", "au": "AU"}  # folder / file names
MTL_FILE = "MTL.txt"
MTL_HEADER = ",".join(annotations.MTL_HEADER)
IMAGE_COLUMN = "image_location"


# ----------------------------------------------------------------------------------
# Predictions grouped by video, and the fill rule for frames without a prediction.
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoPredictions:
  """Decisions for the frames of one video that have a prediction, sorted by frame.

  Tasks the model does not have are None.
  """
  frames: np.ndarray  # int64 [n], strictly increasing
  va: np.ndarray | None = None  # float [n, 2] in [-1, 1]
  expression: np.ndarray | None = None  # int [n] in 0..K-1
  aus: np.ndarray | None = None  # int [n, 12] in {0, 1}

  def tasks(self) -> tuple[str, ...]:
    present = {"va": self.va, "expr": self.expression, "au": self.aus}
    return tuple(task for task in TASKS if present[task] is not None)


def group_by_video(videos: Sequence[str], frames, *, va=None, expression=None,
                   aus=None) -> dict[str, VideoPredictions]:
  """Per-frame decision arrays (any order) -> {video: VideoPredictions}."""
  names, video_ids = np.unique(np.asarray(videos, dtype=str), return_inverse=True)
  frames = np.asarray(frames, np.int64)
  order = np.lexsort((frames, video_ids))  # by video, then frame: one sort for all
  starts = np.searchsorted(video_ids[order], np.arange(len(names) + 1))
  result = {}
  for video_id, video in enumerate(names.tolist()):
    rows = order[starts[video_id]:starts[video_id + 1]]
    if np.any(np.diff(frames[rows]) == 0):
      duplicate = frames[rows][np.flatnonzero(np.diff(frames[rows]) == 0)[0]]
      raise ValueError(f"video {video}: two predictions for frame {duplicate}")
    result[video] = VideoPredictions(frames[rows], va=_rows_of(va, rows),
                                     expression=_rows_of(expression, rows),
                                     aus=_rows_of(aus, rows))
  return result


def _rows_of(values, rows):
  return None if values is None else np.asarray(values)[rows]


def source_rows_for_frames(known_frames: np.ndarray, frames) -> np.ndarray:
  """For each wanted frame, the row of the prediction it takes: the last predicted
  frame at or before it, else (before the first prediction) the first one."""
  if len(known_frames) == 0:
    raise ValueError("no predicted frame to take values from")
  rows = np.searchsorted(known_frames, np.asarray(frames, np.int64), side="right") - 1
  return np.maximum(rows, 0)


def predictions_at(video: str, predictions: Mapping[str, VideoPredictions],
                   frames) -> VideoPredictions:
  """The video's decisions at `frames`, filled by `source_rows_for_frames`."""
  if video not in predictions:
    raise ValueError(f"video {video} has no predicted frame (no face image was "
                     "predicted): nothing to fill its frames with")
  known = predictions[video]
  rows = source_rows_for_frames(known.frames, frames)
  return VideoPredictions(np.asarray(frames, np.int64), va=_rows_of(known.va, rows),
                          expression=_rows_of(known.expression, rows),
                          aus=_rows_of(known.aus, rows))


def image_location(video: str, frame: int) -> str:
  return f"{video}/{frame:05d}.jpg"


# ----------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------


def task_header(task: str, num_expr_classes: int = 8) -> str:
  if task == "va":
    return ",".join(annotations.VA_NAMES)
  if task == "expr":
    return ",".join(annotations.EXPRESSION_NAMES_8[:num_expr_classes])
  return ",".join(AU_NAMES)


def format_values(task: str, predictions: VideoPredictions, row: int) -> str:
  """One frame's values of one task as the ABAW files write them."""
  if task == "va":
    return ",".join(f"{float(x):.6f}" for x in predictions.va[row])
  if task == "expr":
    return str(int(predictions.expression[row]))
  return ",".join(str(int(x)) for x in predictions.aus[row])


def _write_lines(path: str, header: str, lines: Iterable[str]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(header + "\n")
    for line in lines:
      f.write(line + "\n")


def _selected_tasks(predictions: Mapping[str, VideoPredictions],
                    tasks: Sequence[str] | None) -> tuple[str, ...]:
  available = next(iter(predictions.values())).tasks() if predictions else ()
  tasks = tuple(tasks) if tasks is not None else available
  missing = [t for t in tasks if t not in available]
  if missing:
    raise ValueError(f"the predictions have no {', '.join(missing)} values "
                     f"(tasks of the model: {', '.join(available) or 'none'})")
  return tasks


def write_per_video_files(out_dir: str, predictions: Mapping[str, VideoPredictions],
                          lengths: Mapping[str, int], *, tasks=None,
                          num_expr_classes: int = 8) -> list[str]:
  """ABAW1-3: `<out_dir>/<TASK>/<video>.txt` with frames 1..lengths[video]."""
  written = []
  for task in _selected_tasks(predictions, tasks):
    for video, length in sorted(lengths.items()):
      filled = predictions_at(video, predictions, np.arange(1, length + 1))
      path = os.path.join(out_dir, TASK_LABEL[task], f"{video}.txt")
      _write_lines(path, task_header(task, num_expr_classes),
                   (format_values(task, filled, row) for row in range(length)))
      written.append(path)
  return written


def _filled_per_image(predictions, images: Sequence[tuple[str, int]]):
  """(location, VideoPredictions of one row, row) for each image, in order; filled
  video by video so that the whole list needs one lookup per video."""
  by_video: dict[str, list[int]] = {}
  for position, (video, _) in enumerate(images):
    by_video.setdefault(video, []).append(position)
  filled = [None] * len(images)
  for video, positions in by_video.items():
    values = predictions_at(video, predictions, [images[p][1] for p in positions])
    for row, position in enumerate(positions):
      filled[position] = (image_location(*images[position]), values, row)
  return filled


def write_mtl_file(out_dir: str, predictions: Mapping[str, VideoPredictions],
                   images: Sequence[tuple[str, int]]) -> str:
  """ABAW3+ MTL: one line per image, `image,valence,arousal,expression,AU1..AU26`."""
  _selected_tasks(predictions, TASKS)
  path = os.path.join(out_dir, MTL_FILE)
  _write_lines(path, MTL_HEADER, (
      ",".join([location] + [format_values(t, values, row) for t in TASKS])
      for location, values, row in _filled_per_image(predictions, images)))
  return path


def write_image_location_files(out_dir: str,
                               predictions: Mapping[str, VideoPredictions],
                               images: Sequence[tuple[str, int]], *, tasks=None,
                               num_expr_classes: int = 8) -> list[str]:
  """ABAW5+: `<out_dir>/<TASK>.txt`, one `image_location,...` line per image."""
  filled = _filled_per_image(predictions, images)
  written = []
  for task in _selected_tasks(predictions, tasks):
    path = os.path.join(out_dir, f"{TASK_LABEL[task]}.txt")
    _write_lines(path, f"{IMAGE_COLUMN},{task_header(task, num_expr_classes)}",
                 (f"{location},{format_values(task, values, row)}"
                  for location, values, row in filled))
    written.append(path)
  return written


# ----------------------------------------------------------------------------------
# Validator.
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str
  line_number: int  # 0: the file as a whole
  message: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line_number}: {self.message}" if self.line_number \
        else f"{self.path}: {self.message}"


def check_values(task: str, fields: Sequence[str], num_expr_classes: int) -> list[str]:
  """What is wrong with one frame's value fields of one task (empty list: nothing)."""
  expected = {"va": 2, "expr": 1, "au": len(AU_NAMES)}[task]
  if len(fields) != expected:
    return [f"{TASK_LABEL[task]}: expected {expected} values, found {len(fields)}"]
  try:
    values = [float(x) for x in fields]
  except ValueError:
    return [f"{TASK_LABEL[task]}: not a number in {','.join(fields)!r}"]
  if not all(np.isfinite(values)):
    return [f"{TASK_LABEL[task]}: not a finite number in {','.join(fields)!r}"]
  if task == "va":
    return [f"{name} {v:g} outside [-1, 1]" for name, v in
            zip(annotations.VA_NAMES, values) if not -1.0 <= v <= 1.0]
  if task == "expr":
    v = values[0]
    if v != int(v) or not 0 <= v < num_expr_classes:
      return [f"expression {fields[0]!r} is not a class in 0..{num_expr_classes - 1}"]
    return []
  return [f"{name}={fields[i]} is not 0 or 1" for i, name in enumerate(AU_NAMES)
          if values[i] not in (0.0, 1.0)]


def _read_rows(path: str, problems: list[Problem]) -> list[str] | None:
  if not os.path.isfile(path):
    problems.append(Problem(path, 0, "missing file"))
    return None
  with open(path, encoding="utf-8-sig", newline=None) as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    problems.append(Problem(path, 1, "empty file (a header line is required)"))
    return None
  return lines


def _check_header(path, line: str, expected: str, problems: list[Problem]) -> None:
  got = [x.strip().lower() for x in line.split(",")]
  if got != expected.lower().split(","):
    problems.append(Problem(path, 1, f"header {line!r}, expected {expected!r}"))


def _validate_per_video(path_dir, lengths, tasks, num_expr_classes) -> list[Problem]:
  problems: list[Problem] = []
  for task in tasks:
    folder = os.path.join(path_dir, TASK_LABEL[task])
    if not os.path.isdir(folder):
      problems.append(Problem(folder, 0, f"missing {TASK_LABEL[task]} folder"))
      continue
    unexpected = sorted(n for n in os.listdir(folder)
                        if n.endswith(".txt") and n[:-4] not in lengths)
    problems += [Problem(os.path.join(folder, n), 0, "video not in the test list")
                 for n in unexpected]
    for video, length in sorted(lengths.items()):
      path = os.path.join(folder, f"{video}.txt")
      lines = _read_rows(path, problems)
      if lines is None:
        continue
      _check_header(path, lines[0], task_header(task, num_expr_classes), problems)
      if len(lines) - 1 != length:
        problems.append(Problem(path, len(lines), f"{len(lines) - 1} frame lines, "
                                f"expected {length} (one per frame of the video)"))
      for line_number, line in enumerate(lines[1:], start=2):
        fields = [x.strip() for x in line.split(",")]
        problems += [Problem(path, line_number, m)
                     for m in check_values(task, fields, num_expr_classes)]
  return problems


def _validate_image_rows(path, lines, images, row_tasks, num_expr_classes,
                         problems: list[Problem]) -> None:
  """Rows of a per-image file: every listed image once, in any order, valid values."""
  expected = {image_location(*image) for image in images}
  if len(lines) - 1 != len(images):
    problems.append(Problem(path, len(lines), f"{len(lines) - 1} image lines, expected "
                            f"{len(images)} (one per listed image)"))
  seen = set()
  for line_number, line in enumerate(lines[1:], start=2):
    fields = [x.strip() for x in line.split(",")]
    location = fields[0]
    if location not in expected:
      problems.append(Problem(path, line_number, f"image {location!r} is not listed"))
    elif location in seen:
      problems.append(Problem(path, line_number, f"image {location!r} appears twice"))
    seen.add(location)
    start = 1
    for task in row_tasks:
      width = {"va": 2, "expr": 1, "au": len(AU_NAMES)}[task]
      problems += [Problem(path, line_number, m) for m in
                   check_values(task, fields[start:start + width], num_expr_classes)]
      start += width
    if len(fields) != start:
      problems.append(Problem(path, line_number, f"{len(fields)} fields, expected "
                              f"{start}"))
  missing = sorted(expected - seen)
  if missing:
    problems.append(Problem(path, 0, f"{len(missing)} listed images have no line, "
                            f"e.g. {', '.join(missing[:5])}"))


def validate_submission(path: str, format: str,  # noqa: A002
                        test_list: str | os.PathLike | Sequence[TestEntry], *,
                        image_roots: Sequence[str] = (),
                        frame_counts: Mapping[str, int] | None = None,
                        num_expr_classes: int = 8,
                        tasks: Sequence[str] = TASKS) -> list[Problem]:
  """Every problem of a submission folder (empty list: none).

  `test_list` is a path or a list of TestEntry. Video entries need the image roots
  (to know the video's face frames); per-video files have one line per frame up to
  `frame_counts[video]` when given, else up to the last frame with a face image.
  """
  if format not in FORMATS:
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
  entries = read_test_list(test_list) if isinstance(test_list, (str, os.PathLike)) \
      else list(test_list)
  face_frames = face_frames_of(entries, image_roots)
  if format == "per_video":
    return _validate_per_video(path, video_lengths(entries, face_frames, frame_counts),
                               tasks, num_expr_classes)
  images = listed_images(entries, face_frames)
  problems: list[Problem] = []
  if format == "mtl":
    file_tasks = [(os.path.join(path, MTL_FILE), MTL_HEADER, TASKS)]
  else:
    file_tasks = [(os.path.join(path, f"{TASK_LABEL[t]}.txt"),
                   f"{IMAGE_COLUMN},{task_header(t, num_expr_classes)}", (t,))
                  for t in tasks]
  for file_path, header, row_tasks in file_tasks:
    lines = _read_rows(file_path, problems)
    if lines is not None:
      _check_header(file_path, lines[0], header, problems)
      _validate_image_rows(file_path, lines, images, row_tasks, num_expr_classes,
                           problems)
  return problems


VALIDATE_DOC = """affect-jax validate: checks a submission folder against a test list
and prints every problem as path:line: what (exit status 1 when there is one).

  affect-jax validate SUBMISSION_DIR --format mtl --test_list test_set.txt \\
      --image_root cropped_aligned

Video entries of a test list need the image roots (to know the video's face frames);
per-video files have one line per frame up to --frame_counts' count when given, else
up to the last frame with a face image.
"""


def define_validate_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_enum("format", None, FORMATS, "The submission's format.",
                    flag_values=flag_values)
  flags.DEFINE_string("test_list", None, "The ABAW test list.", flag_values=flag_values)
  flags.DEFINE_multi_string("image_root", [], "A cropped_aligned folder (repeat for "
                            "several).", flag_values=flag_values)
  flags.DEFINE_string("frame_counts", None, "Frames per video (JSON or 'video,frames' "
                      "CSV).", flag_values=flag_values)
  flags.DEFINE_integer("num_expr_classes", 8, "Expression classes (7: ABAW2).",
                       lower_bound=7, upper_bound=8, flag_values=flag_values)
  flags.DEFINE_list("tasks", list(TASKS), "per_video / image_location: the tasks to "
                    "check.", flag_values=flag_values)
  flags.DEFINE_integer("max_shown", 100, "Problems printed at most.",
                       flag_values=flag_values)
  flags.mark_flags_as_required(["format", "test_list"], flag_values=flag_values)


def validate_main(argv: Sequence[str] | None = None) -> int:
  """`affect-jax validate SUBMISSION_DIR ...`: 0 when valid, 1 with problems, 2 when the
  check cannot run."""
  args, (path,) = cli.parse_flags(argv, define_validate_flags, VALIDATE_DOC,
                                  positional=("SUBMISSION_DIR",))
  try:
    problems = validate_submission(
        path, args.format, args.test_list, image_roots=args.image_root,
        frame_counts=read_frame_counts(args.frame_counts) if args.frame_counts else None,
        num_expr_classes=args.num_expr_classes, tasks=args.tasks)
  except (ValueError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return cli.USAGE_ERROR
  for problem in problems[:args.max_shown]:
    print(problem)
  if len(problems) > args.max_shown:
    print(f"... and {len(problems) - args.max_shown} more problems")
  print(f"{args.format} submission {path}: "
        f"{'OK' if not problems else f'{len(problems)} problems'}")
  return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m affect_jax.inference.submission validate SUBMISSION_DIR ...`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] != ["validate"] and not cli.wants_help(argv):
    print("usage: python -m affect_jax.inference.submission validate SUBMISSION_DIR "
          "[flags]  (the same as affect-jax validate)", file=sys.stderr)
    return cli.USAGE_ERROR
  return validate_main(argv[1:] if argv[:1] == ["validate"] else argv)


if __name__ == "__main__":
  sys.exit(main())
