"""The ABAW reader: every layout generation, the per-frame merge, bad input."""
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tfds_affwild2 import annotations, layout, release, synthetic
from tfds_affwild2.annotations import AnnotationError

SUMMARY_KEYS = ("videos", "frames", "labelled", "expr_class_counts", "au_positive_counts")


def read_split(root, split, num_expr_classes=8, source="per_task"):
  found = layout.find_release_layout(root)
  summary = release.SplitSummary(num_expr_classes=num_expr_classes)
  index = release.ImageIndex(found.image_roots)
  if source == "mtl":
    examples = list(release.iter_mtl_examples(found, split, summary, index))
  else:
    examples = list(release.iter_per_task_examples(found, split, summary, index))
  return examples, summary


@pytest.mark.parametrize("generation,mtl_format", [
    ("abaw1", None), ("abaw2", "abaw3"), ("abaw3", "abaw3"), ("abaw6", "abaw4")])
def test_every_generation_parses_to_the_generated_counts(tmp_path, generation,
                                                         mtl_format):
  truth = synthetic.generate_release(str(tmp_path), seed=11, generation=generation,
                                     mtl_format=mtl_format, num_videos=6,
                                     frames_per_video=20)
  found = layout.find_release_layout(tmp_path)
  assert set(found.task_split_dirs) == {"va", "expr", "au"}
  assert len(found.image_roots) == (2 if generation == "abaw6" else 1)
  for split in ("train", "validation"):
    examples, summary = read_split(str(tmp_path), split, truth["num_expr_classes"])
    expected = truth["splits"][split]
    for key in SUMMARY_KEYS:
      assert getattr(summary, key) == expected[key], (split, key)
    assert summary.skipped["image_absent"] == expected["skipped"]["image_absent"]
    assert summary.skipped["no_valid_label"] == expected["skipped"]["no_valid_label"]
    assert len(examples) == expected["frames"]
    if mtl_format:
      _, mtl_summary = read_split(str(tmp_path), split, source="mtl")
      assert mtl_summary.frames + mtl_summary.skipped["no_valid_label"] + \
          mtl_summary.skipped["image_absent"] == truth["mtl"][split]["rows"]
      assert mtl_summary.labelled == truth["mtl"][split]["labelled"]


def test_frame_labels_are_the_union_of_the_task_files(synthetic_release):
  root, _ = synthetic_release
  examples, _ = read_split(root, "train")
  found = layout.find_release_layout(root)
  checked = 0
  for example in examples[::7]:
    for task, folder in found.task_split_dirs.items():
      path = os.path.join(folder["train"], example.video + ".txt")
      label = example.labels.get(task, release.NO_LABEL)
      if not os.path.exists(path):
        assert not label.valid
        continue
      with open(path) as f:
        lines = f.read().splitlines()
      line = lines[example.frame] if example.frame < len(lines) else None
      if line is None:
        assert not label.valid
        continue
      values = [float(v) for v in line.split(",")]
      if task == "va":
        valid = -5.0 not in values
        assert label.valid == valid
        if valid:
          np.testing.assert_allclose(label.value, values, atol=1e-6)
      elif task == "expr":
        assert label.valid == (values[0] != -1)
        if label.valid:
          assert label.value == int(values[0])
      else:
        assert label.valid == (values != [-1.0] * 12)
        if label.valid:
          assert list(label.value) == [int(v) for v in values]
      checked += 1
  assert checked > 20


def test_seven_class_config_masks_other(synthetic_release):
  root, truth = synthetic_release
  examples, summary = read_split(root, "train", num_expr_classes=7)
  other = truth["splits"]["train"]["expr_class_counts"][7]
  assert summary.skipped["expr_class_outside_config"] == other
  assert summary.labelled["expr"] == truth["splits"]["train"]["labelled"]["expr"] - other
  assert all(not e.labels["expr"].valid or e.labels["expr"].value < 7 for e in examples
             if "expr" in e.labels)


def test_layout_override_and_nested_release(tmp_path):
  synthetic.generate_release(str(tmp_path / "deep" / "abaw"), seed=2, num_videos=4,
                             frames_per_video=10, generation="abaw3", mtl_format=None)
  found = layout.find_release_layout(tmp_path)
  assert found.image_roots and "expr" in found.task_split_dirs
  moved = tmp_path / "faces"
  shutil.move(found.image_roots[0], moved)
  assert not layout.find_release_layout(tmp_path).image_roots
  fixed = layout.layout_with_overrides(layout.find_release_layout(tmp_path),
                                       {"image_roots": ["faces"]})
  assert fixed.image_roots == (str(moved),)
  with pytest.raises(ValueError, match="unknown layout override"):
    layout.layout_with_overrides(found, {"images": ["x"]})


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    f.write(text)
  return path


EXPR_HEADER = ",".join(annotations.EXPRESSION_NAMES_8)
AU_HEADER = ",".join(annotations.AU_NAMES)


