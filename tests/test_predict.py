"""Prediction from a checkpoint: equal to the eval pass (for each implementation), tuned
AU thresholds, temporal smoothing, the CSV and the ABAW submissions of a test list, bad inputs."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import config_checks
from affect_jax.errors import InputError
from affect_jax.inference import frame_table
from affect_jax.inference import predict
from affect_jax.inference import restore
from affect_jax.inference import sources
from affect_jax.inference import tuning
from affect_jax.inference import submission, submission_validator
from affect_jax.eval import evaluation
from affect_jax.train import loop
from affect_jax.train import step_functions
from configs import tiny
from tfds_affwild2 import annotations, synthetic
from tests.test_train import REPO, tiny_config

STEPS = 4


@pytest.fixture(scope="module")
def trained_run(built_union, synthetic_release, tmp_path_factory):
  """A tiny run of a few steps, evaluated (so scored, hence 'best') at its last step."""
  _, data_dir = built_union
  config = tiny_config(data_dir, num_train_steps=STEPS, eval_every_steps=STEPS,
                       checkpoint_every_steps=STEPS, log_every_steps=STEPS)
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train_and_evaluate(config, workdir)
  root, _ = synthetic_release
  image_roots = [os.path.join(root, r) for r in synthetic.LAYOUTS["abaw6"].image_roots]
  return config, workdir, root, image_roots


@pytest.fixture(scope="module")
def validation_table(trained_run):
  config, workdir, _, _ = trained_run
  predictor = restore.restore_predictor(config, workdir)
  data = sources.open_source("tfds:validation", config).data
  return predictor.step, frame_table.predict_frames(predictor, data)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("implementation", ["cpu", "xla"])
def test_restored_predictions_equal_the_eval_pass(uninterrupted_run, implementation):
  config, workdir = uninterrupted_run(implementation)
  predictor = restore.restore_predictor(config, workdir)
  table = frame_table.predict_frames(
      predictor, sources.open_source("tfds:validation", config).data)
  trainer = loop.Trainer(config, workdir)
  assert trainer.implementation == implementation
  state = trainer.restore_for_eval()
  assert predictor.step == int(state.step) > 0  # the same checkpoint (the best)
  scores, collected = trainer.evaluate(state, collect_outputs=True)
  assert len(table) == len(collected["record_index"]) == 46
  rows = np.argsort(table.record_index)
  order = np.argsort(collected["record_index"])
  np.testing.assert_array_equal(table.record_index[rows],
                                collected["record_index"][order])
  np.testing.assert_allclose(table.expression[rows],
                             softmax(collected["pred_expression"][order]), atol=1e-6)
  np.testing.assert_allclose(table.au[rows],
                             1 / (1 + np.exp(-collected["pred_au"][order])), atol=1e-6)
  np.testing.assert_allclose(table.va[rows], collected["pred_va"][order], atol=1e-6)
  for key in LABEL_KEYS_TO_COMPARE:
    np.testing.assert_array_equal(table.labels[key][rows], collected[key][order])
  table_scores = frame_table.table_scores(table, 8)
  for key in ("p_va", "expr_f1", "au_f1", "au_f1_best_thresholds", "p_mtl"):
    assert table_scores[key] == pytest.approx(scores[key], abs=1e-6), key
  # The checkpoint was written from 8 devices; restored onto 1 it predicts the same.
  one_device = restore.restore_predictor(config, workdir, devices=jax.devices()[:1])
  single = frame_table.predict_frames(
      one_device, sources.open_source("tfds:validation", config).data)
  np.testing.assert_array_equal(single.record_index, table.record_index)
  np.testing.assert_allclose(single.au, table.au, atol=1e-5)
  np.testing.assert_allclose(single.va, table.va, atol=1e-5)


LABEL_KEYS_TO_COMPARE = ("expression_mask", "au", "au_mask", "va_mask")


def test_tuned_thresholds_keep_or_improve_validation_au_f1(trained_run):
  config, workdir, _, _ = trained_run
  report = tuning.run_tuning(config, workdir, smooth_windows=(1, 5))
  tuned = report["au_thresholds"]
  assert tuned["au_f1_tuned"] >= tuned["au_f1_default"]
  # Also scored on videos they were not tuned on (validation has several videos).
  assert 0.0 <= tuned["au_f1_tuned_held_out"] <= 1.0
  assert all(t >= d - 1e-12 for t, d in zip(tuned["au_f1_per_au_tuned"],
                                            tuned["au_f1_per_au_default"]))
  with open(os.path.join(workdir, tuning.THRESHOLDS_FILE)) as f:
    saved = json.load(f)
  assert saved["step"] == STEPS and saved["thresholds"] == tuned["thresholds"]
  # The device eval step, deciding AUs with the saved thresholds, scores the same F1.
  trainer = loop.Trainer(config, workdir)
  eval_fn = step_functions.compile_eval_step(trainer.mesh, num_expr_classes=8,
                                    dtype=jnp.float32,
                                    au_thresholds=jnp.asarray(saved["thresholds"],
                                                              jnp.float32))
  ds, num_batches = trainer.eval_data()
  scores, _ = evaluation.evaluate(eval_fn, trainer.restore_for_eval(), ds, num_batches,
                             trainer.mesh)
  assert scores["au_f1"] == pytest.approx(tuned["au_f1_tuned"], abs=1e-9)
  thresholds, origin = tuning.au_thresholds_for(workdir, STEPS, 1)
  np.testing.assert_array_equal(thresholds, np.float32(saved["thresholds"]))
  assert origin.endswith(tuning.THRESHOLDS_FILE)
  # Thresholds of another checkpoint are not used.
  assert "another step" in tuning.au_thresholds_for(workdir, STEPS + 1, 1)[1]
  assert set(report["smoothing"]) == {"1", "5"}


def brute_force_smoothing(values, video, frame, window):
  result = np.empty_like(values)
  for i in range(len(values)):
    near = (video == video[i]) & (np.abs(frame - frame[i]) <= window // 2)
    result[i] = values[near].astype(np.float64).mean(0)
  return result


def test_smoothing_keeps_frames_and_window_one_is_the_identity(validation_table):
  _, table = validation_table
  same = frame_table.smooth_table(table, 1, smooth_au=True)
  for name in ("expression", "au", "va"):
    np.testing.assert_array_equal(getattr(same, name), getattr(table, name))
  smoothed = frame_table.smooth_table(table, 5, smooth_au=True)
  assert len(smoothed) == len(table)
  np.testing.assert_array_equal(smoothed.frame, table.frame)
  np.testing.assert_array_equal(smoothed.video, table.video)
  np.testing.assert_allclose(smoothed.expression.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(
      smoothed.va, brute_force_smoothing(table.va, table.video, table.frame, 5),
      atol=1e-6)
  assert not np.allclose(smoothed.va, table.va)
  # Gaps: frame 10 is 7 frames from 3 and 20, so a window of 5 leaves it alone.
  values = np.array([[1.0], [2.0], [4.0], [8.0], [16.0]], np.float32)
  video = np.array(["a", "a", "a", "a", "b"])
  frame = np.array([1, 3, 10, 20, 2])
  np.testing.assert_allclose(
      frame_table.centred_moving_average(values, video, frame, 5)[:, 0],
      [1.5, 1.5, 4.0, 8.0, 16.0])
  with pytest.raises(ValueError, match="positive odd number"):
    frame_table.centred_moving_average(values, video, frame, 4)


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_test_list_predictions_csv_and_submissions(trained_run, tmp_path):
  config, workdir, root, image_roots = trained_run
  list_path = os.path.join(root, synthetic.TEST_LIST)
  sample_path = os.path.join(root, synthetic.TEST_SAMPLE_LIST)
  with open(os.path.join(root, synthetic.GROUND_TRUTH)) as f:
    lengths = json.load(f)["splits"]["test"]["frames"]
  out = str(tmp_path / "out")
  summary = predict.run_prediction(config, workdir, f"list:{list_path}", out,
                                   image_roots=image_roots, smooth_window=3,
                                   formats=submission.FORMATS, test_lists=[sample_path])
  entries = submission.read_test_list(list_path)
  faces = submission.face_frames_of(entries, image_roots)
  rows = read_csv(os.path.join(out, "predictions.csv"))
  assert len(rows) == summary["frames"] == sum(len(f) for f in faces.values())
  assert summary["frame_counts"] == lengths
  assert set(summary["frame_counts_from"].values()) == {"organisers' list"}
  thresholds = np.float32(summary["au_thresholds"])
  for row in rows[:5]:
    probabilities = np.float32([row[f"p_{n}"] for n in annotations.AU_NAMES])
    decisions = [int(row[n]) for n in annotations.AU_NAMES]
    # Decisions come from the unrounded probabilities; skip borderline rows.
    if np.all(np.abs(probabilities - thresholds) > 1e-5):
      assert decisions == (probabilities >= thresholds).astype(int).tolist()
    assert os.path.isfile(row["image_path"]) and row["record_index"] == "-1"
  sample_folder = os.path.splitext(synthetic.TEST_SAMPLE_LIST)[0]
  for fmt in submission.FORMATS:
    assert submission_validator.validate_submission(os.path.join(out, "submission", fmt), fmt,
                                          list_path, sample_lists=[sample_path]) == []
    assert submission_validator.validate_submission(
        os.path.join(out, "submission", sample_folder, fmt), fmt, sample_path) == []
  # Frames without a face image carry the previous face frame's prediction, up to N.
  by_frame = {(r["video"], int(r["frame"])): r for r in rows}
  checked = 0
  for video, frames in faces.items():
    expr, _ = annotations.read_task_file(
        os.path.join(out, "submission", "per_video", "EXPR", f"{video}.txt"), "expr")
    assert len(expr) == lengths[video] > max(frames)
    for frame in range(1, lengths[video] + 1):
      source = max([f for f in frames if f <= frame] or [min(frames)])
      assert expr[frame - 1].value == int(by_frame[(video, source)]["expression"])
      checked += frame not in frames
  assert checked > 0, "the synthetic test video has no gap to fill"


def test_a_listed_video_without_n_is_refused_before_predicting(trained_run, tmp_path):
  config, workdir, root, image_roots = trained_run
  list_path = os.path.join(root, synthetic.TEST_LIST)
  with pytest.raises(InputError, match=r"number of frames of \d+ listed videos is "
                     "unknown"):
    predict.run_prediction(config, str(tmp_path / "no_run"), f"list:{list_path}",
                           str(tmp_path / "out"), image_roots=image_roots,
                           formats=["per_video"])


def test_labelled_split_reports_scores_before_and_after(trained_run, tmp_path):
  config, workdir, root, _ = trained_run
  summary = predict.run_prediction(config, workdir, "tfds:validation",
                                   str(tmp_path / "out"), smooth_window=5,
                                   use_tuned_thresholds=False, formats=["mtl"])
  scores = summary["scores"]
  assert set(scores) == {"raw", "thresholds", "thresholds_and_smoothing"}
  assert scores["raw"]["au_f1"] == scores["thresholds"]["au_f1"]  # 0.5 both times
  assert scores["raw"]["p_va"] != scores["thresholds_and_smoothing"]["p_va"]
  rows = read_csv(os.path.join(str(tmp_path / "out"), "predictions.csv"))
  assert len(rows) == 46 and all(int(r["record_index"]) >= 0 for r in rows)


def test_folder_source_and_bad_inputs(trained_run, tmp_path):
  config, workdir, root, image_roots = trained_run
  folder = str(tmp_path / "faces")
  video_folder = os.path.join(image_roots[0], sorted(os.listdir(image_roots[0]))[0])
  shutil.copytree(video_folder, os.path.join(folder, "clip"))
  summary = predict.run_prediction(config, workdir, f"folder:{folder}",
                                   str(tmp_path / "out"), formats=["per_video"])
  assert summary["frames"] == len(os.listdir(video_folder))
  broken = os.path.join(folder, "clip", "00001.jpg")
  with open(broken, "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(Exception, match=f"{broken}: cannot read the image"):
    predict.run_prediction(config, workdir, f"folder:{folder}", str(tmp_path / "out2"))
  with pytest.raises(ValueError, match="expected tfds:SPLIT, folder:PATH or list:PATH"):
    sources.open_source("images:/x", config)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.open_source(f"folder:{tmp_path}/missing", config)
  with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
    restore.restore_predictor(config, str(tmp_path))
  listing = tmp_path / "list.txt"
  listing.write_text("image\nno_such_video\n")
  with pytest.raises(annotations.AnnotationError, match=f"{listing}:2: video "
                     "'no_such_video' has no folder"):
    sources.open_source(f"list:{listing}", config, image_roots)


def test_restoring_checks_the_model_keys_alone():
  """What a restore for prediction checks: the keys that build the network, not the
  training-only ones (those may have grown stricter since the run was trained)."""
  config = tiny.get_config()
  config.input.image_size = 16  # refused for training, harmless for a restore
  config.num_train_steps = 0
  assert config_checks.config_problems(config)
  config_checks.validate_model_config(config)
  config.model.dtype = "float64"
  config.model.implementation = "gpu"
  with pytest.raises(ValueError, match=r"model.dtype='float64'(.|\n)*"
                     r"model.implementation='gpu'"):
    config_checks.validate_model_config(config)


def test_restore_refuses_a_bad_model_config_before_reading_files(tmp_path):
  config = tiny.get_config()
  config.model.dtype = "float64"
  with pytest.raises(ValueError, match=r"model.dtype='float64'"):  # not "no checkpoint"
    restore.restore_predictor(config, str(tmp_path))


def test_command_line(trained_run, tmp_path):
  config, workdir, root, image_roots = trained_run
  list_path = os.path.join(root, synthetic.TEST_LIST)
  sample_path = os.path.join(root, synthetic.TEST_SAMPLE_LIST)
  out = str(tmp_path / "out")
  command = [sys.executable, "-m", "affect_jax.inference.predict", "--workdir", workdir,
             f"--source=list:{list_path}", "--out", out, "--formats=mtl",
             f"--test_list={sample_path}", f"--data_dir={config.dataset.data_dir}"]
  command += [f"--image_root={r}" for r in image_roots]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)["frames"] > 0
  validate = [sys.executable, "-m", "affect_jax.inference.submission_validator", "validate",
              os.path.join(out, "submission", "mtl"), "--format", "mtl", "--test_list",
              list_path, f"--sample_list={sample_path}"]
  result = subprocess.run(validate, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
