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

Every frame the organisers list is written: a listed video is its frames 1..N (N from
affect_jax.inference.abaw_lists). A frame without a prediction (no face image, so
nothing to predict from) is filled: `previous` (the default, the challenges' rule)
takes the previous predicted frame's values, frames before the first prediction of a
video the first one; `linear` interpolates valence and arousal linearly between the
predicted frames around it and takes the expression and AUs of the nearer of them
(the previous one on a tie).

AU files carry the 12 AUs of ABAW2 and later, or ABAW1's 8 (`ABAW1_AU_NAMES`, for
per-video files of that challenge): AU20, which the model does not predict, is written
as 0 (absent).

Everything here is pure Python and NumPy: writers take decisions already made (VA
values, a class index, 0/1 AUs); `affect-jax predict` makes them from a model. What a
submission must cover (test lists, frame counts) is affect_jax.inference.abaw_lists'.
The validate command:

  affect-jax validate SUBMISSION_DIR --format mtl --test_list test_set.txt \\
      --sample_list CVPR_6th_ABAW_Expr_test_set_sample.txt
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
from affect_jax.errors import InputError
from affect_jax.inference.abaw_lists import (  # noqa: F401  (re-exported)
  TestEntry,
  face_frames_of,
  listed_frame_counts,
  listed_images,
  read_frame_counts,
  read_test_list,
  resolve_frame_counts,
  video_file_frame_counts,
  video_lengths,
)
from tfds_affwild2 import annotations
from tfds_affwild2.annotations import AU_NAMES

FORMATS = ("per_video", "mtl", "image_location")
FILL_RULES = ("previous", "linear")
TASKS = ("va", "expr", "au")
# ABAW1 (2020) annotated 8 AUs; AU20 is not among the model's 12.
ABAW1_AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")
AU_SETS = {"abaw": AU_NAMES, "abaw1": ABAW1_AU_NAMES}
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


def nearest_rows_for_frames(known_frames: np.ndarray, frames) -> np.ndarray:
  """For each wanted frame, the row of the nearest predicted frame (the previous one
  on a tie)."""
  frames = np.asarray(frames, np.int64)
  previous = source_rows_for_frames(known_frames, frames)
  following = np.minimum(previous + 1, len(known_frames) - 1)
  nearer_next = (known_frames[following] - frames) < np.abs(frames -
                                                            known_frames[previous])
  return np.where(nearer_next & (known_frames[previous] < frames), following, previous)


def _interpolated_va(known: VideoPredictions, frames: np.ndarray) -> np.ndarray:
  """VA linearly interpolated between predicted frames (held at the ends)."""
  return np.stack([np.interp(frames, known.frames, known.va[:, d])
                   for d in range(known.va.shape[1])], axis=1)


def predictions_at(video: str, predictions: Mapping[str, VideoPredictions],
                   frames, fill: str = "previous") -> VideoPredictions:
  """The video's decisions at `frames`; frames without a prediction filled by `fill`
  (see the module docstring)."""
  if fill not in FILL_RULES:
    raise InputError(f"unknown fill rule {fill!r}; expected one of {FILL_RULES}")
  if video not in predictions:
    raise InputError(f"video {video} has no predicted frame (no face image was "
                     "predicted): nothing to fill its frames with")
  known = predictions[video]
  frames = np.asarray(frames, np.int64)
  if fill == "previous":
    rows = source_rows_for_frames(known.frames, frames)
    return VideoPredictions(frames, va=_rows_of(known.va, rows),
                            expression=_rows_of(known.expression, rows),
                            aus=_rows_of(known.aus, rows))
  rows = nearest_rows_for_frames(known.frames, frames)
  return VideoPredictions(
      frames, va=None if known.va is None else _interpolated_va(known, frames),
      expression=_rows_of(known.expression, rows), aus=_rows_of(known.aus, rows))


def image_location(video: str, frame: int) -> str:
  return f"{video}/{frame:05d}.jpg"


# ----------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------


def task_header(task: str, num_expr_classes: int = 8,
                au_names: Sequence[str] = AU_NAMES) -> str:
  if task == "va":
    return ",".join(annotations.VA_NAMES)
  if task == "expr":
    return ",".join(annotations.EXPRESSION_NAMES_8[:num_expr_classes])
  return ",".join(au_names)


def au_columns(au_names: Sequence[str]) -> list[int | None]:
  """Index of each written AU among the model's 12 (None: not predicted, written 0)."""
  return [AU_NAMES.index(name) if name in AU_NAMES else None for name in au_names]


