"""The bad-input catalogue: every bad input the system can meet gets a clear message
(naming the file and line, the config key, or the checkpoint) and loses nothing.
README's "Bad input" table lists what each gets."""
import os
import shutil

import jax
import pytest
from PIL import Image

from affect_jax import config_checks
from affect_jax.train import checkpoints
from affect_jax.train import loop
from configs import tiny
from tfds_affwild2 import annotations, build, layout, release, synthetic
from tfds_affwild2.annotations import AnnotationError

AU_HEADER = ",".join(annotations.AU_NAMES)


def write_bytes(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


@pytest.mark.parametrize("data,line,message", [
    (b"valence,arousal\n0.1,0.2\n0.3,\xe9\n", 3, "not UTF-8"),
    (b"", 1, "empty file"),
    (b"\n\n", 1, "empty file"),
    (b"valence;arousal\n0.1;0.2\n", 1, "unknown VA header"),
    (b"valence,arousal\n0.1,0.2,0.3\n", 2, "expected 2"),
])
def test_annotation_file_encodings_and_shapes(tmp_path, data, line, message):
  path = write_bytes(tmp_path / "v.txt", data)
  with pytest.raises(AnnotationError, match=message) as info:
    annotations.read_task_file(path, "va")
  assert str(info.value).startswith(f"{path}:{line}:")


def test_crlf_bom_and_old_mac_line_endings_read_alike(tmp_path):
  expected = None
  for i, ending in enumerate((b"\n", b"\r\n", b"\r")):
    body = ending.join([b"\xef\xbb\xbfvalence,arousal", b"0.1,0.2", b"-5,-5", b"0.3,0.4"])
    labels, _ = annotations.read_task_file(write_bytes(tmp_path / f"{i}.txt", body), "va")
    got = [(label.valid, None if label.value is None else label.value.tolist())
           for label in labels]
    assert expected is None or got == expected
    expected = got
  assert [v for v, _ in expected] == [True, False, True]


def test_duplicate_frame_in_mtl_file_names_both_lines(tmp_path):
  synthetic.generate_release(str(tmp_path), seed=4, num_videos=4, frames_per_video=8)
  path = tmp_path / "training_set_annotations.txt"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines + [lines[3]]) + "\n")
  found = layout.find_release_layout(tmp_path)
  summary = release.SplitSummary(num_expr_classes=8)
  with pytest.raises(AnnotationError, match="already listed at line 4") as info:
    list(release.iter_mtl_examples(found, "train", summary,
                                   release.ImageIndex(found.image_roots)))
  assert str(info.value).startswith(f"{path}:{len(lines) + 1}:")


@pytest.mark.parametrize("damage,message", [
    ("truncate", "bad image"),
    ("grayscale", "expected JPEG RGB 112x112"),
    ("resize", "expected JPEG RGB 112x112"),
    ("png", "expected JPEG RGB 112x112"),
])
def test_bad_images_stop_the_build_naming_image_and_annotation(tmp_path, damage,
                                                               message):
  root = tmp_path / "release"
  synthetic.generate_release(str(root), seed=5, num_videos=4, frames_per_video=10,
                             mtl_format=None)
  found = layout.find_release_layout(root)
  video_dir = sorted((root / "cropped_aligned").iterdir())[0]
  image_path = sorted(video_dir.iterdir())[0]
  image = Image.open(image_path)
  if damage == "truncate":
    image_path.write_bytes(image_path.read_bytes()[:200])
  elif damage == "grayscale":
    image.convert("L").save(image_path, format="JPEG")
  elif damage == "resize":
    image.resize((96, 96)).save(image_path, format="JPEG")
  else:
    image.save(image_path, format="PNG")
  with pytest.raises(ValueError, match=message) as info:
    build.build_dataset(str(root), str(tmp_path / "tfds"), "union")
  assert str(image_path) in str(info.value)
  if damage != "truncate":  # what can be converted is, when asked
    builder = build.build_dataset(str(root), str(tmp_path / "tfds_fixed"), "union",
                                  fix_mismatched_images=True)
    assert builder.info.splits["train"].num_examples > 0
  assert found.image_roots  # the release itself is left as it was found


