"""The ABAW submission validator: every problem of a submission folder, as
`path:line: what`, checked against the test list it is for and N of every video
(affect_jax.inference.abaw_lists); the first missing frame is named with the list line
that asks for it.

  affect-jax validate SUBMISSION_DIR --format mtl --test_list test_set.txt \\
      --sample_list CVPR_6th_ABAW_Expr_test_set_sample.txt
  (or python -m affect_jax.inference.submission_validator validate SUBMISSION_DIR ...)
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping, Sequence

import numpy as np
from absl import flags

from affect_jax import cli
from affect_jax.errors import InputError
from affect_jax.inference.abaw_lists import (
  TestEntry,
  check_counts_cover_faces,
  face_frames_of,
  listed_frame_counts,
  listed_images,
  read_frame_counts,
  read_test_list,
  resolve_frame_counts,
  video_file_frame_counts,
  video_lengths,
)
from affect_jax.inference.submission import (
  AU_SETS,
  FORMATS,
  IMAGE_COLUMN,
  MTL_FILE,
  MTL_HEADER,
  TASK_LABEL,
  TASKS,
  image_location,
  task_header,
)
from tfds_affwild2 import annotations
from tfds_affwild2.annotations import AU_NAMES


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
                            sample_lists: Sequence[str] = (),
                            image_roots: Sequence[str] = (), num_expr_classes: int = 8,
                            au_names: Sequence[str] = AU_NAMES) -> Expectations:
  """Every image and every video length a submission for `test_list` must cover. N of
  each video: --frame_counts, its video file, the lists' own frames (see abaw_lists);
  never the last face frame, which is what a short submission would also stop at.
  With `image_roots`, N is checked against the video's face images."""
  if isinstance(test_list, (str, os.PathLike)):
    list_name, entries = os.fspath(test_list), read_test_list(test_list)
  else:
    list_name, entries = "the test list", list(test_list)
  lists = {list_name: entries, **{p: read_test_list(p) for p in sample_lists}}
  videos = [entry.video for entry in entries]
  resolved = resolve_frame_counts(
      videos, given=frame_counts,
      video_files=video_file_frame_counts(video_dir, videos) if video_dir else None,
      listed=listed_frame_counts(lists), listed_in=list_name)
  if image_roots:
    check_counts_cover_faces(resolved, face_frames_of(entries, image_roots))
  counts = resolved.counts
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
                        image_roots: Sequence[str] = (),
                        num_expr_classes: int = 8, tasks: Sequence[str] = TASKS,
                        au_names: Sequence[str] = AU_NAMES) -> list[Problem]:
  """Every problem of a submission folder (empty list: none).

  `test_list` is a path or a list of TestEntry. Per-image files need a line for every
  listed image and every frame 1..N of every listed video, per-video files one line per
  frame 1..N; N comes from `frame_counts`, the videos in `video_dir` or the frames the
  lists (the test list and `sample_lists`) name, checked against the face images in
  `image_roots` when given. The first missing frame is named.
  """
  if format not in FORMATS:
    raise InputError(f"unknown format {format!r}; expected one of {FORMATS}")
  tasks = _checked_tasks(tasks)
  expect = submission_expectations(test_list, frame_counts=frame_counts,
                                   video_dir=video_dir, sample_lists=sample_lists,
                                   image_roots=image_roots,
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
files list every frame). A listed video whose N none of them gives is an error; with
--image_root, so is a face image beyond N.
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
  flags.DEFINE_multi_string("image_root", [], "A cropped_aligned folder (repeat for "
                            "several): N is checked against the videos' face images.",
                            flag_values=flag_values)
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
      image_roots=args.image_root, num_expr_classes=args.num_expr_classes, tasks=args.tasks,
      au_names=AU_SETS[args.au_set])
  for problem in problems[:args.max_shown]:
    print(problem)
  if len(problems) > args.max_shown:
    print(f"... and {len(problems) - args.max_shown} more problems")
  print(f"{args.format} submission {path}: "
        f"{'OK' if not problems else f'{len(problems)} problems'}")
  return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m affect_jax.inference.submission_validator validate SUBMISSION_DIR ...`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] != ["validate"] and not cli.wants_help(argv):
    print("usage: python -m affect_jax.inference.submission_validator validate SUBMISSION_DIR "
          "[flags]  (the same as affect-jax validate)", file=sys.stderr)
    return cli.USAGE_ERROR
  rest = argv[1:] if argv[:1] == ["validate"] else argv
  return validate_main(rest)


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
