"""Parsing and validation of ABAW annotation files (pure Python + NumPy, no TFDS).

Every value is compared as a number, never as a string: the releases write the same
"disregard this frame" marker as `-5`, `-5.0` or `-1`. Problems in a file raise
`AnnotationError` naming the file and the 1-based line; the irregularities the real
data is known to have are returned as counts instead (see `release.py`).

Lines end at \n, \r\n or \r only. Any other control character inside a line (form
feed, U+0085, U+2028, ...) is an error: `str.splitlines` would split there and shift
every later frame's label by one. Lines are read with a length bound (MAX_LINE_CHARS),
so a huge line costs no memory, and an error quotes at most QUOTE_CHARS of it.

AU files have one of two headers: the 12 AUs of ABAW2 and later, or ABAW1's 8 AUs
(AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25). An 8-AU file fills its AUs' places in the
12-AU label vector; the places it does not annotate hold the -1 marker (masked out,
as any "disregard" value). AU20 is not among the 12 AUs the model predicts and no
later release annotates it: its values are checked, then dropped, and counted
(`TaskFile.dropped_au_labels`, summed in the split's summary).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator

import numpy as np

from tfds_affwild2.errors import ReleaseError

AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24",
            "AU25", "AU26")
AU_NAMES_ABAW1 = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")
AU_HEADERS = (AU_NAMES, AU_NAMES_ABAW1)
AU_POSITION = {name: i for i, name in enumerate(AU_NAMES)}
EXPRESSION_NAMES_8 = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness",
                      "Surprise", "Other")
EXPRESSION_NAMES_7 = EXPRESSION_NAMES_8[:7]
VA_NAMES = ("valence", "arousal")
TASKS = ("expr", "au", "va")
IMAGE_SIZE = 112  # side of the cropped_aligned faces

VA_INVALID = -5.0
EXPR_INVALID = -1
AU_INVALID = -1
MTL_HEADER = ("image", "valence", "arousal", "expression", "aus")

# Over 90 hours at 30 frames/s; keeps frame numbers int32 and per-video bitmaps small.
MAX_FRAME_NUMBER = 10_000_000
MAX_LINE_CHARS = 10_000  # the longest real line (an MTL row) has under 100
QUOTE_CHARS = 200  # what an error message quotes of a line or a field
# Characters str.splitlines splits at, and the other control characters: inside a
# line they are an error. A tab is spacing, and allowed.
FORBIDDEN_IN_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes not UTF-8, as surrogateescape keeps them


class AnnotationError(ReleaseError):
  """A malformed annotation file; the message starts with `path:line:`."""

  def __init__(self, path: str | os.PathLike, line_number: int, message: str):
    super().__init__(f"{os.fspath(path)}:{line_number}: {message}")
    self.path = os.fspath(path)
    self.line_number = line_number


@dataclasses.dataclass(frozen=True)
class FrameLabel:
  """One task's label for one frame; `valid` False for the disregard markers."""
  valid: bool
  value: object  # int (expr), int8[12] (au), float32[2] (va); None when not valid


def quoted(text: str) -> str:
  """`text` for an error message: its repr, cut to QUOTE_CHARS characters."""
  if len(text) <= QUOTE_CHARS:
    return repr(text)
  return f"{text[:QUOTE_CHARS]!r}... ({len(text)} characters)"


def _normalised_fields(line: str) -> list[str]:
  return [field.strip() for field in line.split(",")]


def _header_names(fields: list[str]) -> tuple[str, ...]:
  return tuple(name.lower() for name in fields if name)


