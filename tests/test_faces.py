"""Faces in any image or video: detection (dlib-bin's HOG detector), the largest of
several faces, crops, per-frame predictions with plots, and bad inputs."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from affect_jax import checkpoints, faces, train  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def astronaut():
  return skimage_data.astronaut()  # 512 x 512, one face of about 90 pixels


@pytest.fixture(scope="module")
def detector():
  return faces.create_detector()


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
  """A checkpoint of the tiny model at initialisation: the plumbing needs no training."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(None)
  trainer_mesh = train.create_mesh()
  model = train.create_model(config.model)
  state = train.create_train_state(config, model, trainer_mesh,
                                   train.create_learning_rate_fn(config))
  train.check_and_write_config(config, workdir)
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
  summary = faces.analyse_media(untrained_run, [photo, clip], out, smooth_window=3)
  by_name = {s["name"]: s for s in summary["inputs"]}
  assert by_name["astronaut"]["frames"] == by_name["astronaut"]["frames_with_face"] == 1
  assert by_name["clip"]["frames"] == 5 and by_name["clip"]["frames_with_face"] == 4
  with open(os.path.join(out, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["video"], r["frame"]) for r in rows] == [
      ("astronaut", "1"), ("clip", "1"), ("clip", "2"), ("clip", "4"), ("clip", "5")]
  probabilities = np.float64([[r[f"p_{n}"] for n in faces_expression_names()]
                              for r in rows])
  np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-4)
  with open(os.path.join(out, "faces.csv")) as f:
    boxes = list(csv.DictReader(f))
  assert len(boxes) == 5 and all(float(b["score"]) >= faces.MIN_SCORE for b in boxes)
  for name in ("astronaut", "clip"):
    with Image.open(os.path.join(out, f"{name}.png")) as plot:
      assert plot.size[0] > 500
  with Image.open(os.path.join(out, "cropped_aligned", "clip", "00004.jpg")) as crop:
    assert crop.size == (112, 112)


def faces_expression_names():
  from tfds_affwild2 import annotations
  return annotations.EXPRESSION_NAMES_8


def test_bad_inputs_name_the_file(tmp_path, detector, monkeypatch):
  not_image = tmp_path / "notes.jpg"
  not_image.write_text("not an image")
  with pytest.raises(ValueError, match=f"{not_image}: cannot read"):
    list(faces.read_frames(str(not_image)))
  with pytest.raises(FileNotFoundError, match="no such file"):
    list(faces.read_frames(str(tmp_path / "missing.mp4")))
  wall = tmp_path / "wall.png"
  Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(wall)
  with pytest.raises(ValueError, match=f"{wall}: no face found in its 1 frame"):
    faces.extract_faces(str(wall), "wall", str(tmp_path / "crops"), detector)
  monkeypatch.setattr(faces, "read_frames", lambda path: iter(()))
  with pytest.raises(ValueError, match="empty.gif: has no frames"):
    faces.extract_faces(str(tmp_path / "empty.gif"), "empty", str(tmp_path / "crops"),
                        detector)
  assert faces.unique_names(["a/clip.mp4", "b/clip.gif", "c/clip.png"]) == [
      "clip", "clip_2", "clip_3"]
