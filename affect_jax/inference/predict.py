"""Per-frame predictions from a run's checkpoint, and the ABAW deliverables: the predict
and tune commands.

  # predict a TFDS split, a cropped_aligned-style folder, or an ABAW test list
  affect-jax predict --workdir runs/mtl --source tfds:validation --out OUT
  affect-jax predict --workdir runs/mtl --source folder:/data/cropped_aligned --out OUT
  affect-jax predict --workdir runs/mtl --source list:/data/test_set.txt \\
      --image_root /data/cropped_aligned --image_root /data/cropped_aligned_new_50_vids \\
      --test_list /data/CVPR_6th_ABAW_Expr_test_set_sample.txt \\
      --formats mtl,image_location,per_video --out OUT
  # the built test split (the union of the release's lists), one submission per list
  affect-jax predict --workdir runs/mtl --source tfds:test --out OUT --formats mtl \\
      --test_list /data/test_set.txt --test_list /data/CVPR_6th_..._sample.txt
  # tune per-AU thresholds on validation (writes runs/mtl/au_thresholds.json, which
  # later predictions use) and measure temporal smoothing windows
  affect-jax tune --workdir runs/mtl --smooth_windows 1,5,9,15

`python -m affect_jax.inference.predict [--mode tune] ...` runs the same commands.
The config is the run's own `<workdir>/config.json` unless `--config FILE` is given
(then `--config.x=...` overrides work as in `affect-jax train`). The checkpoint is the
best one (else the latest) unless `--step`; it is restored onto the devices present
now, whatever number of devices wrote it.

Outputs under --out: `predictions.csv` (one row per face frame, sorted by video and
frame), `summary.json` (step, thresholds, smoothing, counts, N of each video and where
it came from, and, for a labelled TFDS split, the scores before/after thresholds and
smoothing) and `submission/<format>/` (for the source list, or the table's videos),
`submission/<list name>/<format>/` for each --test_list. Submissions cover every frame
1..N of every listed video (docs/SUBMISSIONS.md).
Predictions are held in host memory (smoothing needs each video's frames together, and
TFDS stores records shuffled): about 300 bytes a frame with labels or image paths,
300 MB for a million frames."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

import jax
import numpy as np
from absl import flags

from affect_jax import cli, cli_logging, host_setup
from affect_jax.inference import abaw_lists, submission
from affect_jax.inference.frame_table import (
  FrameTable,
  check_window,
  predict_frames,
  smooth_table,
  table_scores,
)
from affect_jax.errors import InputError
from affect_jax.inference.outputs import (
  plan_submissions,
  plot_videos,
  write_predictions_csv,
  write_submissions,
)
from affect_jax.inference.restore import load_config, restore_predictor
from affect_jax.inference.sources import open_source
from affect_jax.inference.tuning import (
  au_thresholds_for,
  format_tuning_report,
  run_tuning,
)

log = logging.getLogger(__name__)

PREDICT_DOC = """affect-jax predict: per-frame predictions of a run's checkpoint for a TFDS
split, a cropped_aligned-style folder or an ABAW test list; CSV, plots, summary and
submission files under --out.

  affect-jax predict --workdir runs/mtl --source tfds:validation --out OUT
  affect-jax predict --workdir runs/mtl --source list:/data/test_set.txt \\
      --image_root /data/cropped_aligned --formats mtl,image_location,per_video --out OUT

The config is the run's config.json unless --config FILE (with --config.x=value
overrides); the checkpoint the best, else the latest, unless --step.
"""
TUNE_DOC = """affect-jax tune: per-AU decision thresholds tuned on a labelled split
(written to <workdir>/au_thresholds.json, which predict then uses) and the scores of
temporal smoothing windows.

  affect-jax tune --workdir runs/mtl --smooth_windows 1,5,9,15 [--split validation]
