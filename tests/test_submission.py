"""ABAW submission files: the fill rule, the writers (read back by the project's own
ABAW reader), and the validator catching what is wrong, with file and line."""
import os

import numpy as np
import pytest

from affect_jax import cli
from affect_jax.errors import InputError
from affect_jax.inference import abaw_lists, submission, submission_validator
from tfds_affwild2 import annotations, synthetic
from tfds_affwild2.annotations import AnnotationError


def test_frames_without_a_prediction_take_the_previous_one_and_leading_the_next():
  known = np.array([3, 4, 8])
  rows = submission.source_rows_for_frames(known, np.arange(1, 11))
  #                      frame: 1  2  3  4  5  6  7  8  9  10
  np.testing.assert_array_equal(rows, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
  with pytest.raises(ValueError, match="no predicted frame"):
    submission.source_rows_for_frames(np.array([], np.int64), [1])


def test_grouping_sorts_frames_and_refuses_duplicates():
  grouped = submission.group_by_video(["b", "a", "b", "a"], [5, 2, 1, 1],
                                      expression=np.array([0, 1, 2, 3]))
  assert list(grouped) == ["a", "b"]
  np.testing.assert_array_equal(grouped["a"].frames, [1, 2])
  np.testing.assert_array_equal(grouped["a"].expression, [3, 1])
  np.testing.assert_array_equal(grouped["b"].expression, [2, 0])
  assert grouped["a"].tasks() == ("expr",)
  with pytest.raises(ValueError, match="video a: two predictions for frame 2"):
    submission.group_by_video(["a", "a"], [2, 2], expression=np.array([0, 1]))


def write_test_release(root, listing, frames_by_video):
  """Empty files named like face images (the index reads names only) and a list."""
  for video, frames in frames_by_video.items():
    folder = os.path.join(root, "cropped_aligned", video)
    os.makedirs(folder)
    for frame in frames:
      open(os.path.join(folder, f"{frame:05d}.jpg"), "wb").close()
  list_path = os.path.join(root, "test_set.txt")
  with open(list_path, "w") as f:
    f.write("\n".join(listing) + "\n")
  return list_path, [os.path.join(root, "cropped_aligned")]


def random_predictions(rng, frames_by_video, num_classes=8):
  videos = [v for v, frames in frames_by_video.items() for _ in frames]
  frames = [f for fs in frames_by_video.values() for f in fs]
  n = len(frames)
  return submission.group_by_video(
      videos, frames, va=np.round(rng.uniform(-1, 1, (n, 2)), 6),
      expression=rng.integers(0, num_classes, n), aus=rng.integers(0, 2, (n, 12)))


# Gaps in the face frames, a leading gap, a whole listed video and single images
# (one of them, frame 7 of v2, has no face image: its line is filled).
FACES = {"v1": [1, 2, 5, 6, 9], "v2": [3, 4, 8], "v3_left": [2, 3]}
LISTING = ["image", "v1", "v2/00003.jpg", "v2/00007.jpg", "v3_left"]


# N of each video: v1 and v3_left end without a face (frames 10, 4..6).
COUNTS = {"v1": 10, "v2": 8, "v3_left": 6}


@pytest.fixture
def test_release(tmp_path):
  list_path, roots = write_test_release(str(tmp_path), LISTING, FACES)
  return list_path, roots, random_predictions(np.random.default_rng(0), FACES)


def covered(list_path, counts=COUNTS):
  entries = submission.read_test_list(list_path)
  return entries, abaw_lists.resolve_frame_counts(
      [e.video for e in entries], given=counts).counts


def expected_values(predictions, video, frame):
  """The fill rule, spelled out: the last face frame <= frame, else the first."""
  known = predictions[video].frames.tolist()
  earlier = [i for i, f in enumerate(known) if f <= frame]
  return earlier[-1] if earlier else 0


@pytest.mark.parametrize("num_classes", [7, 8])
def test_per_video_files_cover_every_frame_and_read_back(tmp_path, test_release,
                                                          num_classes):
  list_path, roots, _ = test_release
  predictions = random_predictions(np.random.default_rng(1), FACES, num_classes)
  entries, counts = covered(list_path)
  lengths = submission.video_lengths(entries, counts)
  assert lengths == COUNTS
  out = str(tmp_path / "sub")
  submission.write_per_video_files(out, predictions, lengths,
                                   num_expr_classes=num_classes)
  for video, length in lengths.items():
    known = predictions[video]
    expr, k = annotations.read_task_file(os.path.join(out, "EXPR", f"{video}.txt"),
                                         "expr")
    va, _ = annotations.read_task_file(os.path.join(out, "VA", f"{video}.txt"), "va")
    au, _ = annotations.read_task_file(os.path.join(out, "AU", f"{video}.txt"), "au")
    assert k == num_classes
    assert len(expr) == len(va) == len(au) == length
    for frame in range(1, length + 1):
      row = expected_values(predictions, video, frame)
      assert expr[frame - 1].value == known.expression[row]
      np.testing.assert_allclose(va[frame - 1].value, known.va[row], atol=1e-6)
      np.testing.assert_array_equal(au[frame - 1].value, known.aus[row])
  assert submission_validator.validate_submission(
      out, "per_video", list_path, frame_counts=COUNTS,
      num_expr_classes=num_classes) == []


def test_listed_videos_are_every_frame_1_to_n_faces_or_not(test_release):
  list_path, _, _ = test_release
  entries, counts = covered(list_path)
  images = submission.listed_images(entries, counts)
  assert images == ([("v1", f) for f in range(1, 11)] + [("v2", 3), ("v2", 7)]
                    + [("v3_left", f) for f in range(1, 7)])


def test_mtl_file_has_one_line_per_listed_image_and_reads_back(tmp_path, test_release):
  list_path, roots, predictions = test_release
  entries, counts = covered(list_path)
  images = submission.listed_images(entries, counts)
  out = str(tmp_path / "sub")
  path = submission.write_mtl_file(out, predictions, images)
  rows = list(annotations.iter_mtl_file(path))
  assert [(r.video, r.frame) for r in rows] == images
  for row in rows:
    known = predictions[row.video]
    i = expected_values(predictions, row.video, row.frame)
    assert row.labels["expr"].value == known.expression[i]
    np.testing.assert_allclose(row.labels["va"].value, known.va[i], atol=1e-6)
    np.testing.assert_array_equal(row.labels["au"].value, known.aus[i])
  assert submission_validator.validate_submission(out, "mtl", list_path,
                                        frame_counts=COUNTS) == []


def test_image_location_files_pass_the_validator(tmp_path, test_release):
  list_path, roots, predictions = test_release
  entries, counts = covered(list_path)
  images = submission.listed_images(entries, counts)
  out = str(tmp_path / "sub")
  written = submission.write_image_location_files(out, predictions, images)
  assert sorted(os.path.basename(p) for p in written) == ["AU.txt", "EXPR.txt", "VA.txt"]
  with open(os.path.join(out, "EXPR.txt")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "image_location," + ",".join(annotations.EXPRESSION_NAMES_8)
  # v2/00007.jpg has no face image: it carries the class of frame 4, the last face
  # frame before it, although frame 4 itself is not listed.
  assert lines[12] == f"v2/00007.jpg,{predictions['v2'].expression[1]}"
  assert submission_validator.validate_submission(out, "image_location", list_path,
                                        frame_counts=COUNTS) == []


def test_linear_fill_interpolates_va_and_takes_the_nearer_decisions():
  predictions = submission.group_by_video(
      ["a"] * 3, [2, 4, 10], va=np.array([[0.0, 1.0], [0.4, 0.0], [1.0, -0.6]]),
      expression=np.array([1, 2, 3]), aus=np.eye(3, 12, dtype=int))
  filled = submission.predictions_at("a", predictions, [1, 3, 5, 7, 8, 12], "linear")
  np.testing.assert_allclose(filled.va[:, 0], [0.0, 0.2, 0.5, 0.7, 0.8, 1.0])
  np.testing.assert_allclose(filled.va[:, 1], [1.0, 0.5, -0.1, -0.3, -0.4, -0.6])
  # 3: tie between 2 and 4 -> the previous; 5 -> 4; 7: tie -> 4; 8 -> 10.
  assert filled.expression.tolist() == [1, 1, 2, 2, 3, 3]
  np.testing.assert_array_equal(filled.aus, np.eye(3, 12, dtype=int)[[0, 0, 1, 1, 2, 2]])
  previous = submission.predictions_at("a", predictions, [1, 3, 5, 7, 8, 12])
  assert previous.expression.tolist() == [1, 1, 2, 2, 2, 3]
  with pytest.raises(InputError, match="unknown fill rule 'cubic'"):
    submission.predictions_at("a", predictions, [1], "cubic")


def test_abaw1_au_files_carry_its_eight_aus(tmp_path, test_release):
  list_path, _, predictions = test_release
  entries, counts = covered(list_path)
  out = str(tmp_path / "sub")
  submission.write_per_video_files(out, predictions, submission.video_lengths(
      entries, counts), tasks=["au"], au_names=submission.ABAW1_AU_NAMES)
  lines = lines_of(os.path.join(out, "AU", "v1.txt"))
  assert lines[0] == "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"
  known = predictions["v1"].aus
  for frame, line in zip(FACES["v1"], [lines[f] for f in FACES["v1"]]):
    row = FACES["v1"].index(frame)
    expected = [known[row][annotations.AU_NAMES.index(n)] if n != "AU20" else 0
                for n in submission.ABAW1_AU_NAMES]
    assert line == ",".join(map(str, expected))
  assert submission_validator.validate_submission(
      out, "per_video", list_path, frame_counts=COUNTS, tasks=["au"],
      au_names=submission.ABAW1_AU_NAMES) == []
  problems = problems_as_text(submission_validator.validate_submission(
      out, "per_video", list_path, frame_counts=COUNTS, tasks=["au"]))
  assert "header 'AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25'" in problems


def lines_of(path):
  with open(path) as f:
    return f.read().splitlines()


def rewrite(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def problems_as_text(problems):
  return "\n".join(str(p) for p in problems)


def test_validator_names_file_and_line_of_each_problem(tmp_path, test_release):
  list_path, roots, predictions = test_release
  entries, counts = covered(list_path)
  out = str(tmp_path / "sub")
  submission.write_per_video_files(out, predictions,
                                   submission.video_lengths(entries, counts))
  submission.write_mtl_file(out, predictions, submission.listed_images(entries, counts))

  va_file = os.path.join(out, "VA", "v1.txt")
  lines = lines_of(va_file)
  rewrite(va_file, lines[:-2])  # two frames short: the video's faceless end
  expr_file = os.path.join(out, "EXPR", "v2.txt")
  lines = lines_of(expr_file)
  lines[0] = "Neutral,Anger"  # bad header
  lines[3] = "8"  # class outside 0..7, frame 3 (line 4)
  rewrite(expr_file, lines)
  au_file = os.path.join(out, "AU", "v3_left.txt")
  lines = lines_of(au_file)
  lines[2] = "1,0,1,0,1,0,1,0,1,0,1,2"  # AU26 = 2, frame 2 (line 3)
  rewrite(au_file, lines)
  problems = problems_as_text(submission_validator.validate_submission(
      out, "per_video", list_path, frame_counts=COUNTS))
  assert (f"{va_file}:9: 8 frame lines, expected 10 (one per frame 1..10 of the "
          "video): the first frame without a line is 9") in problems
  assert f"{expr_file}:1: header 'Neutral,Anger'" in problems
  assert f"{expr_file}:4: expression '8' is not a class in 0..7" in problems
  assert f"{au_file}:3: AU26=2 is not 0 or 1" in problems
  assert len(problems.splitlines()) == 4

  mtl = os.path.join(out, "MTL.txt")
  lines = lines_of(mtl)
  lines[2] = lines[2].split(",", 1)[0] + ",1.5,0.2," + lines[2].split(",", 4)[4]
  rewrite(mtl, lines + [lines[1]])  # valence 1.5 on line 3; line 1 repeated
  problems = problems_as_text(submission_validator.validate_submission(
      out, "mtl", list_path, frame_counts=COUNTS))
  assert f"{mtl}:3: valence 1.5 outside [-1, 1]" in problems
  assert f"{mtl}:20: 19 image lines, expected 18" in problems
  assert f"{mtl}:20: image 'v1/00001.jpg' appears twice" in problems
  # A submission that stops at the last face frame misses the video's faceless end:
  # the first missing frame is named, with the list line that asks for it.
  rewrite(mtl, [line for line in lines if not line.startswith("v1/00010.jpg")])
  problems = problems_as_text(submission_validator.validate_submission(
      out, "mtl", list_path, frame_counts=COUNTS))
  assert (f"{mtl}: 1 listed images have no line; the first: v1/00010.jpg (asked for "
          f"at {list_path}:2)") in problems


def test_n_of_each_video_comes_from_counts_lists_or_nowhere(tmp_path, test_release):
  list_path, _, _ = test_release
  sample = tmp_path / "CVPR_6th_ABAW_Expr_test_set_sample.txt"
  sample.write_text("image_location,Neutral\n" + "".join(
      f"{v}/{f:05d}.jpg\n" for v, n in (("v1", 11), ("v3_left", 6))
      for f in range(1, n + 1)))
  lists = {str(sample): submission.read_test_list(str(sample)),
           list_path: submission.read_test_list(list_path)}
  # v2's listed images (3 and 7) are not frames 1..N: no N from them.
  assert abaw_lists.listed_frame_counts(lists) == {"v1": 11, "v3_left": 6}
  counts = abaw_lists.resolve_frame_counts(
      ["v1", "v2", "v3_left"], given={"v1": 10, "v2": 8},
      listed=abaw_lists.listed_frame_counts(lists))
  assert counts.counts == COUNTS
  assert counts.origins == {"v1": "--frame_counts", "v2": "--frame_counts",
                            "v3_left": "organisers' list"}
  with pytest.raises(InputError, match=r"frames of 1 listed videos is unknown "
                     rf"\({list_path}\), e.g. v2: .*--frame_counts, --video_dir"):
    submission_validator.validate_submission(str(tmp_path), "mtl", list_path,
                                   sample_lists=[str(sample)])
  counts = abaw_lists.resolve_frame_counts(["v2"], face_frames=FACES)
  assert counts.counts == {"v2": 8} and counts.origins == {"v2": "last face frame"}


def test_a_frame_count_below_a_face_image_is_refused(tmp_path, test_release):
  """v1 has a face image of frame 9: N=8 cannot be its frame count."""
  list_path, roots, predictions = test_release
  entries, counts = covered(list_path)
  out = str(tmp_path / "sub")
  submission.write_mtl_file(out, predictions, submission.listed_images(entries, counts))
  assert submission_validator.validate_submission(
      out, "mtl", list_path, frame_counts=COUNTS, image_roots=roots) == []
  with pytest.raises(InputError, match=r"video v1 has a face image of frame 9, beyond "
                     r"its N=8 \(from --frame_counts\)"):
    submission_validator.validate_submission(
        out, "mtl", list_path, frame_counts={**COUNTS, "v1": 8}, image_roots=roots)


def test_validator_reports_missing_and_unlisted_files(tmp_path, test_release):
  list_path, roots, predictions = test_release
  out = str(tmp_path / "sub")
  grouped = dict(predictions)
  grouped["stray"] = grouped["v1"]
  submission.write_per_video_files(out, grouped, {"v1": 10, "v2": 8, "stray": 3},
                                   tasks=["va"])
  problems = problems_as_text(submission_validator.validate_submission(
      out, "per_video", list_path, frame_counts=COUNTS, tasks=["va", "au"]))
  assert f"{os.path.join(out, 'VA', 'stray.txt')}: video not in the test list" in problems
  assert f"{os.path.join(out, 'VA', 'v3_left.txt')}: missing file" in problems
  assert f"{os.path.join(out, 'AU')}: missing AU folder" in problems


def test_validate_command(tmp_path, test_release, capsys):
  list_path, roots, predictions = test_release
  entries, counts = covered(list_path)
  out = str(tmp_path / "sub")
  path = submission.write_mtl_file(out, predictions,
                                   submission.listed_images(entries, counts))
  counts_file = tmp_path / "counts.json"
  counts_file.write_text('{"v1": 10, "v2": 8, "v3_left": 6}')
  argv = ["validate", out, "--format", "mtl", "--test_list", list_path,
          "--frame_counts", str(counts_file)]
  assert cli.run_as_script(submission_validator.main, argv) == 0
  assert "OK" in capsys.readouterr().out
  lines = lines_of(path)
  rewrite(path, lines[:1] + [lines[1].replace(",", ";", 1)] + lines[2:])
  assert cli.run_as_script(submission_validator.main, argv) == 1
  printed = capsys.readouterr().out
  assert f"{path}:2: image 'v1/00001.jpg;" in printed and "1 listed images have no" \
      in printed
  # An unknown --tasks value is one clean error line, exit status 1, no traceback.
  assert cli.run_as_script(submission_validator.main, argv + ["--tasks", "va,valence"]) == 1
  captured = capsys.readouterr()
  assert captured.err.strip() == ("error: --tasks: unknown task 'valence'; expected "
                                  "some of va, expr, au")
  # Without N for the listed videos the check cannot run: said in one line.
  assert cli.run_as_script(submission_validator.main, argv[:-2]) == 1
  assert "error: the number of frames of 3 listed videos is unknown" in \
      capsys.readouterr().err


def test_bad_test_lists_and_missing_predictions_are_named(tmp_path):
  bad = tmp_path / "list.txt"
  bad.write_text("video\nv1\n../etc/00001.jpg\n")
  with pytest.raises(AnnotationError, match=f"{bad}:3: image path"):
    submission.read_test_list(str(bad))
  (tmp_path / "empty.txt").write_text("image\n\n")
  with pytest.raises(AnnotationError, match="names no video"):
    submission.read_test_list(str(tmp_path / "empty.txt"))
  with pytest.raises(InputError, match="video v9 has no predicted frame"):
    submission.predictions_at("v9", {}, [1, 2])
  with pytest.raises(InputError, match="no such file"):
    submission.read_test_list(str(tmp_path / "missing.txt"))
  counts = tmp_path / "counts.csv"
  counts.write_text("video,frames\nv1,12\nv2,x\n")
  with pytest.raises(AnnotationError, match=f"{counts}:3:"):
    submission.read_frame_counts(str(counts))


def test_synthetic_release_test_lists_round_trip(tmp_path):
  """The synthetic release's two lists: video names, and the organisers' sample file
  that gives N (every test video starts and ends without a face)."""
  root = str(tmp_path / "release")
  truth = synthetic.generate_release(root, seed=5, num_videos=6, frames_per_video=12)
  list_path = os.path.join(root, synthetic.TEST_LIST)
  sample_path = os.path.join(root, synthetic.TEST_SAMPLE_LIST)
  roots = [os.path.join(root, r) for r in synthetic.LAYOUTS["abaw6"].image_roots]
  entries = submission.read_test_list(list_path)
  faces = submission.face_frames_of(entries, roots)
  counts = abaw_lists.resolve_frame_counts(
      [e.video for e in entries], listed=abaw_lists.listed_frame_counts(
          {sample_path: submission.read_test_list(sample_path)})).counts
  assert counts == truth["splits"]["test"]["frames"]
  assert all(counts[v] > max(faces[v]) for v in counts)
  predictions = random_predictions(np.random.default_rng(2), faces)
  out = str(tmp_path / "sub")
  submission.write_per_video_files(out, predictions,
                                   submission.video_lengths(entries, counts))
  submission.write_mtl_file(out, predictions, submission.listed_images(entries, counts))
  for fmt in ("per_video", "mtl"):
    assert submission_validator.validate_submission(out, fmt, list_path,
                                          sample_lists=[sample_path]) == []
    assert submission_validator.validate_submission(out, fmt, sample_path) == []
