"""The Python API of face affect analysis: a trained run (or its export) as an
Analyzer that takes a photo, a video file or any stream of frames and gives one row
per (frame, face).

  from affect_jax.video import Analyzer
  analyzer = Analyzer.from_workdir("runs/mtl")
  analysis = analyzer.analyze_video("clip.mp4")
  analysis.rows             # FaceRow: frame, timestamp, face_id, box, probabilities, VA
  analysis.data_frame()     # the same as a pandas DataFrame (when pandas is installed)
  analysis.summary()        # per face: frames seen, mean VA, expression shares
  Analyzer.from_export("runs/mtl/export")  # the same from `affect-jax export`'s files
  Analyzer.from_export("runs/mtl/export", runtime="onnx")  # its model.onnx, onnxruntime
  analyzer.analyze_image(numpy_array_or_path)
  for row in analyzer.stream(webcam_frames): ...   # rows as soon as their batch is done

Frames stream through: decoded one at a time, faces detected every `detect_every`
frames and tracked between (affect_jax.video.tracking), aligned as ABAW's
cropped_aligned images (affect_jax.video.face_crops) and predicted in batches in memory
(affect_jax.video.batching). The `faces` command is a thin layer over this.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from affect_jax.errors import InputError
from affect_jax.inference import media_frames
# Sibling modules by their full names: the package's __init__ imports this module.
import affect_jax.video.batching as batching
import affect_jax.video.face_crops as face_crops
import affect_jax.video.rows as rows_lib
import affect_jax.video.tracking as tracking

log = logging.getLogger(__name__)

BATCH_SIZE = 32
JPEG_QUALITY = 95


@dataclasses.dataclass
class Analysis:
  """The faces of one input: rows ordered by frame then face id, and the time of every
  frame (faces or not), which the plots need for their gaps."""
  name: str
  path: str
  rows: list[rows_lib.FaceRow]
  frame_seconds: np.ndarray  # float64 [frames]
  detections_run: int = 0
  skipped_frames: int = 0  # frames that could not be read as images (streams)

  @property
  def frames(self) -> int:
    return len(self.frame_seconds)

  @property
  def face_ids(self) -> list[int]:
    return sorted({r.face_id for r in self.rows})

  def records(self) -> list[dict]:
    return [rows_lib.record(r) for r in self.rows]

  def data_frame(self):
    return rows_lib.data_frame(self.rows)

  def summary(self) -> dict:
    return {"name": self.name, "input": self.path, "frames": self.frames,
            "seconds": round(float(self.frame_seconds[-1]), 3) if self.frames else 0.0,
            "frames_with_face": len({r.frame for r in self.rows}),
            "most_faces_in_a_frame": int(max(np.bincount([r.frame for r in self.rows]),
                                             default=0)),
            "detections_run": self.detections_run,
            "skipped_frames": self.skipped_frames,
            "faces": [rows_lib.face_summary(face_rows) for face_rows in
                      rows_lib.rows_by_face(self.rows).values()]}


@dataclasses.dataclass(frozen=True)
class Model:
  """What predicts: uint8 [batch, size, size, 3] -> {"expression", "au", "va"} arrays
  (read back lazily), the size it takes, and how batches must be divisible."""
  predict: Callable[[np.ndarray], dict]
  image_size: int
  num_devices: int = 1
  au_thresholds: np.ndarray = dataclasses.field(
      default_factory=lambda: np.full(12, 0.5, np.float32))
  description: str = ""


def model_from_workdir(workdir: str, step: int | None = None, config=None,
                       devices=None, use_tuned_thresholds: bool = True,
                       batch_size: int = BATCH_SIZE, warm_up: bool = True) -> Model:
  """A run's checkpoint (default: the best, else the latest) on `devices` (default:
  all), with its tuned AU thresholds when they were tuned for that checkpoint.
  `warm_up`: the full batch compiled in a thread while the first faces are found."""
  from affect_jax import data_parallel  # pylint: disable=g-import-not-at-top
  from affect_jax.inference import restore, tuning  # pylint: disable=g-import-not-at-top
  config = restore.load_config(workdir, config)
  predictor = restore.restore_predictor(config, workdir, step, devices, batch_size)
  thresholds, origin = tuning.au_thresholds_for(workdir, predictor.step, 1,
                                                 use_tuned_thresholds)

  def predict(images: np.ndarray) -> dict:
    batch = data_parallel.device_batch({"image": images}, predictor.mesh)["image"]
    return predictor.predict_fn(predictor.state, batch)

  size = int(config.input.image_size)
  if warm_up:
    predict = compiled_in_background(
        predict, np.zeros((batching.padded_size(batch_size, batch_size,
                                                predictor.mesh.devices.size),
                           size, size, 3), np.uint8))
  return Model(predict, int(config.input.image_size), int(predictor.mesh.devices.size),
               thresholds, f"{workdir} step {predictor.step} (AU thresholds: {origin})")


RUNTIMES = ("jax", "onnx")


def model_from_export(out_dir: str, batch_size: int = BATCH_SIZE,
                      warm_up: bool = True, runtime: str = "jax") -> Model:
  """A model exported by `affect-jax export` (affect_jax.video.export): no training
  code, config or checkpoint needed. `runtime`: "jax" (model.jax_export) or "onnx"
  (model.onnx with onnxruntime, written by `affect-jax export --onnx`)."""
  import affect_jax.video.export as export  # pylint: disable=g-import-not-at-top
  if runtime not in RUNTIMES:
    raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
  if runtime == "onnx":
    return model_from_onnx(out_dir, export.load_metadata(out_dir))
  import jax  # pylint: disable=g-import-not-at-top
  exported, metadata = export.load_export(out_dir)
  predict = jax.jit(exported.call)
  size = int(metadata["image_size"])
  if warm_up:
    predict = compiled_in_background(predict, np.zeros((batch_size, size, size, 3),
                                                       np.uint8))
  return Model(predict, size, 1, np.asarray(metadata["au_thresholds"], np.float32),
               f"{out_dir} (jax.export of {metadata['workdir']} step "
               f"{metadata['step']})")


def model_from_onnx(out_dir: str, metadata: dict) -> Model:
  """OUT/model.onnx run by onnxruntime on the CPU (nothing to compile ahead)."""
  import affect_jax.video.onnx_export as onnx_export  # pylint: disable=g-import-not-at-top
  path = os.path.join(out_dir, onnx_export.ONNX_FILE)
  predict = onnx_export.session_predict(onnx_export.onnx_session(path))
  return Model(predict, int(metadata["image_size"]), 1,
               np.asarray(metadata["au_thresholds"], np.float32),
               f"{path} (ONNX of {metadata['workdir']} step {metadata['step']})")


def compiled_in_background(predict: Callable[[np.ndarray], dict],
                           example: np.ndarray) -> Callable[[np.ndarray], dict]:
  """`predict`, called once on `example` in a thread at once (XLA compiles without
  holding the GIL, so the host finds faces meanwhile); the first call waits for it, so
  the same shape is never compiled twice."""
  failure = []

  def compile_once():
    try:
      jax_block(predict(example))
    except Exception as error:  # pylint: disable=broad-except  # raised by the caller
      failure.append(error)

  # Not a daemon: the interpreter waits for it at exit (XLA aborts the process when
  # it is torn down in the middle of a compilation).
  thread = threading.Thread(target=compile_once, name="compile_predict")
  thread.start()

  def predict_after_warm_up(images: np.ndarray) -> dict:
    if thread.is_alive():
      thread.join()
    if failure:
      raise failure[0]
    return predict(images)

  return predict_after_warm_up


def jax_block(outputs: dict) -> None:
  for value in outputs.values():
    value.block_until_ready()


class Analyzer:
  """Faces found, tracked, aligned and predicted (see the module's doc)."""

  def __init__(self, model: Model, *, align: str = "auto",
               detect_every: int = tracking.DETECT_EVERY,
               min_score: float = face_crops.MIN_SCORE, batch_size: int = BATCH_SIZE,
               reidentify: bool = True):
    self.model = model
    self.detector = face_crops.create_detector()
    self.landmarks_predictor = face_crops.create_landmark_predictor(align)
    self.reidentifier = tracking.create_reidentifier(
        reidentify and self.landmarks_predictor is not None)
    self.detect_every = detect_every
    self.min_score = min_score
    self.batch_size = batch_size

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, config=None,
                   devices=None, use_tuned_thresholds: bool = True,
                   batch_size: int = BATCH_SIZE, **options) -> "Analyzer":
    """`options`: align ("auto", "always", "never"), detect_every, min_score,
    reidentify."""
    model = model_from_workdir(workdir, step, config, devices, use_tuned_thresholds,
                               batch_size)
    return cls(model, batch_size=batch_size, **options)

  @classmethod
  def from_export(cls, out_dir: str, *, batch_size: int = BATCH_SIZE,
                  runtime: str = "jax", **options) -> "Analyzer":
    """A model written by `affect-jax export`, run by JAX (runtime="jax") or, from
    its model.onnx, by onnxruntime (runtime="onnx"); `options` as from_workdir's."""
    return cls(model_from_export(out_dir, batch_size, runtime=runtime),
               batch_size=batch_size, **options)

  @property
  def aligned(self) -> bool:
    return self.landmarks_predictor is not None

  def tracker(self, upsample=(0,)) -> tracking.FaceTracker:
    return tracking.FaceTracker(
        self.detector, self.landmarks_predictor, detect_every=self.detect_every,
        min_score=self.min_score, upsample=upsample, reidentifier=self.reidentifier)

  def crop(self, image: np.ndarray, face: tracking.TrackedFace) -> np.ndarray:
    """The face as the model takes it: aligned by its landmarks (or a square around
    its box) at 112, then resized to the model's size as the evaluation pipeline
    resizes."""
    if face.aligned is not None:
      crop = face.aligned
    elif face.landmarks is not None:
      crop = face_crops.warp_to_square(image, face_crops.alignment_matrix(face.landmarks))
    elif self.landmarks_predictor is not None:
      crop = face_crops.align_face(image, face.box, self.landmarks_predictor)
    else:
      crop = face_crops.crop_face(image, face.box)
    size = self.model.image_size
    if crop.shape[0] != size:
      crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return crop

  def stream(self, frames: Iterable, name: str = "stream", *,
             fps: float | None = None, crops_dir: str | None = None,
             tracker: tracking.FaceTracker | None = None,
             counts: dict | None = None) -> Iterator[rows_lib.FaceRow]:
    """Rows of a stream of frames as soon as their batch is predicted (a batch waits
    for `batch_size` faces). Frames: media_frames.Frame, or arrays (RGB, grey or RGBA;
    uint8, uint16 or floats in [0, 1]) timed by `fps`, else by the clock. A frame that
    is not an image is counted in counts["skipped_frames"] and passed over.
    `crops_dir`: each crop also saved as crops_dir/<name>_face<id>/<frame>.jpg."""
    tracker = tracker or self.tracker()
    counts = {} if counts is None else counts
    counts.setdefault("skipped_frames", 0)
    counts.setdefault("frame_seconds", [])
    batcher = batching.CropBatcher(self.model.predict, self.batch_size,
                                   self.model.num_devices)
    started = time.monotonic()
    for index, item in enumerate(frames):
      frame = as_frame(item, index, fps, started)
      if frame is None:
        counts["skipped_frames"] += 1
        log.warning("%s: frame %d is not an image: skipped", name, index + 1)
        continue
      counts["frame_seconds"].append(frame.seconds)
      for face in tracker.update(frame.image):
        crop = self.crop(frame.image, face)
        if crops_dir is not None:
          save_crop(crops_dir, name, face.face_id, frame.number, crop)
        key = (frame, face)
        for done, outputs in batcher.add(key, crop):
          yield self.row(name, *done, outputs)
    for done, outputs in batcher.finish():
      yield self.row(name, *done, outputs)
    counts["detections_run"] = tracker.detections_run

  def row(self, name: str, frame: media_frames.Frame, face: tracking.TrackedFace,
          outputs: dict) -> rows_lib.FaceRow:
    box = face.box
    au = outputs.get("au")
    return rows_lib.FaceRow(
        name, frame.number, frame.seconds, face.face_id,
        (box.left, box.top, box.right, box.bottom), box.score, face.detected,
        expression=outputs.get("expression"), au=au,
        au_present=None if au is None else (au >= self.model.au_thresholds).astype(
            np.int8),
        va=outputs.get("va"))

  def analyze_frames(self, frames: Iterable, name: str = "stream", *,
                     fps: float | None = None, crops_dir: str | None = None,
                     path: str = "", upsample=(0,)) -> Analysis:
    """All rows of a stream of frames (a webcam, a generator of arrays, a list)."""
    counts: dict = {}
    rows = list(self.stream(frames, name, fps=fps, crops_dir=crops_dir,
                            tracker=self.tracker(upsample), counts=counts))
    rows.sort(key=lambda r: (r.frame, r.face_id))
    if not counts["frame_seconds"]:
      raise InputError(f"{path or name}: has no frames" +
                       (f" ({counts['skipped_frames']} were not images)"
                        if counts["skipped_frames"] else ""))
    return Analysis(name, path, rows, np.asarray(counts["frame_seconds"], np.float64),
                    counts.get("detections_run", 0), counts["skipped_frames"])

  def analyze_video(self, path: str, name: str | None = None, *,
                    crops_dir: str | None = None) -> Analysis:
    """A video, animation or photo file, read one frame at a time. A still photo (one
    frame) is searched again at twice its size when no face is found."""
    name = name or os.path.splitext(os.path.basename(path))[0] or "input"
    frames = media_frames.iter_frames(path)
    first = next(frames, None)
    if first is None:
      raise InputError(f"{path}: has no frames")
    second = next(frames, None)
    upsample = (0, 1) if second is None else (0,)
    chain = [first] + ([] if second is None else [second])
    return self.analyze_frames(_chained(chain, frames), name, crops_dir=crops_dir,
                               path=path, upsample=upsample)

  def analyze_image(self, image, name: str | None = None) -> Analysis:
    """A photo: a path, or an array (RGB, grey or RGBA; uint8, uint16, floats in
    [0, 1]); the detector looks again at twice the size when it finds no face."""
    if isinstance(image, (str, os.PathLike)):
      return self.analyze_video(os.fspath(image), name)
    pixels = media_frames.as_rgb8(image)
    height, width = pixels.shape[:2]
    media_frames.check_frame_size(name or "the image", width, height)
    return self.analyze_frames([media_frames.Frame(1, 0.0, pixels)], name or "image",
                               upsample=(0, 1))


def _chained(first: list, rest: Iterator) -> Iterator:
  yield from first
  yield from rest


def as_frame(item, index: int, fps: float | None, started: float
             ) -> media_frames.Frame | None:
  """A Frame from a stream's item; None when the item is not an image."""
  if isinstance(item, media_frames.Frame):
    return item
  try:
    pixels = media_frames.as_rgb8(item)
  except (InputError, TypeError, ValueError):
    return None
  seconds = index / fps if fps else time.monotonic() - started
  return media_frames.Frame(index + 1, seconds, pixels)


def save_crop(crops_dir: str, name: str, face_id: int, frame: int,
              crop: np.ndarray) -> str:
  """crops_dir/<name>_face<id>/<frame>.jpg: the cropped_aligned layout, one folder per
  face, which `affect-jax predict` reads as one video per face."""
  folder = os.path.join(crops_dir, f"{name}_face{face_id}")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{frame:05d}.jpg")
  cv2.imwrite(path, cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
              [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  return path