def test_missing_image_folder_and_frames_are_counted_not_fatal(tmp_path):
  truth = synthetic.generate_release(str(tmp_path), seed=6, num_videos=5,
                                     frames_per_video=12, generation="abaw3",
                                     mtl_format=None)
  found = layout.find_release_layout(tmp_path)
  train_videos = sorted(os.listdir(found.task_split_dirs["va"]["train"]))
  removed = train_videos[0][:-4]
  shutil.rmtree(tmp_path / "cropped_aligned" / removed)
  summary = release.SplitSummary(num_expr_classes=8)
  examples = list(release.iter_per_task_examples(found, "train", summary,
                                                 release.ImageIndex(found.image_roots)))
  assert summary.frames < truth["splits"]["train"]["frames"]
  assert summary.skipped["image_absent"] > truth["splits"]["train"]["skipped"][
      "image_absent"]
  assert all(e.video != removed for e in examples)


@pytest.mark.parametrize("key,value,message", [
    ("model.tasks", ("expression", "gaze"), "model.tasks"),
    ("loss.expression", "hinge", "loss.expression='hinge'"),
    ("loss.va", "l1", "loss.va='l1'"),
    ("optimizer.name", "lion", "optimizer.name"),
    ("input.augment", "extreme", "input.augment"),
    ("input.batch_size", 0, "input.batch_size=0"),
    ("num_train_steps", -5, "num_train_steps=-5"),
    ("model.num_expr_classes", 6, "model.num_expr_classes=6"),
    ("checkpoint.best_metric", "au_f1", "checkpoint.best_metric='au_f1'"),
    # p_mtl exists only for a model of all three tasks (a VA-only model has no p_mtl)
    ("checkpoint.best_metric", "p_mtl", "checkpoint.best_metric='p_mtl'"),
    ("input.image_size", 16, "input.image_size=16"),
])
def test_bad_config_values_name_their_key(key, value, message):
  config = tiny.get_config()
  if key == "checkpoint.best_metric":
    config.model.tasks = ("va",)
  node, leaf = config, key
  if "." in key:
    parent, leaf = key.split(".")
    node = config[parent]
  node[leaf] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_checks.validate_config(config)


def test_unknown_keys_and_wrong_types_are_refused_by_the_locked_config():
  config = tiny.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.optimiser = "sgd"  # a misspelt key
  with pytest.raises(TypeError):
    config.num_train_steps = "many"


def test_impossible_batch_sizes_and_class_mismatch(built_union):
  _, data_dir = built_union
  config = tiny.get_config()
  config.dataset.data_dir = data_dir
  config.input.batch_size = 12  # 8 devices
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    loop.Trainer(config, "/tmp/unused")
  config.input.batch_size = 8
  config.model.num_expr_classes = 7  # the union dataset has 8 classes
  with pytest.raises(ValueError, match="8 expression classes"):
    loop.Trainer(config, "/tmp/unused")
  config.model.num_expr_classes = 8
  config.dataset.name = "affwild2/mtl"  # not built in this data_dir
  with pytest.raises(FileNotFoundError, match="affect-jax build"):
    loop.Trainer(config, "/tmp/unused")


def test_checkpoints_missing_partial_and_of_another_shape(built_union, tmp_path):
  _, data_dir = built_union
  config = tiny.get_config()
  config.dataset.data_dir = data_dir
  workdir = str(tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    loop.Trainer(config, workdir).restore_for_eval()
  trainer = loop.Trainer(config, workdir, devices=jax.devices()[:1])
  state = trainer.new_state()
  checkpoints.save_checkpoint(trainer.manager, 3, state, force=True)
  trainer.manager.wait_until_finished()
  # A save killed half-way leaves a temporary folder: it is never taken for a checkpoint.
  os.makedirs(os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-123", "state"))
  fresh = loop.Trainer(config, workdir, devices=jax.devices()[:1])
  assert fresh.manager.latest_step() == 3
  assert int(fresh.restore_for_eval().step) == 0
  wider = tiny.get_config()
  wider.dataset.data_dir = data_dir
  wider.model.num_filters = 16
  with pytest.raises(ValueError, match="does not fit this model"):
    loop.Trainer(wider, workdir, devices=jax.devices()[:1]).restore_for_eval()