"""
CONFIG_HELP = ("Config file (default: the run's config.json); --config.x=value "
               "overrides a field.")


def labelled_scores(table: FrameTable, smoothed: FrameTable, num_expr_classes: int,
                    thresholds) -> dict:
  """Scores before and after the AU thresholds and the smoothing, for the summary."""
  pick = lambda s: {k: v for k, v in s.items() if isinstance(v, float)}  # noqa: E731
  return {"raw": pick(table_scores(table, num_expr_classes)),
          "thresholds": pick(table_scores(table, num_expr_classes, thresholds)),
          "thresholds_and_smoothing": pick(table_scores(smoothed, num_expr_classes,
                                                        thresholds))}


def run_prediction(config, workdir: str, source: str, out_dir: str, *,
                   step: int | None = None, image_roots: Sequence[str] = (),
                   use_tuned_thresholds: bool = True, smooth_window: int = 1,
                   smooth_au: bool = False, formats: Sequence[str] = (),
                   frame_counts: dict | None = None, test_lists: Sequence[str] = (),
                   video_dir: str | None = None, fill: str = "previous",
                   au_set: str = "abaw", devices=None, batch_size: int | None = None,
                   plot_video_count: int = 4, temporal_workdir: str | None = None) -> dict:
  """Predicts every face frame of `source`, writes the CSV, the submissions, plots of
  the first `plot_video_count` videos and summary.json into out_dir; returns the
  summary. With `temporal_workdir`, the temporal run there (affect-jax temporal, over
  the embeddings of a frame run) predicts the frames, `step` being its checkpoint."""
  check_window(smooth_window)  # before minutes of prediction, not after
  unknown = [f for f in formats if f not in submission.FORMATS]
  if unknown:
    raise InputError(f"--formats: unknown submission formats {unknown}; expected some "
                     f"of {submission.FORMATS}")
  if fill not in submission.FILL_RULES:
    raise InputError(f"--fill {fill!r}: expected one of {submission.FILL_RULES}")
  if au_set not in submission.AU_SETS:
    raise InputError(f"--au_set {au_set!r}: expected one of {sorted(submission.AU_SETS)}")
  if "mtl" in formats and set(config.model.tasks) != {"expression", "au", "va"}:
    raise InputError(f"the mtl submission needs all three tasks; the model has "
                     f"{', '.join(config.model.tasks)}")
  if test_lists and not formats:
    raise InputError("--test_list writes submissions: give --formats too")
  opened = open_source(source, config, image_roots)
  plan = None
  if formats and (opened.entries is not None or test_lists):
    # Every listed video's N is known before minutes of prediction, or it is an error.
    plan = plan_submissions(opened, test_lists, frame_counts=frame_counts,
                            video_dir=video_dir)
  if temporal_workdir:
    table, predicted_step = _temporal_predictions(temporal_workdir, opened, out_dir,
                                                  step, devices, source)
    num_expr_classes = load_config(temporal_workdir).model.num_expr_classes
    use_tuned_thresholds = False  # tuned on the frame model's outputs, not these
  else:
    predictor = restore_predictor(config, workdir, step, devices, batch_size)
    table = predict_frames(predictor, opened.data,
                           config.input.worker_count).sorted_by_video_and_frame()
    predicted_step, num_expr_classes = predictor.step, predictor.num_expr_classes
  au_window = smooth_window if smooth_au else 1
  thresholds, threshold_origin = au_thresholds_for(workdir, predicted_step, au_window,
                                                   use_tuned_thresholds)
  smoothed = smooth_table(table, smooth_window, smooth_au)
  summary = {"workdir": temporal_workdir or workdir, "step": predicted_step,
             "model": "temporal" if temporal_workdir else "frame", "source": source,
             "frames": len(table), "videos": len(set(table.video.tolist())),
             "smooth_window": smooth_window, "smooth_au": smooth_au,
             "au_thresholds": thresholds.tolist(), "au_thresholds_from": threshold_origin}
  if jax.process_index() != 0:
    return summary
  os.makedirs(out_dir, exist_ok=True)
  summary["predictions_csv"] = write_predictions_csv(
      os.path.join(out_dir, "predictions.csv"), smoothed, thresholds)
  if opened.data.has_labels and any(np.any(table.labels[k] > 0) for k in (
      "expression_mask", "au_mask", "va_mask")):  # a test split has records, no labels
    summary["scores"] = labelled_scores(table, smoothed, num_expr_classes, thresholds)
  summary["plots"] = plot_videos(out_dir, smoothed, plot_video_count)
  if formats:
    if plan is None:
      plan = plan_submissions(opened, frame_counts=frame_counts, video_dir=video_dir,
                              table_frames=_frames_by_video(table))
    summary["submission"] = write_submissions(
        os.path.join(out_dir, "submission"), formats, smoothed, thresholds, plan,
        num_expr_classes, au_names=submission.AU_SETS[au_set], fill=fill)
    summary["frame_counts"] = plan.counts.counts
    summary["frame_counts_from"] = plan.counts.origins
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _frames_by_video(table: FrameTable) -> dict[str, list[int]]:
  """Predicted frames of each video of a table sorted by video and frame."""
  videos, starts = np.unique(table.video, return_index=True)
  bounds = list(starts[1:]) + [len(table)]
  return {video: table.frame[start:end].tolist()
          for video, start, end in zip(videos.tolist(), starts, bounds)}


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of both commands: which run, checkpoint and data."""
  flags.DEFINE_string("workdir", None, "The training run's folder.",
                      flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best, else latest).",
                       flag_values=flag_values)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the config's).",
                      flag_values=flag_values)
  flags.DEFINE_integer("smooth_window", 1, "Centred moving average over this many "
                       "frames per video (odd; 1: none).", flag_values=flag_values)
  flags.DEFINE_bool("smooth_au", False, "Smooth AU probabilities too.",
                    flag_values=flag_values)
  flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's eval "
                       "batch, rounded up to a multiple of the device count).",
                       flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def _temporal_predictions(temporal_workdir: str, opened, out_dir: str, step, devices,
                          source: str):
  """(the FrameTable the temporal run predicts for the source's frames, its step)."""
  from affect_jax.temporal import prediction  # pylint: disable=g-import-not-at-top
  table, _, predicted_step = prediction.predict_source_frames(
      load_config(temporal_workdir), temporal_workdir, opened.data,
      os.path.join(out_dir, "embeddings"), step=step, devices=devices,
      description=source)
  return table, predicted_step