def format_values(task: str, predictions: VideoPredictions, row: int,
                  au_names: Sequence[str] = AU_NAMES) -> str:
  """One frame's values of one task as the ABAW files write them."""
  if task == "va":
    return ",".join(f"{float(x):.6f}" for x in predictions.va[row])
  if task == "expr":
    return str(int(predictions.expression[row]))
  aus = predictions.aus[row]
  return ",".join("0" if i is None else str(int(aus[i])) for i in au_columns(au_names))


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
                          num_expr_classes: int = 8, au_names: Sequence[str] = AU_NAMES,
                          fill: str = "previous") -> list[str]:
  """ABAW1-3: `<out_dir>/<TASK>/<video>.txt` with frames 1..lengths[video]."""
  written = []
  for task in _selected_tasks(predictions, tasks):
    for video, length in sorted(lengths.items()):
      filled = predictions_at(video, predictions, np.arange(1, length + 1), fill)
      path = os.path.join(out_dir, TASK_LABEL[task], f"{video}.txt")
      _write_lines(path, task_header(task, num_expr_classes, au_names),
                   (format_values(task, filled, row, au_names) for row in range(length)))
      written.append(path)
  return written


def _filled_per_image(predictions, images: Sequence[tuple[str, int]], fill: str):
  """(location, VideoPredictions of one row, row) for each image, in order; filled
  video by video so that the whole list needs one lookup per video."""
  by_video: dict[str, list[int]] = {}
  for position, (video, _) in enumerate(images):
    by_video.setdefault(video, []).append(position)
  filled = [None] * len(images)
  for video, positions in by_video.items():
    values = predictions_at(video, predictions, [images[p][1] for p in positions], fill)
    for row, position in enumerate(positions):
      filled[position] = (image_location(*images[position]), values, row)
  return filled


def write_mtl_file(out_dir: str, predictions: Mapping[str, VideoPredictions],
                   images: Sequence[tuple[str, int]], fill: str = "previous") -> str:
  """ABAW3+ MTL: one line per image, `image,valence,arousal,expression,AU1..AU26`."""
  _selected_tasks(predictions, TASKS)
  path = os.path.join(out_dir, MTL_FILE)
  _write_lines(path, MTL_HEADER, (
      ",".join([location] + [format_values(t, values, row) for t in TASKS])
      for location, values, row in _filled_per_image(predictions, images, fill)))
  return path


