"""Affect of the faces in any image or video: detect, crop to 112x112, predict per
frame with a trained run, write a CSV and plots.

  python -m affect_jax.faces --workdir runs/mtl --input clip.gif --input photo.jpg \
      --out OUT [--smooth_window 5]

Faces are found by dlib's HOG frontal face detector, which ships inside the `dlib-bin`
wheel (nothing is downloaded at run time). dlib-bin ships no landmark model, so a face
is not aligned by its eyes as ABAW's `cropped_aligned` images are: it is cut as a
square around the detection, widened by a margin, and resized to 112x112. In a frame
with several faces the largest is kept (detections scoring below `--min_score` are
ignored first: with upsampling, the detector also returns weak false positives, about
0.1, where clear faces score above 1). A frame without a face is left out, as ABAW
leaves it out, and shows as a gap in the plots.

Outputs: `OUT/cropped_aligned/<name>/<frame>.jpg` (the crops), `OUT/faces.csv` (the box
of each frame), `OUT/predictions.csv` (as affect_jax.predict writes it), and per input
`OUT/<name>.png` (valence/arousal over time, expression timeline, AU heat map).
Images and animations (GIF, APNG, multi-page TIFF, WebP) are read with Pillow; other
videos (mp4, avi, ...) with imageio, which needs `imageio-ffmpeg` for them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import logging
import os
import sys
import warnings
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

log = logging.getLogger(__name__)

FACE_SIZE = 112
MARGIN = 0.3  # of the detection's side, added on each side: brows, chin, jaw
MIN_SCORE = 0.5
JPEG_QUALITY = 95


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


def read_frames(path: str) -> Iterator[np.ndarray]:
  """RGB uint8 frames of an image, an animation or a video, one at a time."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with Image.open(path) as image:
      for frame in ImageSequence.Iterator(image):
        yield np.asarray(frame.convert("RGB"))
    return
  except UnidentifiedImageError:
    pass  # not an image: perhaps a video
  except (OSError, ValueError, SyntaxError) as error:
    raise ValueError(f"{path}: cannot read the image: {error}") from None
  yield from _video_frames(path)


def _video_frames(path: str) -> Iterator[np.ndarray]:
  try:
    import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path}: not an image Pillow can read; reading videos needs "
                     "imageio (pip install imageio imageio-ffmpeg)") from None
  try:
    frames = iio.imiter(path)
    with warnings.catch_warnings():  # imageio's plugin search warns of its deprecations
      warnings.simplefilter("ignore", DeprecationWarning)
      first = next(frames, None)
    for frame in itertools.chain([] if first is None else [first], frames):
      frame = np.asarray(frame)
      if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
      yield np.ascontiguousarray(frame[..., :3]).astype(np.uint8)
  except Exception as error:  # pylint: disable=broad-except  # plugins raise anything
    raise ValueError(f"{path}: cannot read as an image or a video: {error}") from None


def create_detector():
  try:
    import dlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("face detection needs dlib: pip install dlib-bin") from None
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


@dataclasses.dataclass
class MediaFaces:
  """What extract_faces found in one input."""
  path: str
  name: str
  frames: int = 0
  boxes: dict = dataclasses.field(default_factory=dict)  # frame -> (FaceBox, found)


def crop_path(crops_root: str, name: str, frame: int) -> str:
  return os.path.join(crops_root, name, f"{frame:05d}.jpg")


def extract_faces(path: str, name: str, crops_root: str, detector,
                  min_score: float = MIN_SCORE) -> MediaFaces:
  """Writes the face crop of every frame with a face as `crops_root/name/%05d.jpg`
  (frames numbered from 1, as in ABAW)."""
  result = MediaFaces(path, name)
  os.makedirs(os.path.join(crops_root, name), exist_ok=True)
  for frame_number, image in enumerate(read_frames(path), start=1):
    result.frames = frame_number
    box, found = find_face(detector, image, min_score)
    if box is None:
      continue
    if found > 1:
      log.info("%s frame %d: %d faces, kept the largest", path, frame_number, found)
    Image.fromarray(crop_face(image, box)).save(
        crop_path(crops_root, name, frame_number), quality=JPEG_QUALITY)
    result.boxes[frame_number] = (box, found)
  if result.frames == 0:
    raise ValueError(f"{path}: has no frames")
  if not result.boxes:
    raise ValueError(f"{path}: no face found in its {result.frames} frame(s) (dlib's "
                     "frontal face detector finds faces of about 40 pixels and more, "
                     "turned less than about 45 degrees)")
  return result


def unique_names(paths: Sequence[str]) -> list[str]:
  """File stems, made unique (`clip`, `clip_2`) so that each input has its folder."""
  names, used = [], set()
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0] or "input"
    name, k = stem, 2
    while name in used:
      name, k = f"{stem}_{k}", k + 1
    used.add(name)
    names.append(name)
  return names


def write_faces_csv(path: str, found: Sequence[MediaFaces]) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "input", "frame", "left", "top", "right", "bottom",
                     "score", "faces_found"])
    for media in found:
      for frame, (box, count) in sorted(media.boxes.items()):
        writer.writerow([media.name, media.path, frame, box.left, box.top, box.right,
                         box.bottom, f"{box.score:.3f}", count])
  return path


def timeline(values: np.ndarray, frames: np.ndarray, num_frames: int) -> np.ndarray:
  """Rows of values per frame 1..num_frames, NaN where a frame has no face."""
  result = np.full((num_frames,) + values.shape[1:], np.nan)
  result[np.asarray(frames) - 1] = values
  return result


