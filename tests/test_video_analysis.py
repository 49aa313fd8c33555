"""Faces in videos and streams (affect_jax.video): every face tracked with an id through
leaving and coming back, batched in-memory predictions equal to each crop's own, the
rows, summaries and plots, the Python API on arrays of any layout, and bad inputs
skipped and counted. Videos are made from scikit-image's astronaut."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from affect_jax import cli
from affect_jax.errors import InputError
from affect_jax.inference import faces, media_frames
from affect_jax.video import analyzer as analyzer_lib
from affect_jax.video import batching, rows as rows_lib, sample_videos, tracking


@pytest.fixture(scope="module")
def astronaut():
  from skimage import data
  return data.astronaut()


@pytest.fixture(scope="module")
def analyzer(uninterrupted_run):
  """The trained tiny run, restored once for the module; a detection every 5 frames."""
  _, workdir = uninterrupted_run("xla")
  return analyzer_lib.Analyzer.from_workdir(workdir, batch_size=8, detect_every=5)


def test_batches_are_padded_to_few_sizes_and_keep_their_order():
  assert [batching.padded_size(n, 32, 1) for n in (1, 2, 3, 5, 17, 32)] == [
      1, 2, 4, 8, 32, 32]
  assert [batching.padded_size(n, 32, 8) for n in (1, 9, 20)] == [8, 16, 32]
  seen = []

  def predict(images):
    seen.append(len(images))
    return {"value": images[:, 0, 0, 0].astype(np.float32) * 2}

  batcher = batching.CropBatcher(predict, batch_size=4)
  done = []
  for key in range(10):
    done += batcher.add(key, np.full((2, 2, 3), key, np.uint8))
  done += batcher.finish()
  assert [key for key, _ in done] == list(range(10))
  assert [float(out["value"]) for _, out in done] == [2.0 * k for k in range(10)]
  assert seen == [4, 4, 4]  # the last 2 crops padded to the compiled full batch


def face_centre(actor, frame, face):
  """Where the actor's face centre is in the frame (the patch's face sits at about
  (98, 85) of its 200 px)."""
  left, top = sample_videos.patch_corner(actor, frame, 200, sample_videos.WIDTH,
                                         sample_videos.HEIGHT)
  return np.array([left + 98, top + 85])


def test_faces_keep_their_ids_through_leaving_and_coming_back():
  actors = [sample_videos.Actor(start=(20, 100), velocity=(3.0, 1.0), absent=(22, 41)),
            sample_videos.Actor(start=(420, 60), velocity=(-2.0, 1.0), mirrored=True,
                                region=(320, 0, 640, 360))]
  tracker = tracking.FaceTracker(
      faces.create_detector(), faces.create_landmark_predictor("always"),
      detect_every=5, reidentifier=tracking.create_reidentifier())
  seen = {}
  for frame, image in enumerate(sample_videos.sample_frames(actors, 52)):
    for face in tracker.update(image):
      seen.setdefault(face.face_id, []).append(frame)
      box = face.box
      centre = np.array([(box.left + box.right) / 2, (box.top + box.bottom) / 2])
      actor = actors[0] if centre[0] < 320 else actors[1]
      assert np.abs(centre - face_centre(actor, frame, None)).max() < 20, (frame, box)
  assert sorted(seen) == [1, 2]
  # The face that left is lost on its first absent frame and found again on the first
  # detection frame after it is back (frame 45: detections every 5 frames), as face 1.
  assert seen[1] == list(range(22)) + list(range(45, 52))
  assert seen[2] == list(range(52))
  assert tracker.detections_run == 12  # 11 detection frames + the frame it was lost


def test_without_landmarks_the_correlation_tracker_follows_faces():
  actors = sample_videos.actors_for(2)
  tracker = tracking.FaceTracker(faces.create_detector(), None, detect_every=10)
  counts = [len(tracker.update(image))
            for image in sample_videos.sample_frames(actors, 12)]
  assert counts == [2] * 12 and tracker.detections_run == 2
  assert all(t.tracker is not None for t in tracker.tracks)


def write_sample_video(path, actors, frames):
  return sample_videos.write_video(str(path), sample_videos.sample_frames(actors, frames))


def test_video_rows_are_each_crops_own_predictions(analyzer, tmp_path):
  video = write_sample_video(tmp_path / "two.mp4", sample_videos.actors_for(2), 13)
  analysis = analyzer.analyze_video(video, crops_dir=str(tmp_path / "crops"))
  assert analysis.frames == 13 and analysis.face_ids == [1, 2]
  assert [(r.frame, r.face_id) for r in analysis.rows] == [
      (f, i) for f in range(1, 14) for i in (1, 2)]
  np.testing.assert_allclose(analysis.frame_seconds, np.arange(13) / 30, atol=1e-6)
  # Frame 11 is a detection frame, its faces in the middle of the third batch of 8:
  # aligned in their detected boxes and predicted one at a time, they give the rows.
  image = [f.image for f in media_frames.iter_frames(video)][10]
  landmarks = faces.create_landmark_predictor("always")
  size = analyzer.model.image_size
  for row in (r for r in analysis.rows if r.frame == 11):
    assert row.detected
    crop = faces.align_face(image, faces.FaceBox(*row.box, row.detection_score),
                            landmarks)
    crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BOX))
    alone = analyzer.model.predict(np.repeat(crop[None], 8, 0))
    np.testing.assert_allclose(row.expression, np.asarray(alone["expression"])[0],
                               atol=2e-3)
    np.testing.assert_allclose(row.va, np.asarray(alone["va"])[0], atol=2e-3)
    saved = np.asarray(Image.open(tmp_path / "crops" / f"two_face{row.face_id}" /
                                  "00011.jpg"), np.float64)
    assert np.abs(saved - crop).mean() < 3  # as JPEG keeps it
  records = analysis.records()
  assert list(records[0]) == rows_lib.columns(analysis.rows)
  expression_probabilities = {k[2:]: v for k, v in records[0].items()
                              if k.startswith("p_") and not k.startswith("p_AU")}
  assert records[0]["expression"] == max(expression_probabilities,
                                         key=expression_probabilities.get)
  np.testing.assert_allclose(sum(v for k, v in records[0].items()
                                 if k.startswith("p_") and not k.startswith("p_AU")),
                             1.0, atol=1e-5)
  summary = analysis.summary()
  assert summary["most_faces_in_a_frame"] == 2 and summary["frames_with_face"] == 13
  for face in summary["faces"]:
    assert face["frames_seen"] == 13 and face["frames_detected"] == 3
    assert sum(face["expression_shares"].values()) == pytest.approx(1.0, abs=1e-3)
    va = np.stack([r.va for r in analysis.rows if r.face_id == face["face_id"]])
    assert face["mean_valence"] == pytest.approx(va[:, 0].mean(), abs=1e-4)
  try:
    import pandas  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pip install pandas"):
      analysis.data_frame()
  else:
    frame = analysis.data_frame()
    assert list(frame.columns) == rows_lib.columns(analysis.rows) and len(frame) == 26


def test_images_of_any_layout_give_the_same_face(analyzer, astronaut, tmp_path):
  as_16_bits = astronaut.astype(np.uint16) * 257
  grey = np.asarray(Image.fromarray(astronaut).convert("L"))
  transparent = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
  transparent[:, 400:, 3] = 0  # a transparent strip: laid over white
  arrays = {"rgb": astronaut, "grey": grey, "grey_1": grey[..., None],
            "rgba": transparent, "uint16": as_16_bits, "float": astronaut / 255.0}
  reference = analyzer.analyze_image(astronaut).rows[0]
  for name, array in arrays.items():
    rows = analyzer.analyze_image(array, name).rows
    assert len(rows) == 1, name
    assert np.abs(np.array(rows[0].box) - reference.box).max() <= 6, name
  assert (media_frames.as_rgb8(transparent)[:, 400:] == 255).all()
  # A 16-bit grey PNG: Pillow's own conversion clips it to white where it is not
  # black, and the face is lost.
  png16 = str(tmp_path / "grey16.png")
  Image.fromarray(grey.astype(np.uint16) * 257).save(png16)
  with Image.open(png16) as image:
    clipped = np.asarray(image.convert("RGB"))
  assert (clipped == 255).mean() > 0.85
  assert faces.find_face(analyzer.detector, clipped) == (None, 0)
  cmyk = str(tmp_path / "cmyk.jpg")
  Image.fromarray(astronaut).convert("CMYK").save(cmyk, quality=95)
  for path in (png16, cmyk):
    analysis = analyzer.analyze_image(path)
    assert len(analysis.rows) == 1, path
    assert np.abs(np.array(analysis.rows[0].box) - reference.box).max() <= 6, path
  with pytest.raises(InputError, match=r"\[height, width\]"):
    analyzer.analyze_image(np.zeros(5, np.uint8))


def test_frame_times_follow_the_container(tmp_path, astronaut):
  small = astronaut[::4, ::4]
  gif = str(tmp_path / "variable.gif")
  images = [Image.fromarray(np.roll(small, 8 * i, 1)) for i in range(4)]
  images[0].save(gif, save_all=True, append_images=images[1:],
                 duration=[40, 40, 200, 40], loop=0)
  frames = list(media_frames.iter_frames(gif))
  assert [f.number for f in frames] == [1, 2, 3, 4]
  np.testing.assert_allclose([f.seconds for f in frames], [0, 0.04, 0.08, 0.28])
  video = sample_videos.write_video(str(tmp_path / "clip.mp4"),
                                    iter([small] * 5), fps=12.5)
  np.testing.assert_allclose([f.seconds for f in media_frames.iter_frames(video)],
                             np.arange(5) / 12.5, atol=1e-6)
  # An MP4 of variable frame rate (FFmpeg's concat of frames with their durations;
  # the faces extra's imageio-ffmpeg ships the binary): each frame keeps its time.
  import subprocess
  import imageio_ffmpeg
  durations = [0.04, 0.04, 0.2, 0.04, 0.1]
  listing = []
  for i, duration in enumerate(durations):
    Image.fromarray(np.roll(small, 8 * i, 1)).save(tmp_path / f"frame{i}.png")
    listing += [f"file 'frame{i}.png'", f"duration {duration}"]
  listing.append(f"file 'frame{len(durations) - 1}.png'")  # concat's last duration
  (tmp_path / "list.txt").write_text("\n".join(listing) + "\n")
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "concat",
                  "-safe", "0", "-i", "list.txt", "-fps_mode", "vfr", "-c:v", "mpeg4",
                  "variable.mp4"], cwd=tmp_path, check=True)
  seconds = [f.seconds for f in media_frames.iter_frames(str(tmp_path / "variable.mp4"))]
  np.testing.assert_allclose(seconds[:5], [0, 0.04, 0.08, 0.28, 0.32], atol=1e-3)


def test_bad_inputs_are_skipped_counted_or_refused(analyzer, tmp_path, monkeypatch,
                                                   capsys):
  clip = write_sample_video(tmp_path / "clip.mp4", sample_videos.actors_for(1), 6)
  wall = tmp_path / "wall.png"
  Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(wall)
  notes = tmp_path / "notes.mp4"
  notes.write_text("not a video")
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  huge = tmp_path / "huge.png"
  Image.new("1", (8000, 8000)).save(huge)  # 8000 x 8000 pixels in 8 kB
  inputs = [str(p) for p in (wall, clip, notes, empty, huge, tmp_path / "gone.mp4")]
  out = tmp_path / "out"
  summary = faces.analyse_media("unused", inputs, str(out), analyzer=analyzer)
  assert [s["name"] for s in summary["inputs"]] == ["clip"]
  reasons = [s["reason"] for s in summary["skipped"]]
  assert reasons[0] == (f"{wall}: no face found in its 1 frame(s) (dlib's frontal "
                        "face detector finds faces of about 40 pixels and more, turned "
                        "less than about 45 degrees)")
  assert reasons[1].startswith(f"{notes}: cannot read as an image or a video")
  assert reasons[2] == f"{empty}: the file is empty (0 bytes)"
  assert reasons[3].startswith(f"{huge}: a 8000x8000 frame is larger than the "
                               "36,000,000 pixels analysed")
  assert reasons[4] == f"{tmp_path / 'gone.mp4'}: no such file"
  with open(out / "faces.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and {r["source"] for r in rows} == {"clip"}
  assert [float(r["timestamp"]) for r in rows] == pytest.approx(np.arange(6) / 30,
                                                              abs=1e-6)
  with Image.open(out / "clip_face1.png") as plot:
    assert plot.size[0] > 500
  with open(out / "summary.json") as f:
    assert json.load(f)["skipped"] == summary["skipped"]
  # A stream's item that is not an image is counted and passed over.
  image = next(media_frames.iter_frames(clip)).image
  analysis = analyzer.analyze_frames([image, "not a frame", image], fps=30)
  assert analysis.skipped_frames == 1 and analysis.frames == 2
  assert [r.frame for r in analysis.rows] == [1, 3]
  # Without a face anywhere: one error line from the command, exit status 1.
  monkeypatch.setattr(analyzer_lib.Analyzer, "from_workdir",
                      classmethod(lambda cls, *args, **kwargs: analyzer))
  assert cli.main(["faces", "--workdir", "run", "--input", str(wall), "--input",
                   str(empty), "--out", str(tmp_path / "none")]) == 1
  error = capsys.readouterr().err.strip().splitlines()
  assert error[-1] == (f"error: no face in any input: {reasons[0]}; {reasons[2]}")


def test_an_export_runs_without_the_run_and_predicts_the_same(analyzer, astronaut,
                                                              uninterrupted_run,
                                                              tmp_path):
  import jax
  from affect_jax.video import export
  _, workdir = uninterrupted_run("xla")
  out = str(tmp_path / "export")
  try:
    import flatbuffers  # noqa: F401  (jax serialises with it)
  except ImportError:
    with pytest.raises(InputError, match="pip install flatbuffers"):
      export.export_run(workdir, out, platforms=["cpu"])
    return
  assert export.main(["--workdir", workdir, "--out", out, "--platforms", "cpu"]) == 0
  with open(os.path.join(out, "model.json")) as f:
    metadata = json.load(f)
  assert metadata["outputs"] == ["au", "expression", "va"]
  assert metadata["image_size"] == analyzer.model.image_size
  with open(os.path.join(out, "model.jax_export"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  size = metadata["image_size"]
  images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), np.uint8)
  ours = analyzer.model.predict(images)
  for batch in (8, 3):  # any batch size
    theirs = exported.call(images[:batch])
    for task in ("expression", "au", "va"):
      np.testing.assert_allclose(np.asarray(theirs[task]),
                                 np.asarray(ours[task])[:batch], atol=1e-5)
  from_export = analyzer_lib.Analyzer.from_export(out, batch_size=8)
  row, reference = (a.analyze_image(astronaut).rows[0]
                    for a in (from_export, analyzer))
  assert row.box == reference.box
  np.testing.assert_allclose(row.va, reference.va, atol=1e-5)
  np.testing.assert_allclose(row.au, reference.au, atol=1e-5)
  (tmp_path / "bad").mkdir()
  with pytest.raises(InputError, match="model.jax_export does not exist"):
    analyzer_lib.Analyzer.from_export(str(tmp_path / "bad"))


def test_smoothing_averages_each_face_over_its_own_frames():
  def row(frame, face_id, valence):
    return rows_lib.FaceRow("clip", frame, frame / 30, face_id, (0, 0, 1, 1), 1.0, True,
                            expression=np.array([valence, 1 - valence]),
                            va=np.array([valence, 0.0]))
  rows = [row(1, 1, 0.0), row(1, 2, 1.0), row(2, 1, 0.3), row(2, 2, 0.5),
          row(3, 1, 0.6), row(5, 1, 0.9)]  # face 1 is gone in frame 4
  smoothed = rows_lib.smooth_rows(rows, 3)
  valence = [float(r.va[0]) for r in smoothed]
  np.testing.assert_allclose(valence, [0.15, 0.75, 0.3, 0.75, 0.45, 0.9])
  np.testing.assert_allclose([r.expression.sum() for r in smoothed], 1.0)
  assert rows_lib.smooth_rows(rows, 1) is rows
