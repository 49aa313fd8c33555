"""Faces in any image or video: detection (dlib-bin's HOG detector), the largest of
several faces, alignment by 5 landmarks (face_recognition_models), the faces command's
outputs, and bad inputs (tests/test_video_analysis.py: tracking, the API, more)."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

import dlib  # noqa: F401  (the test extra installs dlib-bin)
from skimage import data as skimage_data

from affect_jax import cli, data_parallel
from affect_jax.errors import InputError
from affect_jax.inference import faces
from affect_jax.video import face_crops
from affect_jax.train import checkpoints
from affect_jax.model import implementation, multitask
from affect_jax.train import optimizers
from affect_jax.train import run_config
from affect_jax.train import train_state
from tests.test_train import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def astronaut():
  return skimage_data.astronaut()  # 512 x 512, one face of about 90 pixels


@pytest.fixture(scope="module")
def detector():
  return faces.create_detector()


@pytest.fixture(scope="module")
def landmarks_predictor():
  # The test extra installs face_recognition_models; "always" fails loudly without it.
  return faces.create_landmark_predictor("always")


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
  """A checkpoint of the tiny model at initialisation: the plumbing needs no training."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(None)
  trainer_mesh = data_parallel.create_mesh()
  model = multitask.create_model(
      config.model, implementation.implementation_for(config.model, trainer_mesh))
  state = train_state.create_train_state(config, model, trainer_mesh,
                                   optimizers.create_learning_rate_fn(config))
  run_config.check_and_write_config(config, workdir)
  manager = checkpoints.create_checkpoint_manager(workdir, asynchronous=False)
  checkpoints.save_checkpoint(manager, 1, state, metrics={"p_mtl": 0.0})
  manager.wait_until_finished()
  manager.close()
  return workdir


def test_the_astronaut_face_is_found_and_cropped(astronaut, detector):
  box, found = faces.find_face(detector, astronaut)
  assert found == 1
  assert 150 < box.left < 200 and 60 < box.top < 110 and 80 < box.right - box.left < 100
  crop = faces.crop_face(astronaut, box)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  # The crop holds a face the detector finds again, filling most of it.
  again, _ = faces.find_face(detector, np.asarray(
      Image.fromarray(crop).resize((224, 224))))
  assert again is not None and again.right - again.left > 100


def similarity(scale, degrees, shift):
  angle = np.radians(degrees)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  return np.hstack([scale * rotation, np.reshape(shift, (2, 1))])


def test_umeyama_recovers_a_known_similarity():
  rng = np.random.default_rng(0)
  points = rng.uniform(0, 500, (5, 2))
  for matrix in (similarity(0.37, 23.0, (-12.5, 40.25)),
                 similarity(2.5, -160.0, (3, 7)), similarity(1.0, 0.0, (0, 0))):
    fitted = faces.umeyama(points, faces.apply_transform(matrix, points))
    np.testing.assert_allclose(fitted, matrix, atol=1e-9)
  # With noise, it is the least-squares fit: the similarity [[a, -b, x], [b, a, y]]
  # that linear least squares finds.
  target = faces.apply_transform(similarity(0.5, 10, (1, 2)), points)
  target += rng.normal(0, 2, target.shape)
  ones, zeros = np.ones(len(points)), np.zeros(len(points))
  design = np.concatenate([np.stack([points[:, 0], -points[:, 1], ones, zeros], 1),
                           np.stack([points[:, 1], points[:, 0], zeros, ones], 1)])
  (a, b, x, y), *_ = np.linalg.lstsq(design, np.concatenate([target[:, 0],
                                                            target[:, 1]]))
  np.testing.assert_allclose(faces.umeyama(points, target), [[a, -b, x], [b, a, y]],
                             atol=1e-9)
  # A mirror image is fitted by a rotation, never a reflection.
  mirrored = points * (-1, 1)
  assert np.linalg.det(faces.umeyama(points, mirrored)[:, :2]) > 0
  with pytest.raises(ValueError, match="coincide"):
    faces.umeyama(np.ones((5, 2)), points)
  with pytest.raises(ValueError, match="same shape"):
    faces.umeyama(points, points[:4])


def test_the_template_has_level_centred_eyes():
  template = faces.landmark_template(112)
  left_eye, right_eye = template[2:4].mean(0), template[0:2].mean(0)
  assert left_eye[1] == pytest.approx(right_eye[1], abs=1e-9)  # level
  assert right_eye[0] - left_eye[0] == pytest.approx(0.315 * 112)
  assert (left_eye[0] + right_eye[0]) / 2 == pytest.approx(55.5)  # centred
  assert left_eye[1] == pytest.approx(0.465 * 112 - 0.5)
  assert 75 < template[4, 1] < 82 and abs(template[4, 0] - 55.5) < 0.5  # nose below
  np.testing.assert_allclose(faces.landmark_template(224), (template + 0.5) * 2 - 0.5)


