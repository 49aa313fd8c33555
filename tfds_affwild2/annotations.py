"""Parsing and validation of ABAW annotation files (pure Python + NumPy, no TFDS).

Every value is compared as a number, never as a string: the releases write the same
"disregard this frame" marker as `-5`, `-5.0` or `-1`. Problems in a file raise
`AnnotationError` naming the file and the 1-based line; the irregularities the real
data is known to have are returned as counts instead (see `release.py`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from tfds_affwild2.errors import ReleaseError

AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24",
            "AU25", "AU26")
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


def _normalised_fields(line: str) -> list[str]:
  return [field.strip() for field in line.split(",")]


def _header_names(fields: list[str]) -> tuple[str, ...]:
  return tuple(name.lower() for name in fields if name)


def _parse_number(path, line_number: int, text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise AnnotationError(path, line_number, f"not a number: {text!r}") from None
  if not np.isfinite(value):
    raise AnnotationError(path, line_number, f"not a finite number: {text!r}")
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
        f"expression {text!r} is not a class index in 0..{num_classes - 1} or -1")
  return FrameLabel(True, int(value))


def parse_au_fields(path, line_number: int, fields: list[str]) -> FrameLabel:
  values = [_parse_number(path, line_number, f) for f in fields]
  bad = [f"{name}={v:g}" for name, v in zip(AU_NAMES, values) if v not in (0, 1, -1)]
  if bad:
    raise AnnotationError(path, line_number,
                          f"AU values must be 0, 1 or -1: {', '.join(bad)}")
  aus = np.array(values, np.int8)
  if np.all(aus == AU_INVALID):
    return FrameLabel(False, None)
  # A line may mark single AUs as -1: those stay masked out, the others are used.
  return FrameLabel(True, aus)


def _decode_line(path, line_number: int, raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise AnnotationError(path, line_number, f"not UTF-8 text ({e.reason} at byte "
                          f"{e.start} of the line)") from None


def _iter_file_lines(path) -> Iterator[str]:
  """Streams decoded lines without line endings: a BOM, CRLF and CR are tolerated,
  bytes that are not UTF-8 are an error naming the line."""
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
      # Lines end in \n, \r\n, or \r alone (then one raw line holds several).
      yield from _decode_line(path, line_number, raw).splitlines() or [""]


def _read_lines(path) -> list[str]:
  """All lines of a (small) per-task file; trailing blank lines dropped."""
  lines = list(_iter_file_lines(path))
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
      path, 1, f"unknown EXPR header {','.join(header_fields)!r}; expected "
      f"{','.join(EXPRESSION_NAMES_7)} or {','.join(EXPRESSION_NAMES_8)}")


def _check_header(path, task: str, header_fields: list[str]) -> int:
  """Validates the header of a per-task file; returns the number of classes (expr)."""
  if task == "expr":
    return expression_classes_in_header(path, header_fields)
  expected = {"va": VA_NAMES, "au": AU_NAMES}[task]
  if _header_names(header_fields) != tuple(n.lower() for n in expected):
    raise AnnotationError(path, 1, f"unknown {task.upper()} header "
                          f"{','.join(header_fields)!r}; expected {','.join(expected)}")
  return 0


def read_task_file(path, task: str) -> tuple[list[FrameLabel], int]:
  """Reads one per-task `<video>.txt`: labels for frames 1..N, and the EXPR class count.

  Line k+1 of the file is frame k; element k-1 of the returned list is frame k.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  lines = _read_lines(path)
  num_classes = _check_header(path, task, _normalised_fields(lines[0]))
  expected_columns = {"va": 2, "expr": 1, "au": len(AU_NAMES)}[task]
  labels = []
  for line_number, line in enumerate(lines[1:], start=2):
    fields = _normalised_fields(line)
    if len(fields) != expected_columns:
      raise AnnotationError(path, line_number,
                            f"expected {expected_columns} comma-separated values, "
                            f"found {len(fields)}: {line!r}")
    if task == "va":
      labels.append(parse_va_fields(path, line_number, fields))
    elif task == "expr":
      labels.append(parse_expression_field(path, line_number, fields[0], num_classes))
    else:
      labels.append(parse_au_fields(path, line_number, fields))
  return labels, num_classes


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
                          f"image path {image!r} must be '<video>/<frame>.jpg' inside "
                          "the release (no absolute paths, no '..')")
  return parts[0], parts[1]


def frame_number(path, line_number: int, image_name: str) -> int:
  stem = os.path.splitext(image_name)[0]
  if not stem.isdigit():
    raise AnnotationError(path, line_number,
                          f"image name {image_name!r} is not '<frame number>.jpg'")
  return int(stem)


def iter_mtl_file(path, num_expr_classes: int = 8) -> Iterator[MtlRow]:
  """Streams the rows of an s-Aff-Wild2 MTL file (ABAW3 `train_set.txt` or ABAW4+)."""
  lines_iter = _iter_file_lines(path)
  first = next(lines_iter, "")
  if not first.strip():
    raise AnnotationError(path, 1, "empty file (a header line is required)")
  header = _normalised_fields(first)
  if _header_names(header) != MTL_HEADER:
    raise AnnotationError(path, 1, f"unknown MTL header {','.join(header)!r}; "
                          f"expected {','.join(MTL_HEADER)}")
  for line_number, line in enumerate(lines_iter, start=2):
    if not line.strip():
      continue
    fields = _normalised_fields(line)
    if len(fields) != 4 + len(AU_NAMES):
      raise AnnotationError(path, line_number, f"expected {4 + len(AU_NAMES)} "
                            f"comma-separated fields, found {len(fields)}: {line!r}")
    video, image_name = check_relative_image_path(path, line_number, fields[0])
    labels = {
        "va": parse_va_fields(path, line_number, fields[1:3]),
        "expr": parse_expression_field(path, line_number, fields[3], num_expr_classes),
        "au": parse_au_fields(path, line_number, fields[4:]),
    }
    yield MtlRow(line_number, video, frame_number(path, line_number, image_name),
                 image_name, labels)