def write_image_location_files(out_dir: str,
                               predictions: Mapping[str, VideoPredictions],
                               images: Sequence[tuple[str, int]], *, tasks=None,
                               num_expr_classes: int = 8,
                               au_names: Sequence[str] = AU_NAMES,
                               fill: str = "previous") -> list[str]:
  """ABAW5+: `<out_dir>/<TASK>.txt`, one `image_location,...` line per image."""
  filled = _filled_per_image(predictions, images, fill)
  written = []
  for task in _selected_tasks(predictions, tasks):
    path = os.path.join(out_dir, f"{TASK_LABEL[task]}.txt")
    _write_lines(path, f"{IMAGE_COLUMN},{task_header(task, num_expr_classes, au_names)}",
                 (f"{location},{format_values(task, values, row, au_names)}"
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


def check_values(task: str, fields: Sequence[str], num_expr_classes: int,
                 au_names: Sequence[str] = AU_NAMES) -> list[str]:
  """What is wrong with one frame's value fields of one task (empty list: nothing)."""
  expected = {"va": 2, "expr": 1, "au": len(au_names)}[task]
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
  return [f"{name}={fields[i]} is not 0 or 1" for i, name in enumerate(au_names)
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


@dataclasses.dataclass(frozen=True)
class Expectations:
  """What a submission for one list must hold, and the settings its values follow."""
  images: list  # (video, frame) of per-image files, in list order
  lengths: dict  # video -> N, per-video files
  listed_at: dict  # (video, frame) -> "list:line" that asks for it
  num_expr_classes: int = 8
  au_names: tuple = AU_NAMES


def _frame_count_problem(path: str, lines: list[str], length: int) -> Problem | None:
  frames = len(lines) - 1
  if frames == length:
    return None
  what = (f"the first frame without a line is {frames + 1}" if frames < length
          else f"lines after frame {length} are for frames the video does not have")
  return Problem(path, len(lines), f"{frames} frame lines, expected {length} (one per "
                 f"frame 1..{length} of the video): {what}")


def _validate_per_video(path_dir, expect: Expectations, tasks) -> list[Problem]:
  problems: list[Problem] = []
  for task in tasks:
    folder = os.path.join(path_dir, TASK_LABEL[task])
    if not os.path.isdir(folder):
      problems.append(Problem(folder, 0, f"missing {TASK_LABEL[task]} folder"))
      continue
    unexpected = sorted(n for n in os.listdir(folder)
                        if n.endswith(".txt") and n[:-4] not in expect.lengths)
    problems += [Problem(os.path.join(folder, n), 0, "video not in the test list")
                 for n in unexpected]
    for video, length in sorted(expect.lengths.items()):
      path = os.path.join(folder, f"{video}.txt")
      lines = _read_rows(path, problems)
      if lines is None:
        continue
      _check_header(path, lines[0],
                    task_header(task, expect.num_expr_classes, expect.au_names), problems)
      short = _frame_count_problem(path, lines, length)
      if short is not None:
        problems.append(short)
      for line_number, line in enumerate(lines[1:], start=2):
        fields = [x.strip() for x in line.split(",")]
        problems += [Problem(path, line_number, m) for m in check_values(
            task, fields, expect.num_expr_classes, expect.au_names)]
  return problems


def _validate_image_rows(path, lines, expect: Expectations, row_tasks,
                         problems: list[Problem]) -> None:
  """Rows of a per-image file: every listed image once, in any order, valid values."""
  expected = {image_location(*image) for image in expect.images}
  if len(lines) - 1 != len(expect.images):
    problems.append(Problem(path, len(lines), f"{len(lines) - 1} image lines, expected "
                            f"{len(expect.images)} (one per listed image)"))
  widths = {"va": 2, "expr": 1, "au": len(expect.au_names)}
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
      problems += [Problem(path, line_number, m) for m in check_values(
          task, fields[start:start + widths[task]], expect.num_expr_classes,
          expect.au_names)]
      start += widths[task]
    if len(fields) != start:
      problems.append(Problem(path, line_number, f"{len(fields)} fields, expected "
                              f"{start}"))
  missing = [image for image in expect.images if image_location(*image) not in seen]
  if missing:
    first = missing[0]
    problems.append(Problem(path, 0, f"{len(missing)} listed images have no line; the "
                            f"first: {image_location(*first)} (asked for at "
                            f"{expect.listed_at[first]})"))


def submission_expectations(test_list, *, frame_counts: Mapping[str, int] | None = None,
                            video_dir: str | None = None,
                            sample_lists: Sequence[str] = (), num_expr_classes: int = 8,
                            au_names: Sequence[str] = AU_NAMES) -> Expectations:
  """Every image and every video length a submission for `test_list` must cover. N of
  each video: --frame_counts, its video file, the lists' own frames (see abaw_lists);
  never the last face frame, which is what a short submission would also stop at."""
  if isinstance(test_list, (str, os.PathLike)):
    list_name, entries = os.fspath(test_list), read_test_list(test_list)
  else:
    list_name, entries = "the test list", list(test_list)
  lists = {list_name: entries, **{p: read_test_list(p) for p in sample_lists}}
  videos = [entry.video for entry in entries]
  counts = resolve_frame_counts(
      videos, given=frame_counts,
      video_files=video_file_frame_counts(video_dir, videos) if video_dir else None,
      listed=listed_frame_counts(lists), listed_in=list_name).counts
  listed_at = {}
  for entry in entries:
    frames = [entry.frame] if entry.frame is not None else range(1, counts[entry.video]
                                                                 + 1)
    for frame in frames:
      listed_at.setdefault((entry.video, frame), f"{list_name}:{entry.line_number}")
  return Expectations(listed_images(entries, counts), video_lengths(entries, counts),
                      listed_at, num_expr_classes, tuple(au_names))


def _checked_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise InputError(f"--tasks: unknown task {unknown[0]!r}; expected some of "
                     f"{', '.join(TASKS)}" if unknown else
                     f"--tasks: no task given; expected some of {', '.join(TASKS)}")
  return tuple(tasks)


def validate_submission(path: str, format: str,  # noqa: A002
                        test_list: str | os.PathLike | Sequence[TestEntry], *,
                        frame_counts: Mapping[str, int] | None = None,
                        video_dir: str | None = None, sample_lists: Sequence[str] = (),
                        num_expr_classes: int = 8, tasks: Sequence[str] = TASKS,
                        au_names: Sequence[str] = AU_NAMES) -> list[Problem]:
  """Every problem of a submission folder (empty list: none).

  `test_list` is a path or a list of TestEntry. Per-image files need a line for every
  listed image and every frame 1..N of every listed video, per-video files one line per
  frame 1..N; N comes from `frame_counts`, the videos in `video_dir` or the frames the
  lists (the test list and `sample_lists`) name. The first missing frame is named.
  """
  if format not in FORMATS:
    raise InputError(f"unknown format {format!r}; expected one of {FORMATS}")
  tasks = _checked_tasks(tasks)
  expect = submission_expectations(test_list, frame_counts=frame_counts,
                                   video_dir=video_dir, sample_lists=sample_lists,
                                   num_expr_classes=num_expr_classes, au_names=au_names)
  if format == "per_video":
    return _validate_per_video(path, expect, tasks)
  problems: list[Problem] = []
  if format == "mtl":
    mtl = dataclasses.replace(expect, au_names=AU_NAMES)  # MTL files carry all 12 AUs
    file_tasks = [(os.path.join(path, MTL_FILE), MTL_HEADER, TASKS, mtl)]
  else:
    file_tasks = [(os.path.join(path, f"{TASK_LABEL[t]}.txt"),
                   f"{IMAGE_COLUMN},{task_header(t, num_expr_classes, au_names)}", (t,),
                   expect) for t in tasks]
  for file_path, header, row_tasks, file_expect in file_tasks:
    lines = _read_rows(file_path, problems)
    if lines is not None:
      _check_header(file_path, lines[0], header, problems)
      _validate_image_rows(file_path, lines, file_expect, row_tasks, problems)
  return problems


VALIDATE_DOC = """affect-jax validate: checks a submission folder against a test list
and prints every problem as path:line: what (exit status 1 when there is one).

  affect-jax validate SUBMISSION_DIR --format mtl --test_list test_set.txt \\
      --sample_list CVPR_6th_ABAW_Expr_test_set_sample.txt

Every frame 1..N of every listed video must have a line (per-image files: every listed
image too); N comes from --frame_counts, the video files in --video_dir, or the frames
the lists name (the test list itself and each --sample_list, as the organisers' sample
files list every frame). A listed video whose N none of them gives is an error.
"""


def define_validate_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_enum("format", None, FORMATS, "The submission's format.",
                    flag_values=flag_values)
  flags.DEFINE_string("test_list", None, "The ABAW test list the submission is for.",
                      flag_values=flag_values)
  flags.DEFINE_multi_string("sample_list", [], "An organisers' list naming frames one "
                            "by one (a sample file): N of its videos (repeat for "
                            "several).", flag_values=flag_values)
  flags.DEFINE_string("frame_counts", None, "Frames per video (JSON or 'video,frames' "
                      "CSV).", flag_values=flag_values)
  flags.DEFINE_string("video_dir", None, "The release's video files: N of each video "
                      "from its file.", flag_values=flag_values)
  flags.DEFINE_integer("num_expr_classes", 8, "Expression classes (7: ABAW2).",
                       lower_bound=7, upper_bound=8, flag_values=flag_values)
  flags.DEFINE_enum("au_set", "abaw", sorted(AU_SETS), "AU columns: 'abaw' the 12 of "
                    "ABAW2 and later, 'abaw1' ABAW1's 8.", flag_values=flag_values)
  flags.DEFINE_list("tasks", list(TASKS), "per_video / image_location: the tasks to "
                    "check.", flag_values=flag_values)
  flags.DEFINE_integer("max_shown", 100, "Problems printed at most.",
                       flag_values=flag_values)
  flags.mark_flags_as_required(["format", "test_list"], flag_values=flag_values)


def validate_main(argv: Sequence[str] | None = None) -> int:
  """`affect-jax validate SUBMISSION_DIR ...`: 0 when valid, 1 with problems; a check
  that cannot run (bad list, unknown task, unknown N) raises InputError."""
  args, (path,) = cli.parse_flags(argv, define_validate_flags, VALIDATE_DOC,
                                  positional=("SUBMISSION_DIR",))
  problems = validate_submission(
      path, args.format, args.test_list,
      frame_counts=read_frame_counts(args.frame_counts) if args.frame_counts else None,
      video_dir=args.video_dir, sample_lists=args.sample_list,
      num_expr_classes=args.num_expr_classes, tasks=args.tasks,
      au_names=AU_SETS[args.au_set])
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
  rest = argv[1:] if argv[:1] == ["validate"] else argv
  return cli.run_reporting_errors(lambda: validate_main(rest))


if __name__ == "__main__":
  sys.exit(main())
