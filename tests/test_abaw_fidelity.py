"""ABAW fidelity end to end: a release with two test lists (video names, and the
organisers' sample file listing every frame 1..N, faces or not) builds its test split
with each listed frame once, predicts, and writes per-video, MTL and image_location
submissions for each list that pass the validator with every listed frame present.
Also: N from the release's video files."""
import os

import cv2
import numpy as np
import pytest

from affect_jax.errors import InputError
from affect_jax.inference import abaw_lists, predict, submission, submission_validator
from tfds_affwild2 import synthetic


def lines_of(path):
  with open(path) as f:
    return f.read().splitlines()


@pytest.fixture(scope="module")
def predicted_test_split(uninterrupted_run, synthetic_release, tmp_path_factory):
  config, workdir = uninterrupted_run("xla")
  root, truth = synthetic_release
  lists = [os.path.join(root, synthetic.TEST_LIST),
           os.path.join(root, synthetic.TEST_SAMPLE_LIST)]
  out = str(tmp_path_factory.mktemp("test_split_predictions"))
  summary = predict.run_prediction(config, workdir, "tfds:test", out,
                                   formats=submission.FORMATS, test_lists=lists)
  return root, truth, lists, out, summary


def test_two_lists_build_each_listed_frame_once(built_union, synthetic_release):
  builder, _ = built_union
  _, truth = synthetic_release
  test = truth["splits"]["test"]
  # The sample file names every frame of the test videos the video list names too.
  assert test["lists"][synthetic.TEST_SAMPLE_LIST]["frames"] == sum(
      test["frames"].values())
  assert builder.info.splits["test"].num_examples == test["images"]


def test_submissions_for_each_list_cover_every_listed_frame(predicted_test_split):
  root, truth, (video_list, sample_list), out, summary = predicted_test_split
  lengths = truth["splits"]["test"]["frames"]
  assert summary["frames"] == truth["splits"]["test"]["images"] < sum(lengths.values())
  assert summary["frame_counts"] == lengths
  sample_rows = lines_of(sample_list)[1:]
  assert len(sample_rows) == sum(lengths.values())
  for list_path in (video_list, sample_list):
    folder = os.path.join(out, "submission",
                          os.path.splitext(os.path.basename(list_path))[0])
    for fmt in submission.FORMATS:
      assert submission_validator.validate_submission(
          os.path.join(folder, fmt), fmt, list_path, sample_lists=[sample_list]) == []
    # Every listed frame, faces or not, in list order.
    mtl = lines_of(os.path.join(folder, "mtl", submission.MTL_FILE))
    assert [line.split(",")[0] for line in mtl[1:]] == sample_rows
    for task in ("VA", "EXPR", "AU"):
      rows = lines_of(os.path.join(folder, "image_location", f"{task}.txt"))
      assert [line.split(",")[0] for line in rows[1:]] == sample_rows
      for video, length in lengths.items():
        assert len(lines_of(os.path.join(folder, "per_video", task,
                                         f"{video}.txt"))) == 1 + length


def test_a_submission_stopping_at_the_last_face_is_caught(predicted_test_split,
                                                          tmp_path):
  _, truth, (video_list, sample_list), out, _ = predicted_test_split
  video, length = sorted(truth["splits"]["test"]["frames"].items())[0]
  folder = os.path.join(out, "submission",
                        os.path.splitext(synthetic.TEST_LIST)[0], "per_video")
  path = os.path.join(folder, "VA", f"{video}.txt")
  lines = lines_of(path)
  short = tmp_path / "per_video"
  for task in ("VA", "EXPR", "AU"):
    (short / task).mkdir(parents=True)
    for name in os.listdir(os.path.join(folder, task)):
      (short / task / name).write_text("\n".join(lines_of(
          os.path.join(folder, task, name))) + "\n")
  trailing = synthetic.TEST_FACELESS_ENDS[1]
  (short / "VA" / f"{video}.txt").write_text("\n".join(lines[:-trailing]) + "\n")
  problems = [str(p) for p in submission_validator.validate_submission(
      str(short), "per_video", video_list, sample_lists=[sample_list])]
  assert problems == [
      f"{short / 'VA' / f'{video}.txt'}:{length + 1 - trailing}: {length - trailing} "
      f"frame lines, expected {length} (one per frame 1..{length} of the video): the "
      f"first frame without a line is {length - trailing + 1}"]
  # Without the sample list nothing says what N is: the check refuses to guess.
  with pytest.raises(InputError, match="unknown"):
    submission_validator.validate_submission(str(short), "per_video", video_list)


def write_video(path, frames):
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 24))
  for k in range(frames):
    writer.write(np.full((24, 32, 3), 10 * k, np.uint8))
  writer.release()


def test_n_from_the_release_video_files(tmp_path):
  """A cropped `<name>_left` comes from `<name>.avi`; a video without a file has no
  count (and a video list naming it is refused unless N comes from elsewhere)."""
  write_video(tmp_path / "clip.avi", 7)
  write_video(tmp_path / "solo.avi", 4)
  counts = abaw_lists.video_file_frame_counts(
      str(tmp_path), ["clip_left", "clip_right", "solo", "absent"])
  assert counts == {"clip_left": 7, "clip_right": 7, "solo": 4}
  listing = tmp_path / "test_set.txt"
  listing.write_text("clip_left\nsolo\n")
  predictions = submission.group_by_video(
      ["clip_left", "solo"], [3, 2], va=np.zeros((2, 2)), expression=[1, 2],
      aus=np.zeros((2, 12), int))
  out = tmp_path / "sub"
  entries = submission.read_test_list(str(listing))
  submission.write_image_location_files(
      str(out), predictions, submission.listed_images(entries, counts), tasks=["expr"])
  assert len(lines_of(out / "EXPR.txt")) == 1 + 7 + 4
  assert submission_validator.validate_submission(str(out), "image_location", str(listing),
                                        video_dir=str(tmp_path), tasks=["expr"]) == []
  with pytest.raises(InputError, match="--video_dir .*: no such folder"):
    abaw_lists.video_file_frame_counts(str(tmp_path / "nowhere"), ["clip"])