@pytest.mark.parametrize("scale", [0.8, 0.23])  # 0.23: averaged by 4 before sampling
def test_the_warp_puts_a_point_where_the_matrix_maps_it(scale):
  y, x = np.mgrid[:600, :700]
  spot = np.array([330.3, 270.7])
  blob = np.exp(-((x - spot[0]) ** 2 + (y - spot[1]) ** 2) / (2 * (3 / scale) ** 2))
  image = np.repeat((255 * blob).astype(np.uint8)[..., None], 3, -1)
  matrix = similarity(scale, 25.0, (0, 0))
  matrix[:, 2] = (40.2, 61.6) - faces.apply_transform(matrix, spot)
  out = faces.warp_to_square(image, matrix, 112).astype(np.float64)[..., 0]
  assert out.shape == (112, 112)
  oy, ox = np.mgrid[:112, :112]
  centroid = np.array([(ox * out).sum(), (oy * out).sum()]) / out.sum()
  np.testing.assert_allclose(centroid, (40.2, 61.6), atol=0.1)
  assert 200 < out.max() <= 255


def eye_line_degrees(landmarks):
  left_eye, right_eye = landmarks[2:4].mean(0), landmarks[0:2].mean(0)
  return np.degrees(np.arctan2(*(right_eye - left_eye)[::-1]))


def landmarks_found_again(detector, landmarks_predictor, crop):
  """The 5 landmarks of the face in a 112x112 crop, found afresh (on the crop at twice
  its size, which the detector needs), in the crop's pixels."""
  large = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BILINEAR))
  box, found = faces.find_face(detector, large)
  assert found == 1
  return (faces.detect_landmarks(landmarks_predictor, large, box) + 0.5) / 2 - 0.5


def test_the_astronaut_face_is_aligned(astronaut, detector, landmarks_predictor):
  box, _ = faces.find_face(detector, astronaut)
  landmarks = faces.detect_landmarks(landmarks_predictor, astronaut, box)
  assert landmarks.shape == (5, 2)
  assert (landmarks[:, 0] > box.left).all() and (landmarks[:, 0] < box.right).all()
  assert 2 < eye_line_degrees(landmarks) < 5  # her head is turned a little
  template = faces.landmark_template()
  moved = faces.apply_transform(faces.alignment_matrix(landmarks), landmarks)
  assert np.abs(moved - template).max() < 1.5
  crop = faces.align_face(astronaut, box, landmarks_predictor)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  again = landmarks_found_again(detector, landmarks_predictor, crop)
  assert np.abs(again - template).max() < 3  # pixels
  assert abs(eye_line_degrees(again)) < 1.5


@pytest.mark.parametrize("degrees", [20, -20])
def test_alignment_undoes_a_rotation_and_a_square_crop_does_not(
    astronaut, detector, landmarks_predictor, degrees):
  turned = np.asarray(Image.fromarray(astronaut).rotate(degrees, Image.BILINEAR))
  box, _ = faces.find_face(detector, turned)
  assert box is not None
  aligned = landmarks_found_again(
      detector, landmarks_predictor, faces.align_face(turned, box, landmarks_predictor))
  assert abs(eye_line_degrees(aligned)) < 3
  assert np.abs(aligned - faces.landmark_template()).max() < 4
  # The square crop keeps the turn (the detector no longer finds the face in it: the
  # landmarks are looked for in the box, which fills the middle 1 / 1.6 of the crop).
  square = np.asarray(Image.fromarray(faces.crop_face(turned, box)).resize(
      (224, 224), Image.BILINEAR))
  inner = faces.FaceBox(*(int(round(224 * v / 1.6)) for v in (0.3, 0.3, 1.3, 1.3)), 1)
  found = faces.detect_landmarks(landmarks_predictor, square, inner)
  # Pillow turns counterclockwise: the eye line falls by `degrees` from about 3.
  assert abs(eye_line_degrees(found) + degrees - 3) < 4


def test_aligned_and_square_crops_frame_the_face_differently(astronaut, detector,
                                                           landmarks_predictor):
  box, _ = faces.find_face(detector, astronaut)
  assert np.abs(faces.align_face(astronaut, box, landmarks_predictor).astype(float)
                - faces.crop_face(astronaut, box)).mean() > 20  # not the same framing


def test_align_always_without_the_model_says_what_to_install(tmp_path, monkeypatch):
  missing = str(tmp_path / "shape_predictor_5_face_landmarks.dat")
  with pytest.raises(InputError, match=f"{missing} does not exist: pip install "
                     "face_recognition_models"):
    faces.create_landmark_predictor("always", missing)
  with pytest.warns(UserWarning, match="not aligned, only cut as squares.*pip install "
                    "face_recognition_models"):
    assert faces.create_landmark_predictor("auto", missing) is None
  assert faces.create_landmark_predictor("never", missing) is None
  with pytest.raises(InputError, match="align must be one of auto, always, never"):
    faces.create_landmark_predictor("yes")
  monkeypatch.setattr(face_crops, "LANDMARK_MODEL_PACKAGE", "no_such_landmark_package")
  assert faces.landmark_model_path() is None
  with pytest.raises(InputError, match="no_such_landmark_package package is not "
                     "installed: pip install no_such_landmark_package"):
    faces.create_landmark_predictor("always")