@pytest.mark.parametrize("task,text,line,message", [
    ("va", "valence,arousal\n0.1,0.2\n1.5,0.0\n", 3, "outside"),
    ("va", "valence,arousal\n0.1\n", 2, "expected 2"),
    ("va", "val,aro\n0.1,0.2\n", 1, "unknown VA header"),
    ("va", "valence,arousal\n0.1,abc\n", 2, "not a number"),
    ("va", "valence,arousal\n0.1,nan\n", 2, "not a finite"),
    ("va", "", 1, "empty file"),
    ("expr", EXPR_HEADER + "\n3\n8\n", 3, "not a class index"),
    ("expr", EXPR_HEADER + "\n2.5\n", 2, "not a class index"),
    ("expr", "Neutral,Happy\n1\n", 1, "unknown EXPR header"),
    ("expr", ",".join(annotations.EXPRESSION_NAMES_7) + "\n7\n", 2, "0..6"),
    ("au", AU_HEADER + "\n" + ",".join(["0"] * 11 + ["2"]) + "\n", 2, "AU26=2"),
    ("au", AU_HEADER + "\n" + ",".join(["0"] * 11) + "\n", 2, "expected 12"),
])
def test_bad_annotation_files_name_file_and_line(tmp_path, task, text, line, message):
  path = write(str(tmp_path / "video1.txt"), text)
  with pytest.raises(AnnotationError, match=message) as info:
    annotations.read_task_file(path, task)
  assert str(info.value).startswith(f"{path}:{line}:")


def test_known_irregularities_are_accepted(tmp_path):
  # BOM, CRLF, -5.0 as a float, trailing blank line: all real-data habits.
  path = write(str(tmp_path / "v.txt"),
               "\ufeffvalence,arousal\r\n0.5,-0.5\r\n-5.0,-5.0\r\n-5,0.2\r\n\r\n")
  labels, _ = annotations.read_task_file(path, "va")
  assert [label.valid for label in labels] == [True, False, False]
  np.testing.assert_allclose(labels[0].value, [0.5, -0.5])
  path = write(str(tmp_path / "a.txt"), AU_HEADER + "\n" + ",".join(["-1"] * 12) +
               "\n" + ",".join(["1", "-1"] + ["0"] * 10) + "\n")
  labels, _ = annotations.read_task_file(path, "au")
  assert not labels[0].valid and labels[1].valid and labels[1].value[1] == -1


@pytest.mark.parametrize("image,message", [
    ("../other/00001.jpg", "inside the release"),
    ("/abs/00001.jpg", "inside the release"),
    ("video/frame.jpg", "frame number"),
])
def test_mtl_paths_must_stay_inside_the_release(tmp_path, image, message):
  path = write(str(tmp_path / "training_set_annotations.txt"),
               "image,valence,arousal,expression,aus\n"
               f"{image},0.1,0.2,3," + ",".join(["0"] * 12) + "\n")
  with pytest.raises(AnnotationError, match=message) as info:
    list(annotations.iter_mtl_file(path))
  assert str(info.value).startswith(f"{path}:2:")


def _example_with_image(tmp_path, save):
  path = str(tmp_path / "00001.jpg")
  save(path)
  return release.Example("v", 1, path, {}, "VA/v.txt:2")


def test_corrupt_and_mismatched_images(tmp_path):
  good = Image.fromarray(np.full((112, 112, 3), 90, np.uint8))
  example = _example_with_image(tmp_path, lambda p: good.save(p, quality=90))
  with open(example.image_path, "rb") as f:
    assert release.read_checked_jpeg(example) == f.read()  # untouched bytes

  buffer = io.BytesIO()
  good.save(buffer, format="JPEG")
  truncated = _example_with_image(
      tmp_path, lambda p: open(p, "wb").write(buffer.getvalue()[:300]))
  with pytest.raises(ValueError, match="bad image") as info:
    release.read_checked_jpeg(truncated)
  assert truncated.image_path in str(info.value) and "VA/v.txt:2" in str(info.value)

  small = _example_with_image(
      tmp_path, lambda p: Image.new("L", (64, 80)).save(p, format="JPEG"))
  with pytest.raises(ValueError, match="expected JPEG RGB 112x112"):
    release.read_checked_jpeg(small)
  fixed = Image.open(io.BytesIO(release.read_checked_jpeg(small, fix_mismatched=True)))
  assert fixed.size == (112, 112) and fixed.mode == "RGB"


def test_test_list_reads_videos_and_image_paths(synthetic_release, tmp_path):
  root, truth = synthetic_release
  found = layout.find_release_layout(root)
  summary = release.SplitSummary(num_expr_classes=8)
  examples = list(release.iter_test_examples(found, summary,
                                             release.ImageIndex(found.image_roots)))
  assert len(examples) == truth["splits"]["test"]["images"]
  assert summary.videos == truth["splits"]["test"]["videos"]
  assert all(not label.valid for e in examples for label in e.labels.values())