def define_predict_flags(flag_values: flags.FlagValues) -> None:
  define_flags(flag_values)
  flags.DEFINE_string("temporal_workdir", None, "A temporal run (affect-jax temporal) "
                      "over this run's frame embeddings: it predicts the frames "
                      "(--step: its checkpoint).", flag_values=flag_values)
  flags.DEFINE_string("source", None, "tfds:SPLIT, folder:PATH or list:PATH.",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=flag_values)
  flags.DEFINE_multi_string("image_root", [], "With list:PATH: a cropped_aligned "
                            "folder (repeat for several).", flag_values=flag_values)
  flags.DEFINE_bool("tuned_au_thresholds", True, "Use <workdir>/au_thresholds.json "
                    "when it was tuned for this checkpoint.", flag_values=flag_values)
  flags.DEFINE_list("formats", [], f"Submission formats, some of {submission.FORMATS}.",
                    flag_values=flag_values)
  flags.DEFINE_string("frame_counts", None, "N, the frames of each video, for "
                      "submissions (JSON or 'video,frames' CSV); else from --video_dir, "
                      "else from the frames the lists name.", flag_values=flag_values)
  flags.DEFINE_multi_string("test_list", [], "An organisers' test list: a submission "
                            "for it under submission/<list name>/; a list naming frames "
                            "one by one (a sample file) also gives N of its videos "
                            "(repeat for several).", flag_values=flag_values)
  flags.DEFINE_string("video_dir", None, "The release's video files: N of each video "
                      "from its file.", flag_values=flag_values)
  flags.DEFINE_enum("fill", "previous", list(submission.FILL_RULES), "Frames without a "
                    "face: the previous prediction, or 'linear' (VA interpolated, EXPR "
                    "and AUs of the nearer predicted frame).", flag_values=flag_values)
  flags.DEFINE_enum("au_set", "abaw", sorted(submission.AU_SETS), "AU columns of AU "
                    "files: 'abaw' the 12 of ABAW2 and later, 'abaw1' ABAW1's 8 (AU20, "
                    "not predicted, written 0).", flag_values=flag_values)
  flags.DEFINE_integer("plot_videos", 4, "Plot affect over time for this many videos.",
                       flag_values=flag_values)


