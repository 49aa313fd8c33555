"""Affect of every face in any image or video: detect, track, align to 112x112,
predict in batches, write a CSV, a summary and a plot per face (the faces command).

  affect-jax faces --workdir runs/mtl --input clip.mp4 --input photo.jpg \\
      --out OUT [--detect_every 10] [--smooth_window 5] [--align | --noalign]
      [--save_crops]
  affect-jax faces --export runs/mtl_export [--runtime onnx] --input clip.mp4 --out OUT
      (a model written by `affect-jax export`, without the training run)
  (or python -m affect_jax.inference.faces ...)

The command is a thin layer over the Python API, affect_jax.video.Analyzer, which
streams each input's frames, finds faces every `--detect_every` frames with dlib's HOG
frontal face detector (it ships inside the `dlib-bin` wheel: nothing is downloaded at
run time) and follows them between detections, each face with an id of its own
(affect_jax.video.tracking). Detections scoring below `--min_score` are ignored (with
upsampling the detector also returns weak false positives, about 0.1, where clear faces
score above 1). A frame without a face has no row, and shows as a gap in the plots.

Alignment and detection: affect_jax.video.face_crops.

Outputs (docs/VIDEO.md): `OUT/faces.csv` (one row per frame and face: time, face id,
box, detection score, expression and AU probabilities and decisions, valence,
arousal), `OUT/summary.json` (per input and face: frames seen, mean VA, expression
shares; inputs skipped and why), `OUT/<name>_face<id>.png` (that face over time in
seconds), and with `--save_crops` `OUT/cropped_aligned/<name>_face<id>/<frame>.jpg`.
An input that cannot be read or shows no face is reported and skipped; the others are
analysed. Inputs are read by affect_jax.inference.media_frames.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

from absl import flags

from affect_jax import cli, cli_logging, host_setup
from affect_jax.errors import InputError
from affect_jax.inference.affect_plots import plot_faces
from affect_jax.inference.media_frames import read_frames  # noqa: F401  (kept for callers)

from affect_jax.video.face_crops import (  # noqa: F401  (the command's callers)
  ALIGN_CHOICES,
  align_face,
  alignment_matrix,
  apply_transform,
  create_detector,
  create_landmark_predictor,
  crop_face,
  detect_faces,
  detect_landmarks,
  DLIB_5_POINT_TEMPLATE,
  EYE_DISTANCE,
  EYE_HEIGHT,
  FACE_SIZE,
  FaceBox,
  find_face,
  LANDMARK_MODEL_FILE,
  LANDMARK_MODEL_PACKAGE,
  landmark_model_path,
  landmark_template,
  largest_face,
  MARGIN,
  MIN_SCORE,
  umeyama,
  warp_to_square,
)

log = logging.getLogger(__name__)

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


def analyse_media(workdir: str | None, inputs: Sequence[str], out_dir: str, *,
                  config=None, step: int | None = None, smooth_window: int = 1,
                  use_tuned_thresholds: bool = True, min_score: float = MIN_SCORE,
                  align: str = "auto", devices=None, detect_every: int | None = None,
                  batch_size: int | None = None, save_crops: bool = False,
                  analyzer=None, export_dir: str | None = None,
                  runtime: str = "jax") -> dict:
  """Every face of each input -> OUT/faces.csv, a plot per face, OUT/summary.json
  (returned), predicted by the training run in `workdir` or by the export in
  `export_dir` (run by `runtime`, "jax" or "onnx"). An input that cannot be read, or
  shows no face, is skipped and listed under "skipped"; when no input has a face, that
  is an InputError."""
  # pylint: disable=g-import-not-at-top
  import affect_jax.video.analyzer as analyzer_lib
  import affect_jax.video.rows as rows_lib
  import affect_jax.video.tracking as tracking
  if not inputs:
    raise InputError("no input image or video given (--input)")
  if smooth_window < 1 or smooth_window % 2 == 0:  # frame_table.check_window's rule:
    # that module is imported only to smooth (it brings the input pipeline with it)
    raise InputError(f"--smooth_window must be a positive odd number of frames, got "
                     f"{smooth_window}")
  if analyzer is None and (workdir is None) == (export_dir is None):
    raise InputError("give the model as --workdir (a training run) or --export (a "
                     "folder `affect-jax export` wrote), one of the two")
  os.makedirs(out_dir, exist_ok=True)
  if analyzer is None:
    options = {"batch_size": batch_size or analyzer_lib.BATCH_SIZE, "align": align,
               "min_score": min_score,
               "detect_every": detect_every or tracking.DETECT_EVERY}
    analyzer = (analyzer_lib.Analyzer.from_export(export_dir, runtime=runtime, **options)
                if export_dir else analyzer_lib.Analyzer.from_workdir(
                    workdir, step=step, config=config, devices=devices,
                    use_tuned_thresholds=use_tuned_thresholds, **options))
  crops_dir = os.path.join(out_dir, "cropped_aligned") if save_crops else None
  summary = {"model": analyzer.model.description, "smooth_window": smooth_window,
             "aligned": analyzer.aligned, "detect_every": analyzer.detect_every,
             "inputs": [], "skipped": []}
  all_rows = []
  for path, name in zip(inputs, unique_names(inputs)):
    try:
      analysis = analyzer.analyze_video(path, name, crops_dir=crops_dir)
    except InputError as error:
      log.warning("skipped: %s", error)
      summary["skipped"].append({"input": path, "reason": str(error)})
      continue
    if not analysis.rows:
      reason = (f"{path}: no face found in its {analysis.frames} frame(s) (dlib's "
                "frontal face detector finds faces of about 40 pixels and more, turned "
                "less than about 45 degrees)")
      log.warning("skipped: %s", reason)
      summary["skipped"].append({"input": path, "reason": reason})
      continue
    analysis.rows = rows_lib.smooth_rows(analysis.rows, smooth_window)
    all_rows += analysis.rows
    summary["inputs"].append({**analysis.summary(),
                              "plots": plot_faces(out_dir, analysis)})
  if not all_rows:
    raise InputError("no face in any input: " + "; ".join(
        s["reason"] for s in summary["skipped"]))
  summary["csv"] = rows_lib.write_csv(os.path.join(out_dir, "faces.csv"), all_rows)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "The training run's folder (or --export).",
                      flag_values=flag_values)
  flags.DEFINE_string("export", None, "A folder written by `affect-jax export`, run "
                      "instead of a training run.", flag_values=flag_values)
  flags.DEFINE_enum("runtime", "jax", ("jax", "onnx"), "With --export: run its "
                    "model.jax_export with JAX, or its model.onnx with onnxruntime.",
                    flag_values=flag_values)
  flags.DEFINE_multi_string("input", None, "An image or video (repeat for several).",
                            flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best, else latest).",
                       flag_values=flag_values)
  flags.DEFINE_integer("smooth_window", 1, "Centred moving average over this many "
                       "frames per face (odd; 1: none).", flag_values=flag_values)
  flags.DEFINE_float("min_score", MIN_SCORE, "Detections scoring below this are "
                     "ignored.", flag_values=flag_values)
  flags.DEFINE_integer("detect_every", 10, "Run the face detector every this many "
                       "frames (and when a tracked face is lost); faces are tracked "
                       "between.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 32, "Faces predicted together.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_bool("save_crops", False, "Also write each face crop as "
                    "OUT/cropped_aligned/<name>_face<id>/<frame>.jpg.",
                    flag_values=flag_values)
  flags.DEFINE_bool("compilation_cache", True, "Keep the compiled model between runs "
                    "(in $AFFECT_JAX_CACHE/jax, default ~/.cache/affect_jax/jax).",
                    flag_values=flag_values)
  flags.DEFINE_bool("tuned_au_thresholds", True, "Use <workdir>/au_thresholds.json "
                    "when it was tuned for this checkpoint.", flag_values=flag_values)
  flags.DEFINE_enum("align", "auto", ALIGN_CHOICES, "Align faces by their landmarks: "
                    f"auto where {LANDMARK_MODEL_PACKAGE} is installed; --align alone: "
                    "always; --noalign: never (a square around each face).",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["input", "out"], flag_values=flag_values)


def expand_align_shorthands(argv: Sequence[str]) -> list[str]:
  """`--align` without a value is `--align=always` and `--noalign` `--align=never`
  (absl's enum flags take a value)."""
  expanded = []
  for i, arg in enumerate(argv):
    if arg == "--noalign":
      arg = "--align=never"
    elif arg == "--align" and (i + 1 == len(argv) or argv[i + 1] not in ALIGN_CHOICES):
      arg = "--align=always"
    expanded.append(arg)
  return expanded


def enable_compilation_cache() -> str:
  """The model's programs kept between runs (compiling them is seconds of a short
  video's analysis): in $JAX_COMPILATION_CACHE_DIR when set, else
  $AFFECT_JAX_CACHE/jax (default ~/.cache/affect_jax/jax)."""
  import jax  # pylint: disable=g-import-not-at-top
  folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.environ.get("AFFECT_JAX_CACHE") or os.path.join(
          os.path.expanduser("~"), ".cache", "affect_jax"), "jax")
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder


def main(argv: Sequence[str] | None = None) -> int:
  argv = expand_align_shorthands(sys.argv[1:] if argv is None else argv)
  args, _ = cli.parse_flags(argv, define_flags, __doc__)
  cli_logging.start_console_logging()
  host_setup.prepare_before_jax()  # before JAX starts its threads
  if args.compilation_cache:
    enable_compilation_cache()
  summary = analyse_media(args.workdir, args.input, args.out, step=args.step,
                          smooth_window=args.smooth_window,
                          use_tuned_thresholds=args.tuned_au_thresholds,
                          min_score=args.min_score, align=args.align,
                          detect_every=args.detect_every, batch_size=args.batch_size,
                          save_crops=args.save_crops, export_dir=args.export,
                          runtime=args.runtime)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