def plot_affect(path: str, title: str, table, rows: np.ndarray, num_frames: int
                ) -> str:
  """VA over time, expression probabilities and AU probabilities as heat maps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from affect_jax import predict  # pylint: disable=g-import-not-at-top
  from tfds_affwild2 import annotations  # pylint: disable=g-import-not-at-top
  frames = table.frame[rows]
  panels = [name for name in ("va", "expression", "au")
            if getattr(table, name) is not None]
  # Constrained layout keeps the panels' time axes aligned beside the colour bar.
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)),
                           sharex=True, squeeze=False, layout="constrained")
  x = np.arange(1, num_frames + 1)
  extent = (0.5, num_frames + 0.5)
  for ax, panel in zip(axes[:, 0], panels):
    if panel == "va":
      va = timeline(table.va[rows], frames, num_frames)
      ax.plot(x, va[:, 0], label="valence", marker="." if num_frames < 50 else None)
      ax.plot(x, va[:, 1], label="arousal", marker="." if num_frames < 50 else None)
      ax.set(ylim=(-1.05, 1.05), ylabel="VA")
      ax.axhline(0, color="grey", lw=0.5)
      ax.legend(loc="upper right", fontsize=8)
    elif panel == "expression":
      probabilities = timeline(table.expression[rows], frames, num_frames)
      names = predict.expression_names(probabilities.shape[1])
      ax.imshow(probabilities.T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                interpolation="nearest", extent=(*extent, len(names) - 0.5, -0.5))
      predicted = np.where(np.isnan(probabilities[:, 0]), np.nan,
                           np.argmax(np.nan_to_num(probabilities, nan=-1), 1))
      ax.plot(x, predicted, "w.", ms=3)  # the predicted class of each frame
      ax.set(yticks=range(len(names)), ylabel="expression")
      ax.set_yticklabels(names, fontsize=7)
    else:
      probabilities = timeline(table.au[rows], frames, num_frames)
      image = ax.imshow(probabilities.T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                        interpolation="nearest",
                        extent=(*extent, len(annotations.AU_NAMES) - 0.5, -0.5))
      ax.set(yticks=range(len(annotations.AU_NAMES)), ylabel="AU probability")
      ax.set_yticklabels(annotations.AU_NAMES, fontsize=7)
      fig.colorbar(image, ax=axes[:, 0].tolist(), pad=0.01, fraction=0.03,
                   label="probability")
  axes[-1, 0].set_xlabel("frame")
  axes[-1, 0].set_xlim(*extent)
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def analyse_media(workdir: str, inputs: Sequence[str], out_dir: str, *, config=None,
                  step: int | None = None, smooth_window: int = 1,
                  use_tuned_thresholds: bool = True, min_score: float = MIN_SCORE,
                  devices=None) -> dict:
  """Faces of each input -> per-frame predictions of the run's checkpoint -> CSVs and
  one plot per input; returns a summary (also written as OUT/summary.json)."""
  from affect_jax import predict  # pylint: disable=g-import-not-at-top
  if not inputs:
    raise ValueError("no input image or video given")
  predict.check_window(smooth_window)
  config = predict.load_config(workdir, config)
  detector = create_detector()
  crops_root = os.path.join(out_dir, "cropped_aligned")
  found = [extract_faces(path, name, crops_root, detector, min_score)
           for path, name in zip(inputs, unique_names(inputs))]
  predictor = predict.restore_predictor(config, workdir, step, devices)
  # Items from what was found now, not a listing: crops of an earlier run in the same
  # --out are not predicted again.
  items = [predict.ImageItem(media.name, frame, crop_path(crops_root, media.name, frame),
                             media.path)
           for media in found for frame in sorted(media.boxes)]
  data = predict.ImageFiles(items, config.input.image_size, crops_root)
  table = predict.predict_frames(predictor, data).sorted_by_video_and_frame()
  thresholds, origin = predict.au_thresholds_for(workdir, predictor.step, 1,
                                                 use_tuned_thresholds)
  table = predict.smooth_table(table, smooth_window)
  predict.write_predictions_csv(os.path.join(out_dir, "predictions.csv"), table,
                                thresholds)
  write_faces_csv(os.path.join(out_dir, "faces.csv"), found)
  summary = {"step": predictor.step, "au_thresholds_from": origin,
             "smooth_window": smooth_window, "inputs": []}
  for media in found:
    rows = np.flatnonzero(table.video == media.name)
    plot = plot_affect(os.path.join(out_dir, f"{media.name}.png"), media.path, table,
                       rows, media.frames)
    summary["inputs"].append({"input": media.path, "name": media.name,
                              "frames": media.frames, "frames_with_face": len(rows),
                              "frames_with_several_faces": sum(
                                  c > 1 for _, c in media.boxes.values()),
                              "plot": plot})
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's folder")
  parser.add_argument("--input", action="append", required=True,
                      help="an image or video (repeat for several)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--smooth_window", type=int, default=1)
  parser.add_argument("--min_score", type=float, default=MIN_SCORE)
  parser.add_argument("--no_tuned_au_thresholds", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  from affect_jax import cli_logging  # pylint: disable=g-import-not-at-top
  cli_logging.quiet_library_logs()
  try:
    summary = analyse_media(args.workdir, args.input, args.out, step=args.step,
                            smooth_window=args.smooth_window,
                            use_tuned_thresholds=not args.no_tuned_au_thresholds,
                            min_score=args.min_score)
  except (ValueError, FileNotFoundError, ImportError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