def define_tuning_flags(flag_values: flags.FlagValues) -> None:
  """tune's own flags."""
  flags.DEFINE_string("split", None, "The labelled split to tune on (default: the "
                      "config's eval split).", flag_values=flag_values)
  flags.DEFINE_list("smooth_windows", ["1", "3", "5", "9", "15"],
                    "Smoothing windows to score.", flag_values=flag_values)


def define_tune_flags(flag_values: flags.FlagValues) -> None:
  define_flags(flag_values)
  define_tuning_flags(flag_values)


def define_mode_flags(flag_values: flags.FlagValues) -> None:
  define_predict_flags(flag_values)
  define_tuning_flags(flag_values)
  flags.DEFINE_enum("mode", "predict", ["predict", "tune"], "predict: per-frame "
                    "predictions of --source; tune: AU thresholds and smoothing on a "
                    "labelled split.", flag_values=flag_values)


def tune(flag_values: flags.FlagValues) -> int:
  config = load_config(flag_values.workdir, flag_values.config, flag_values.data_dir)
  report = run_tuning(config, flag_values.workdir, split=flag_values.split,
                      step=flag_values.step,
                      smooth_windows=[int(w) for w in flag_values.smooth_windows],
                      smooth_au=flag_values.smooth_au,
                      au_smoothing_window=(flag_values.smooth_window
                                           if flag_values.smooth_au else 1),
                      batch_size=flag_values.batch_size)
  print(format_tuning_report(report))
  return 0


def predict(flag_values: flags.FlagValues) -> int:
  if not flag_values.source or not flag_values.out:
    print("error: predict needs --source and --out", file=sys.stderr)
    return cli.USAGE_ERROR
  config = load_config(flag_values.workdir, flag_values.config, flag_values.data_dir)
  frame_counts = (abaw_lists.read_frame_counts(flag_values.frame_counts)
                  if flag_values.frame_counts else None)
  summary = run_prediction(
      config, flag_values.workdir, flag_values.source, flag_values.out,
      step=flag_values.step, image_roots=flag_values.image_root,
      use_tuned_thresholds=flag_values.tuned_au_thresholds,
      smooth_window=flag_values.smooth_window, smooth_au=flag_values.smooth_au,
      formats=flag_values.formats, frame_counts=frame_counts,
      test_lists=flag_values.test_list, video_dir=flag_values.video_dir,
      fill=flag_values.fill, au_set=flag_values.au_set,
      batch_size=flag_values.batch_size, plot_video_count=flag_values.plot_videos,
      temporal_workdir=flag_values.temporal_workdir)
  print(json.dumps({k: v for k, v in summary.items() if k != "au_thresholds"},
                   indent=2))
  return 0


def _parse_and_start(argv, define, doc: str) -> flags.FlagValues:
  """The command's flags; console logging and malloc settings before JAX starts."""
  flag_values, _ = cli.parse_flags(argv, define, doc, config=CONFIG_HELP)
  cli_logging.start_console_logging()
  host_setup.prepare_before_jax()
  return flag_values


def predict_main(argv: Sequence[str] | None = None) -> int:
  return predict(_parse_and_start(argv, define_predict_flags, PREDICT_DOC))


def tune_main(argv: Sequence[str] | None = None) -> int:
  return tune(_parse_and_start(argv, define_tune_flags, TUNE_DOC))


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m affect_jax.inference.predict [--mode tune] ...`."""
  flag_values = _parse_and_start(argv, define_mode_flags, __doc__)
  command = tune if flag_values.mode == "tune" else predict
  return command(flag_values)


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