def test_the_command_line_chooses_alignment(monkeypatch, capsys, untrained_run,
                                            tmp_path):
  chosen = []
  real_analyse_media = faces.analyse_media
  monkeypatch.setattr(faces, "analyse_media",
                      lambda *args, **kwargs: chosen.append(kwargs["align"]) or {})
  common = ["--workdir", "run", "--input", "photo.png", "--out", "out"]
  for flags in ([], ["--align"], ["--align", "never"], ["--noalign"],
                ["--align=auto"]):
    assert faces.main(common + flags) == 0
  assert chosen == ["auto", "always", "never", "never", "auto"]
  capsys.readouterr()
  # --align without the model stops with one error line saying what to install.
  monkeypatch.setattr(faces, "analyse_media", real_analyse_media)
  monkeypatch.setattr(face_crops, "LANDMARK_MODEL_PACKAGE", "no_such_landmark_package")
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
  assert cli.main(["faces", "--workdir", untrained_run, "--input", str(photo), "--out",
                   str(tmp_path / "out"), "--align"]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "error: face alignment needs dlib's 5-point landmark model, and the "
      "no_such_landmark_package package is not installed: pip install "
      "no_such_landmark_package")


def test_of_several_faces_the_largest_is_kept(astronaut, detector):
  small = astronaut[20:276, 100:356]  # face of about 90 pixels
  large = np.asarray(Image.fromarray(small).resize((384, 384)))  # about 130 pixels
  canvas = np.zeros((384, 256 + 384, 3), np.uint8)
  canvas[:256, :256] = small
  canvas[:, 256:] = large
  box, found = faces.find_face(detector, canvas)
  assert found == 2
  assert box.left > 256 and box.right - box.left > 110
  weak = faces.FaceBox(0, 0, 500, 500, 0.1)  # a huge but weak detection is ignored
  assert faces.largest_face([weak, box]) == box
  assert faces.largest_face([weak]) is None


def write_gif(path, frames):
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)


def test_images_and_videos_give_csvs_and_plots(astronaut, untrained_run, tmp_path):
  photo = str(tmp_path / "astronaut.png")
  Image.fromarray(astronaut).save(photo)
  face = astronaut[20:276, 100:356]
  blank = np.full_like(face, 128)  # frame 3: no face, a gap
  frames = [np.roll(face, 0, 1), np.roll(face, 4, 1), blank, np.roll(face, 8, 1),
            np.roll(face, 12, 1)]
  clip = str(tmp_path / "clip.gif")
  write_gif(clip, frames)
  out = str(tmp_path / "out")
  # Detecting every frame: a face that comes back is found in its first frame.
  summary = faces.analyse_media(untrained_run, [photo, clip], out, smooth_window=3,
                                detect_every=1)
  assert summary["aligned"] == (faces.landmark_model_path() is not None)
  by_name = {s["name"]: s for s in summary["inputs"]}
  assert by_name["astronaut"]["frames"] == by_name["astronaut"]["frames_with_face"] == 1
  assert by_name["clip"]["frames"] == 5 and by_name["clip"]["frames_with_face"] == 4
  with open(os.path.join(out, "faces.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["source"], r["frame"], r["face_id"]) for r in rows] == [
      ("astronaut", "1", "1"), ("clip", "1", "1"), ("clip", "2", "1"),
      ("clip", "4", "1"), ("clip", "5", "1")]
  assert [float(r["timestamp"]) for r in rows] == [0, 0, 0.04, 0.12, 0.16]
  probabilities = np.float64([[r[f"p_{n}"] for n in faces_expression_names()]
                              for r in rows])
  np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-4)
  assert all(float(r["detection_score"]) >= faces.MIN_SCORE for r in rows)
  for name in ("astronaut_face1", "clip_face1"):
    with Image.open(os.path.join(out, f"{name}.png")) as plot:
      assert plot.size[0] > 500
  assert not os.path.exists(os.path.join(out, "cropped_aligned"))  # only when asked
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["aligned"] == summary["aligned"]


def faces_expression_names():
  from tfds_affwild2 import annotations
  return annotations.EXPRESSION_NAMES_8


def test_bad_inputs_name_the_file(tmp_path):
  not_image = tmp_path / "notes.jpg"
  not_image.write_text("not an image")
  with pytest.raises(InputError, match=f"{not_image}: cannot read"):
    list(faces.read_frames(str(not_image)))
  with pytest.raises(InputError, match="no such file"):
    list(faces.read_frames(str(tmp_path / "missing.mp4")))
  assert faces.unique_names(["a/clip.mp4", "b/clip.gif", "c/clip.png"]) == [
      "clip", "clip_2", "clip_3"]


def test_mp4_video_frames_are_read(tmp_path):
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  frames = np.stack([skimage_data.astronaut()[::2, ::2]] * 4)
  path = str(tmp_path / "clip.mp4")
  iio.imwrite(path, frames, fps=4, codec="libx264")
  read = list(faces.read_frames(path))
  assert len(read) == 4 and read[0].shape == frames[0].shape and read[0].dtype == np.uint8
  assert np.abs(read[2].astype(int) - frames[2]).mean() < 8  # lossy codec, same picture