def _parse_number(path, line_number: int, text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise AnnotationError(path, line_number, f"not a number: {quoted(text)}") from None
  if not np.isfinite(value):
    raise AnnotationError(path, line_number, f"not a finite number: {quoted(text)}")
  return value


def parse_va_fields(path, line_number: int, fields: list[str]) -> FrameLabel:
  valence, arousal = (_parse_number(path, line_number, f) for f in fields)
  if valence == VA_INVALID or arousal == VA_INVALID:
    return FrameLabel(False, None)
  for name, value in zip(VA_NAMES, (valence, arousal)):
    if not -1.0 <= value <= 1.0:
      raise AnnotationError(
          path, line_number, f"{name} {value} outside [-1, 1] (and not the -5 marker)")
  return FrameLabel(True, np.array([valence, arousal], np.float32))


def parse_expression_field(path, line_number: int, text: str,
                           num_classes: int) -> FrameLabel:
  value = _parse_number(path, line_number, text)
  if value == EXPR_INVALID:
    return FrameLabel(False, None)
  if value != int(value) or not 0 <= value < num_classes:
    raise AnnotationError(
        path, line_number,
        f"expression {quoted(text)} is not a class index in 0..{num_classes - 1} or -1")
  return FrameLabel(True, int(value))


def parse_au_fields(path, line_number: int, fields: list[str],
                    columns: tuple[str, ...] = AU_NAMES) -> FrameLabel:
  """One line's AU values (named by `columns`) as the 12-AU label vector: the places
  no column fills hold the -1 marker; columns outside the 12 are checked, then dropped."""
  values = [_parse_number(path, line_number, f) for f in fields]
  bad = [f"{name}={v:g}" for name, v in zip(columns, values) if v not in (0, 1, -1)]
  if bad:
    raise AnnotationError(path, line_number,
                          f"AU values must be 0, 1 or -1: {', '.join(bad)}")
  aus = np.full(len(AU_NAMES), AU_INVALID, np.int8)
  for name, value in zip(columns, values):
    if name in AU_POSITION:
      aus[AU_POSITION[name]] = value
  if np.all(aus == AU_INVALID):
    return FrameLabel(False, None)
  # A line may mark single AUs as -1: those stay masked out, the others are used.
  return FrameLabel(True, aus)


def _checked_line(path, line_number: int, line: str) -> str:
  """The line, once it is known to be UTF-8 text without control characters."""
  undecodable = UNDECODABLE.search(line)
  if undecodable:
    raise AnnotationError(path, line_number, "not UTF-8 text (byte "
                          f"0x{ord(undecodable.group()) - 0xdc00:02x} at character "
                          f"{undecodable.start() + 1} of the line)")
  forbidden = FORBIDDEN_IN_LINE.search(line)
  if forbidden:
    raise AnnotationError(
        path, line_number, f"control character U+{ord(forbidden.group()):04X} at "
        f"character {forbidden.start() + 1} (a line ends only at \\n, \\r\\n or \\r): "
        f"{quoted(line)}")
  return line


def iter_file_lines(path) -> Iterator[str]:
  """Streams a text file's lines without their endings, each checked (_checked_line):
  lines end at \\n, \\r\\n or \\r (universal newlines, not str.splitlines), a leading
  BOM is dropped, and a line longer than MAX_LINE_CHARS is an error, read no further."""
  # surrogateescape: a byte that is not UTF-8 is reported with its line, not its chunk.
  with open(path, encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
    line_number = 0
    while True:
      line = f.readline(MAX_LINE_CHARS + 1)
      if not line:
        return
      line_number += 1
      if line.endswith("\n"):
        line = line[:-1]
      elif len(line) > MAX_LINE_CHARS:
        raise AnnotationError(path, line_number, f"line longer than {MAX_LINE_CHARS} "
                              f"characters, starting {quoted(line[:QUOTE_CHARS])}")
      yield _checked_line(path, line_number, line)


def _read_lines(path) -> list[str]:
  """All lines of a (small) per-task file; trailing blank lines dropped."""
  lines = list(iter_file_lines(path))
  while lines and not lines[-1].strip():
    lines.pop()  # trailing blank lines carry no frame
  if not lines:
    raise AnnotationError(path, 1, "empty file (a header line is required)")
  return lines


def expression_classes_in_header(path, header_fields: list[str]) -> int:
  names = _header_names(header_fields)
  for known in (EXPRESSION_NAMES_8, EXPRESSION_NAMES_7):
    if names == tuple(n.lower() for n in known):
      return len(known)
  raise AnnotationError(
      path, 1, f"unknown EXPR header {quoted(','.join(header_fields))}; expected "
      f"{','.join(EXPRESSION_NAMES_7)} or {','.join(EXPRESSION_NAMES_8)}")


def au_columns_in_header(path, header_fields: list[str]) -> tuple[str, ...]:
  """The AU names a header lists: the 12 of ABAW2 and later, or ABAW1's 8."""
  names = _header_names(header_fields)
  for known in AU_HEADERS:
    if names == tuple(n.lower() for n in known):
      return known
  raise AnnotationError(
      path, 1, f"unknown AU header {quoted(','.join(header_fields))}; expected "
      + " or ".join(",".join(known) for known in AU_HEADERS))


def _check_va_header(path, header_fields: list[str]) -> None:
  if _header_names(header_fields) != tuple(n.lower() for n in VA_NAMES):
    raise AnnotationError(path, 1, f"unknown VA header {quoted(','.join(header_fields))}"
                          f"; expected {','.join(VA_NAMES)}")


@dataclasses.dataclass(frozen=True)
class TaskFile:
  """One per-task `<video>.txt`: element k-1 of `labels` is frame k."""
  labels: list  # FrameLabel per frame
  num_expr_classes: int  # 7 or 8 for EXPR files, else 0
  columns: tuple  # the header's names (AU: which AUs the file annotates)
  dropped_au_labels: dict  # AU outside the 12 -> its 0/1 values dropped


def read_task_file_in_full(path, task: str) -> TaskFile:
  """Reads one per-task `<video>.txt`; line k+1 of the file is frame k."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  lines = _read_lines(path)
  header = _normalised_fields(lines[0])
  num_classes, columns = 0, VA_NAMES
  if task == "expr":
    num_classes = expression_classes_in_header(path, header)
    columns = (EXPRESSION_NAMES_8 if num_classes == 8 else EXPRESSION_NAMES_7)
  elif task == "au":
    columns = au_columns_in_header(path, header)
  else:
    _check_va_header(path, header)
  expected_columns = {"va": 2, "expr": 1, "au": len(columns)}[task]
  dropped_columns = [i for i, name in enumerate(columns)
                     if task == "au" and name not in AU_POSITION]
  dropped = {columns[i]: 0 for i in dropped_columns}
  labels = []
  for line_number, line in enumerate(lines[1:], start=2):
    fields = _normalised_fields(line)
    if len(fields) != expected_columns:
      raise AnnotationError(path, line_number,
                            f"expected {expected_columns} comma-separated values, "
                            f"found {len(fields)}: {quoted(line)}")
    if task == "va":
      labels.append(parse_va_fields(path, line_number, fields))
    elif task == "expr":
      labels.append(parse_expression_field(path, line_number, fields[0], num_classes))
    else:
      labels.append(parse_au_fields(path, line_number, fields, columns))
      for i in dropped_columns:
        dropped[columns[i]] += float(fields[i]) != AU_INVALID  # checked by the parse
  return TaskFile(labels, num_classes, columns, dropped)


def read_task_file(path, task: str) -> tuple[list[FrameLabel], int]:
  """Reads one per-task `<video>.txt`: labels for frames 1..N, and the EXPR class count.

  Line k+1 of the file is frame k; element k-1 of the returned list is frame k.
  """
  task_file = read_task_file_in_full(path, task)
  return task_file.labels, task_file.num_expr_classes


@dataclasses.dataclass(frozen=True)
class MtlRow:
  line_number: int
  video: str
  frame: int
  image_name: str  # as written, e.g. "00001.jpg"
  labels: dict  # task -> FrameLabel


def check_relative_image_path(path, line_number: int, image: str) -> tuple[str, str]:
  """Splits `video/00001.jpg`, refusing paths that could leave the release root."""
  parts = image.replace("\\", "/").split("/")
  if image.startswith(("/", "\\")) or os.path.isabs(image) or ".." in parts or len(
      parts) != 2 or not all(parts):
    raise AnnotationError(path, line_number,
                          f"image path {quoted(image)} must be '<video>/<frame>.jpg' inside "
                          "the release (no absolute paths, no '..')")
  return parts[0], parts[1]


def frame_number(path, line_number: int, image_name: str) -> int:
  stem = os.path.splitext(image_name)[0]
  if not stem.isdigit():
    raise AnnotationError(path, line_number,
                          f"image name {quoted(image_name)} is not '<frame number>.jpg'")
  if int(stem) > MAX_FRAME_NUMBER:
    raise AnnotationError(path, line_number, f"frame number of {quoted(image_name)} is "
                          f"beyond any video's (at most {MAX_FRAME_NUMBER})")
  return int(stem)


def iter_mtl_file(path, num_expr_classes: int = 8) -> Iterator[MtlRow]:
  """Streams the rows of an s-Aff-Wild2 MTL file (ABAW3 `train_set.txt` or ABAW4+)."""
  lines_iter = iter_file_lines(path)
  first = next(lines_iter, "")
  if not first.strip():
    raise AnnotationError(path, 1, "empty file (a header line is required)")
  header = _normalised_fields(first)
  if _header_names(header) != MTL_HEADER:
    raise AnnotationError(path, 1, f"unknown MTL header {quoted(','.join(header))}; "
                          f"expected {','.join(MTL_HEADER)}")
  for line_number, line in enumerate(lines_iter, start=2):
    if not line.strip():
      continue
    fields = _normalised_fields(line)
    if len(fields) != 4 + len(AU_NAMES):
      raise AnnotationError(path, line_number, f"expected {4 + len(AU_NAMES)} "
                            f"comma-separated fields, found {len(fields)}: {quoted(line)}")
    video, image_name = check_relative_image_path(path, line_number, fields[0])
    labels = {
        "va": parse_va_fields(path, line_number, fields[1:3]),
        "expr": parse_expression_field(path, line_number, fields[3], num_expr_classes),
        "au": parse_au_fields(path, line_number, fields[4:]),
    }
    yield MtlRow(line_number, video, frame_number(path, line_number, image_name),
                 image_name, labels)
