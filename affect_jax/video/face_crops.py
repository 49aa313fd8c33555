"""Faces in a frame: dlib's HOG frontal face detector (it ships inside the `dlib-bin`
wheel: nothing is downloaded at run time), boxes, and crops aligned to 112x112.

Alignment, as in ABAW's `cropped_aligned` images: dlib's 5-point landmark model (the
outer and inner corners of both eyes and the base of the nose), which ships inside the
`face_recognition_models` package, finds the landmarks in the face's box; a similarity
transform (rotation, uniform scale, translation; a least-squares Umeyama fit) maps them
onto a fixed template in the 112x112 output, eyes level at the same height in every
frame, and the frame is warped by it (bilinear). `--align auto` (the default) aligns
when that package is installed, and otherwise warns once and cuts a square around the
detection, widened by a margin and resized to 112x112, without turning it; `--align`
(`always`) requires the package, `--noalign` (`never`) always cuts the square.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

from affect_jax.errors import InputError

FACE_SIZE = 112
MARGIN = 0.3  # of the detection's side, added on each side: brows, chin, jaw
MIN_SCORE = 0.5

ALIGN_CHOICES = ("auto", "always", "never")
# dlib's 5-point landmark model ships in this package (the 68-point model, a face
# recognition network and a CNN detector too, about 100 MB in all).
LANDMARK_MODEL_PACKAGE = "face_recognition_models"
LANDMARK_MODEL_FILE = ("models", "shape_predictor_5_face_landmarks.dat")
# dlib's template of the 5 points on the unit square (`get_face_chip_details` in
# dlib/image_transforms/interpolation.h), in the order of the model's parts: the
# subject's left eye (on the right in the image), outer then inner corner; the right
# eye, outer then inner corner; the base of the nose.
DLIB_5_POINT_TEMPLATE = np.array([[0.8595674595992, 0.2134981538014],
                                  [0.6460604764104, 0.2289674387677],
                                  [0.1205750620789, 0.2137274526848],
                                  [0.3340850613712, 0.2290642403242],
                                  [0.4901123135679, 0.6277975316475]])
# Where it is placed in the output, in fractions of the side: the eye centres level,
# EYE_DISTANCE apart, at EYE_HEIGHT, centred left to right. This is the framing of the
# usual 112x112 aligned faces (InsightFace's ArcFace template has its eye centres at
# (38.29, 51.70) and (73.53, 51.50) of 112x112); ABAW publishes no template of its own.
EYE_DISTANCE = 0.315
EYE_HEIGHT = 0.465


@dataclasses.dataclass(frozen=True)
class FaceBox:
  left: int
  top: int
  right: int  # exclusive
  bottom: int
  score: float

  @property
  def area(self) -> int:
    return max(0, self.right - self.left) * max(0, self.bottom - self.top)


def create_detector():
  try:
    import dlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InputError("face detection needs dlib: pip install dlib-bin") from None
  return dlib.get_frontal_face_detector()


def detect_faces(detector, image: np.ndarray, upsample: int = 0) -> list[FaceBox]:
  rects, scores, _ = detector.run(np.ascontiguousarray(image), upsample, 0.0)
  return [FaceBox(r.left(), r.top(), r.right() + 1, r.bottom() + 1, float(s))
          for r, s in zip(rects, scores)]


def largest_face(boxes: Sequence[FaceBox], min_score: float = MIN_SCORE
                 ) -> FaceBox | None:
  confident = [b for b in boxes if b.score >= min_score]
  return max(confident, key=lambda b: (b.area, b.score)) if confident else None


def find_face(detector, image: np.ndarray, min_score: float = MIN_SCORE
              ) -> tuple[FaceBox | None, int]:
  """The largest confident face and how many were found; faces under about 80 pixels
  need the image upsampled once, which costs 20 times more, so it is the second try."""
  for upsample in (0, 1):
    boxes = [b for b in detect_faces(detector, image, upsample) if b.score >= min_score]
    if boxes:
      return largest_face(boxes, min_score), len(boxes)
  return None, 0


def crop_face(image: np.ndarray, box: FaceBox, size: int = FACE_SIZE,
              margin: float = MARGIN) -> np.ndarray:
  """A square around the box, widened by `margin` of its side on each side, resized;
  parts outside the image are black."""
  side = max(box.right - box.left, box.bottom - box.top) * (1 + 2 * margin)
  centre_x, centre_y = (box.left + box.right) / 2, (box.top + box.bottom) / 2
  crop_box = tuple(int(round(v)) for v in (centre_x - side / 2, centre_y - side / 2,
                                           centre_x + side / 2, centre_y + side / 2))
  square = Image.fromarray(image).crop(crop_box)  # Pillow pads outside with black
  return np.asarray(square.resize((size, size), Image.BILINEAR))


def landmark_model_path() -> str | None:
  """The 5-point model's file in the installed `face_recognition_models`, or None.

  Found without importing the package: its `__init__` imports `pkg_resources`, which
  setuptools 81 and later no longer have."""
  spec = importlib.util.find_spec(LANDMARK_MODEL_PACKAGE)
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, *LANDMARK_MODEL_FILE)
    if os.path.isfile(path):
      return path
  return None


def create_landmark_predictor(align: str = "auto", model_path: str | None = None):
  """dlib's 5-point shape predictor, or None where faces are to be cut as squares:
  `align` "never", or "auto" without the model (with a warning). "always" without the
  model is an error that says what to install. `model_path` defaults to the model in
  `face_recognition_models`."""
  if align not in ALIGN_CHOICES:
    raise InputError(f"align must be one of {', '.join(ALIGN_CHOICES)}, not {align!r}")
  if align == "never":
    return None
  path = landmark_model_path() if model_path is None else model_path
  if path is None or not os.path.isfile(path):
    missing = (f"the landmark model {path} does not exist" if path is not None else
               f"the {LANDMARK_MODEL_PACKAGE} package is not installed")
    if align == "always":
      raise InputError(f"face alignment needs dlib's 5-point landmark model, and "
                        f"{missing}: pip install {LANDMARK_MODEL_PACKAGE}")
    warnings.warn(f"faces are not aligned, only cut as squares around the detections: "
                  f"{missing} (pip install {LANDMARK_MODEL_PACKAGE} to align them as "
                  "ABAW's cropped_aligned images are)", stacklevel=2)
    return None
  try:
    import dlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InputError("face alignment needs dlib: pip install dlib-bin") from None
  return dlib.shape_predictor(path)


def detect_landmarks(landmarks_predictor, image: np.ndarray, box: FaceBox
                     ) -> np.ndarray:
  """The model's points in the box, as [points, (x, y)] in pixels of the image."""
  import dlib  # pylint: disable=g-import-not-at-top
  shape = landmarks_predictor(np.ascontiguousarray(image), dlib.rectangle(
      box.left, box.top, box.right - 1, box.bottom - 1))
  return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """The similarity transform (rotation, uniform scale, translation; no reflection)
  that best maps the points `source` onto `target` in least squares, as a 2x3 matrix M:
  target ~ M[:, :2] @ source + M[:, 2] (Umeyama 1991)."""
  source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
  if source.ndim != 2 or source.shape[1] != 2 or source.shape != target.shape:
    raise ValueError(f"need two [points, 2] arrays of the same shape, got "
                     f"{source.shape} and {target.shape}")
  source_centred = source - source.mean(0)
  target_centred = target - target.mean(0)
  variance = (source_centred ** 2).sum() / len(source)
  if not variance > 1e-12:
    raise ValueError("the source points coincide: no transform fits them")
  covariance = target_centred.T @ source_centred / len(source)
  u, singular_values, vt = np.linalg.svd(covariance)
  signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rotation = u @ np.diag(signs) @ vt
  scale = (singular_values * signs).sum() / variance
  shift = target.mean(0) - scale * rotation @ source.mean(0)
  return np.hstack([scale * rotation, shift[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


@functools.lru_cache(maxsize=8)
def _landmark_template(size: int) -> np.ndarray:
  eyes = DLIB_5_POINT_TEMPLATE[[2, 0]] + DLIB_5_POINT_TEMPLATE[[3, 1]]  # x2: centres
  half = EYE_DISTANCE * size / 2
  centre = np.array([size / 2, EYE_HEIGHT * size]) - 0.5
  target = np.array([centre - (half, 0), centre + (half, 0)])
  template = apply_transform(umeyama(eyes / 2, target), DLIB_5_POINT_TEMPLATE)
  template.flags.writeable = False  # shared by every call
  return template


def landmark_template(size: int = FACE_SIZE) -> np.ndarray:
  """Where the 5 points go in the aligned `size` square, in pixels (pixel i's centre
  at i): dlib's template, moved, turned and scaled so that its eye centres are level,
  EYE_DISTANCE of the side apart, at EYE_HEIGHT, centred (computed once per size)."""
  return _landmark_template(size).copy()


def warp_to_square(image: np.ndarray, matrix: np.ndarray, size: int = FACE_SIZE
                   ) -> np.ndarray:
  """The `size` square that `matrix` (2x3, pixels of the image -> pixels of the output,
  pixel i's centre at i) maps the image onto: bilinear, black outside the image
  (OpenCV). Where it shrinks by 2 or more, blocks of pixels are averaged first
  (Pillow's reduce, then its bilinear transform), as bilinear sampling alone would
  alias."""
  matrix = np.asarray(matrix, np.float64)
  inverse = np.linalg.inv(matrix[:, :2])  # output -> image
  shift = -inverse @ matrix[:, 2]
  factor = int(np.sqrt(abs(np.linalg.det(inverse))))
  if factor < 2:
    # OpenCV samples the image in place (Pillow would copy the whole frame first),
    # with the same convention: pixel i's centre at i.
    import cv2  # pylint: disable=g-import-not-at-top
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
  source = Image.fromarray(image)
  corners = np.array([[0, 0], [0, size], [size, 0], [size, size]]) - 0.5
  reach = corners @ inverse.T + shift
  left, top = np.floor(reach.min(0)).astype(int) - factor
  right, bottom = np.ceil(reach.max(0)).astype(int) + factor
  source = source.crop((left, top, right, bottom)).reduce(factor)  # black outside
  # Pixel j of the reduced crop averages its pixels j * factor ... j * factor +
  # factor - 1: its centre lies at left + j * factor + (factor - 1) / 2 of the image.
  shift = (shift - (left, top) - (factor - 1) / 2) / factor
  inverse = inverse / factor
  # Pillow samples output pixel (x, y) at (x + 0.5, y + 0.5); pixel i spans [i, i+1].
  offset = shift + 0.5 - inverse @ (0.5, 0.5)
  data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1],
          offset[1])
  return np.asarray(source.transform((size, size), Image.AFFINE, data, Image.BILINEAR))


def alignment_matrix(landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
  """The similarity transform from the image's 5 landmarks to the template's."""
  return umeyama(landmarks, landmark_template(size))


def align_face(image: np.ndarray, box: FaceBox, landmarks_predictor,
               size: int = FACE_SIZE) -> np.ndarray:
  """The face in the box, aligned: its 5 landmarks -> a similarity transform onto the
  template -> the `size` x `size` square it maps the image onto."""
  landmarks = detect_landmarks(landmarks_predictor, image, box)
  return warp_to_square(image, alignment_matrix(landmarks, size), size)
