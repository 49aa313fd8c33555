"""The dataset builder's data integrity: a changed release is noticed (source fingerprint),
lines split only where the releases end them, bounded line reads, train/validation
leakage, ambiguous frame images, several test lists, ABAW1's 8-AU files, and the build
command's expected errors as one `error:` line."""
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
import tensorflow_datasets as tfds

from affect_jax import cli
from tfds_affwild2 import annotations, build, layout, release, synthetic
from tfds_affwild2 import source_fingerprint as fingerprint_lib
from tfds_affwild2.annotations import AnnotationError
from tfds_affwild2.errors import MissingReleasePartError, ReleaseError

VA_HEADER = "valence,arousal"


def tiny_release(path, **kwargs) -> str:
  options = dict(seed=7, num_videos=6, frames_per_video=8, mtl_format=None)
  synthetic.generate_release(str(path), **{**options, **kwargs})
  return str(path)


def write_bytes(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def train_files(root) -> dict[str, list[tuple[str, str]]]:
  """video -> [(task, its train annotation file)]."""
  found = layout.find_release_layout(root)
  files = {}
  for task, dirs in sorted(found.task_split_dirs.items()):
    for name in sorted(os.listdir(dirs["train"])):
      files.setdefault(name[:-4], []).append((task, os.path.join(dirs["train"], name)))
  return files


def records(builder, split):
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


# Point 1: a rebuild notices that its source changed.

def test_fingerprint_is_stored_and_a_changed_release_is_refused_then_rebuilt(tmp_path):
  root = tiny_release(tmp_path / "release")
  data_dir = str(tmp_path / "tfds")
  builder = build.build_dataset(root, data_dir, "union")
  fingerprint = fingerprint_lib.source_fingerprint(layout.find_release_layout(root))
  with open(os.path.join(builder.data_dir, "metadata.json")) as f:
    assert json.load(f)["source_fingerprint"] == fingerprint
  assert build.build_dataset(root, data_dir, "union").info.metadata[
      "source_fingerprint"] == fingerprint  # unchanged: reused

  video, files = next(iter(train_files(root).items()))
  task, path = files[0]
  with open(path) as f:
    lines = f.read().splitlines()
  lines[1] = {"va": "0.25,-0.75", "expr": "6", "au": ",".join(["1"] * 12)}[task]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(ReleaseError, match="--overwrite") as info:
    build.build_dataset(root, data_dir, "union")
  assert builder.data_dir in str(info.value) and fingerprint[:12] in str(info.value)

  rebuilt = build.build_dataset(root, data_dir, "union", overwrite=True)
  assert rebuilt.info.metadata["source_fingerprint"] != fingerprint
  frame_one = [r for r in records(rebuilt, "train")
               if r["video"].decode() == video and r["frame"] == 1]
  if frame_one:  # frame 1 may have no face image
    if task == "va":
      np.testing.assert_allclose(frame_one[0]["valence_arousal"], [0.25, -0.75])
    elif task == "expr":
      assert frame_one[0]["expression"] == 6
    else:
      assert frame_one[0]["au"].tolist() == [1] * 12


def test_a_dataset_without_fingerprint_and_a_missing_manual_dir_are_errors(tmp_path):
  root = tiny_release(tmp_path / "release")
  data_dir = str(tmp_path / "tfds")
  builder = build.build_dataset(root, data_dir, "union")
  # A dataset already built does not hide a --manual_dir that does not exist.
  missing = str(tmp_path / "no_such_release")
  with pytest.raises(MissingReleasePartError, match="--manual_dir .*no_such_release"):
    build.build_dataset(missing, data_dir, "union")
  metadata_path = os.path.join(builder.data_dir, "metadata.json")
  with open(metadata_path) as f:
    metadata = json.load(f)
  del metadata["source_fingerprint"]  # as a build made before fingerprints were kept
  with open(metadata_path, "w") as f:
    json.dump(metadata, f)
  with pytest.raises(ReleaseError, match="no source fingerprint"):
    build.build_dataset(root, data_dir, "union")


def test_fingerprint_follows_listings_not_places(tmp_path):
  root = tiny_release(tmp_path / "release")
  print_of = lambda r: fingerprint_lib.source_fingerprint(  # noqa: E731
      layout.find_release_layout(r))
  original = print_of(root)
  moved = shutil.copytree(root, tmp_path / "elsewhere")
  assert print_of(moved) == original  # relative paths: a moved release is the same
  image_root = os.path.join(moved, sorted(d for d in os.listdir(moved)
                                          if d.startswith("cropped_aligned"))[0])
  video_dir = os.path.join(image_root, sorted(os.listdir(image_root))[0])
  image = os.path.join(video_dir, sorted(os.listdir(video_dir))[0])
  with open(image, "ab") as f:
    f.write(b"\0")  # a different size
  assert print_of(moved) != original
  os.remove(image)
  without_image = print_of(moved)
  assert without_image != original
  test_list = layout.find_release_layout(moved).test_lists[0]
  with open(test_list, "a") as f:
    f.write("\n")
  assert print_of(moved) != without_image


def test_fingerprint_covers_the_annotation_files_its_config_reads(tmp_path):
  root = tiny_release(tmp_path / "release", mtl_format="abaw4")
  found = layout.find_release_layout(root)
  before = {source: fingerprint_lib.source_fingerprint(found, source)
            for source in ("per_task", "mtl")}
  _, files = next(iter(train_files(root).items()))
  with open(files[0][1], "a") as f:
    f.write("\n")
  assert fingerprint_lib.source_fingerprint(found, "mtl") == before["mtl"]
  assert fingerprint_lib.source_fingerprint(found, "per_task") != before["per_task"]
  with open(found.mtl_files["train"], "a") as f:
    f.write("\n")
  assert fingerprint_lib.source_fingerprint(found, "mtl") != before["mtl"]


# Points 2 and 7: lines end at \n, \r\n or \r only; lines are read with a bound.

@pytest.mark.parametrize("character", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028",
                                       "\u2029", "\x00"])
@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_other_line_breaks_inside_a_line_are_errors_naming_the_line(tmp_path, character,
                                                                   ending):
  # str.splitlines splits at all of these: every later frame took its neighbour's label.
  lines = [VA_HEADER, "0.1,0.2", f"0.3,0.4{character}0.5,0.6", "0.7,0.8"]
  path = write_bytes(tmp_path / "v.txt", ending.join(lines).encode("utf-8"))
  with pytest.raises(AnnotationError, match=f"U\\+{ord(character):04X}") as info:
    annotations.read_task_file(path, "va")
  assert str(info.value).startswith(f"{path}:3:")


def test_a_huge_line_is_refused_quoting_little_and_reading_little(tmp_path):
  line = "0.1," + "9" * 20_000_000
  path = write_bytes(tmp_path / "v.txt", f"{VA_HEADER}\n0.1,0.2\n{line}\n".encode())
  tracemalloc.start()
  try:
    with pytest.raises(AnnotationError, match="longer than") as info:
      annotations.read_task_file(path, "va")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert str(info.value).startswith(f"{path}:3:")
  assert len(str(info.value)) < 600
  assert peak < 2_000_000  # the 20 MB line was never held


def test_long_fields_are_quoted_cut(tmp_path):
  path = write_bytes(tmp_path / "v.txt", f"{VA_HEADER}\n0.1,{'x' * 5000}\n".encode())
  with pytest.raises(AnnotationError, match="not a number") as info:
    annotations.read_task_file(path, "va")
  assert len(str(info.value)) < 600 and "5000 characters" in str(info.value)


def test_mtl_and_test_lists_are_read_with_the_same_checks(tmp_path):
  path = write_bytes(tmp_path / "training_set_annotations.txt",
                     ("image,valence,arousal,expression,aus\n"
                      "v/00001.jpg,0.1,0.2,3," + ",".join(["0"] * 12) + "\f\n").encode())
  with pytest.raises(AnnotationError, match="U\\+000C") as info:
    list(annotations.iter_mtl_file(path))
  assert str(info.value).startswith(f"{path}:2:")
  root = tiny_release(tmp_path / "release")
  found = layout.find_release_layout(root)
  with open(found.test_lists[0], "ab") as f:
    f.write("video\x85name\n".encode())
  with pytest.raises(AnnotationError, match="U\\+0085"):
    list(release.iter_test_examples(found, release.SplitSummary(num_expr_classes=8),
                                    release.ImageIndex(found.image_roots)))


# Point 3: train/validation leakage.

def _video_with_two_train_tasks(root):
  for video, files in train_files(root).items():
    if len(files) >= 2:
      return video, files
  raise AssertionError("the synthetic release has no video with two train tasks")


def test_a_video_in_train_and_validation_of_one_task_is_refused(tmp_path):
  root = tiny_release(tmp_path / "release")
  video, files = next(iter(train_files(root).items()))
  task, path = files[0]
  validation_dir = layout.find_release_layout(root).task_split_dirs[task]["validation"]
  shutil.copy(path, validation_dir)
  with pytest.raises(ReleaseError, match=f"video {video} is annotated in both") as info:
    build.build_dataset(root, str(tmp_path / "tfds"), "union")
  assert path in str(info.value)


def test_a_video_in_train_of_one_task_and_validation_of_another_is_reported(tmp_path,
                                                                            capsys):
  root = tiny_release(tmp_path / "release")
  video, files = _video_with_two_train_tasks(root)
  task, path = files[0]
  shutil.move(path, layout.find_release_layout(root).task_split_dirs[task]["validation"])
  overlaps = release.check_split_overlap(layout.find_release_layout(root))
  assert [(o.video, o.validation_tasks) for o in overlaps] == [(video, (task,))]
  assert build.main(["--manual_dir", root, "--data_dir", str(tmp_path / "tfds")]) == 0
  out = capsys.readouterr().out
  assert "warning: 1 videos are annotated in the train split" in out and video in out
  builder = tfds.builder("affwild2/union", data_dir=str(tmp_path / "tfds"))
  assert builder.info.metadata["videos_in_train_and_validation"][0]["video"] == video


# Point 9: two image files for one frame.

def test_two_image_files_for_one_frame_are_an_error(tmp_path):
  root = tiny_release(tmp_path / "release")
  found = layout.find_release_layout(root)
  video_dir = os.path.join(found.image_roots[0], sorted(os.listdir(found.image_roots[0]))[0])
  first = sorted(os.listdir(video_dir))[0]
  unpadded = f"{int(first[:-4])}.jpg"
  shutil.copy(os.path.join(video_dir, first), os.path.join(video_dir, unpadded))
  with pytest.raises(ReleaseError, match=f"{first} and {unpadded} are both frame"):
    release.ImageIndex(found.image_roots).frames(os.path.basename(video_dir))


def test_frame_numbers_beyond_any_video_are_errors(tmp_path):
  root = tiny_release(tmp_path / "release")
  found = layout.find_release_layout(root)
  with open(found.test_lists[0], "a") as f:
    f.write("some_video/99999999999.jpg\n")  # a bitmap of 12 GB, an int32 overflow
  with pytest.raises(AnnotationError, match="beyond any video"):
    list(release.iter_test_examples(found, release.SplitSummary(num_expr_classes=8),
                                    release.ImageIndex(found.image_roots)))
  video_dir = os.path.join(found.image_roots[0], sorted(os.listdir(found.image_roots[0]))[0])
  shutil.copy(os.path.join(video_dir, sorted(os.listdir(video_dir))[0]),
              os.path.join(video_dir, "12345678901.jpg"))
  with pytest.raises(ReleaseError, match="12345678901.jpg: frame number beyond"):
    release.ImageIndex(found.image_roots).frames(os.path.basename(video_dir))


# Issue 17, point 1: several test lists, each listed frame once.

def test_frames_named_by_several_test_lists_are_built_once(tmp_path):
  root = tiny_release(tmp_path / "release")
  found = layout.find_release_layout(root)
  index = release.ImageIndex(found.image_roots)
  test_videos = sorted({line.strip() for path in found.test_lists for line in open(path)
                        if line.strip() and "/" not in line and "," not in line})
  assert test_videos
  faces = {v: sorted(index.frames(v)) for v in test_videos}
  last = {v: max(frames) + 2 for v, frames in faces.items()}
  # Another challenge's video list, and a sample file listing every frame 1..N.
  with open(os.path.join(root, "Second_Challenge_test_set_release.txt"), "w") as f:
    f.write("".join(f"{v}\n" for v in test_videos))
  with open(os.path.join(root, "CVPR_9th_ABAW_VA_test_set_sample.txt"), "w") as f:
    f.write("image_location,valence,arousal\n" + "".join(
        f"{v}/{k:05d}.jpg,0,0\n" for v in test_videos for k in range(1, last[v] + 1)))
  listed = set()  # what every list names, read here independently of the reader
  for path in layout.find_release_layout(root).test_lists:
    for line in open(path):
      entry = line.split(",")[0].strip()
      if "/" in entry:
        listed.add((entry.split("/")[0], int(entry.split("/")[1][:-4])))
      elif entry in faces:
        listed.update((entry, k) for k in faces[entry])
  builder = build.build_dataset(root, str(tmp_path / "tfds"), "union")
  keys = [(r["video"].decode(), int(r["frame"])) for r in records(builder, "test")]
  assert sorted(keys) == sorted((v, k) for v, k in listed if k in faces[v])
  summary = builder.info.metadata["summary"]["test"]
  lists = summary["test_lists"]
  assert lists["CVPR_9th_ABAW_VA_test_set_sample.txt"]["entries"] == sum(last.values())
  assert lists["Second_Challenge_test_set_release.txt"]["entries"] == len(test_videos)
  assert sum(c["first_listed_here"] for c in lists.values()) == len(listed)
  assert summary["skipped"]["listed_again"] == sum(
      c["frames"] for c in lists.values()) - len(listed)


# Issue 17, point 2: ABAW1's AU files with 8 AUs.

ABAW1_AUS = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")


def test_abaw1_au_files_fill_their_aus_and_mask_the_others(tmp_path):
  path = write_bytes(tmp_path / "v.txt", ("\n".join([
      ",".join(ABAW1_AUS), "1,0,1,0,1,0,1,1", "0,0,0,0,0,0,-1,0", "-1,-1,-1,-1,-1,-1,1,-1",
      "0,1,0,1,0,1,0,1"]) + "\n").encode())
  task_file = annotations.read_task_file_in_full(path, "au")
  assert task_file.columns == ABAW1_AUS
  assert task_file.dropped_au_labels == {"AU20": 3}  # lines 2, 4 and 5 gave a 0/1 value
  first = dict(zip(annotations.AU_NAMES, task_file.labels[0].value.tolist()))
  assert first == {"AU1": 1, "AU2": 0, "AU4": 1, "AU6": 0, "AU7": -1, "AU10": -1,
                   "AU12": 1, "AU15": 0, "AU23": -1, "AU24": -1, "AU25": 1, "AU26": -1}
  assert not task_file.labels[2].valid  # only AU20 was annotated: nothing left
  bad = write_bytes(tmp_path / "b.txt", (",".join(ABAW1_AUS) + "\n0,0,0,0,0,0,2,0\n")
                    .encode())
  with pytest.raises(AnnotationError, match="AU20=2"):
    annotations.read_task_file(bad, "au")


def _as_abaw1_au_file(path):
  with open(path) as f:
    lines = f.read().splitlines()
  columns = [annotations.AU_NAMES.index(n) if n in annotations.AU_NAMES else None
             for n in ABAW1_AUS]
  rows = [",".join(ABAW1_AUS)]
  for line in lines[1:]:
    values = line.split(",")
    rows.append(",".join(values[c] if c is not None else values[0] for c in columns))
  with open(path, "w") as f:
    f.write("\n".join(rows) + "\n")


def test_a_release_of_abaw1_au_files_builds_with_the_aus_it_annotates(tmp_path):
  root = tiny_release(tmp_path / "release", generation="abaw1")
  found = layout.find_release_layout(root)
  for folder in found.task_split_dirs["au"].values():
    for name in os.listdir(folder):
      _as_abaw1_au_file(os.path.join(folder, name))
  builder = build.build_dataset(root, str(tmp_path / "tfds"), "union")
  kept = [n for n in ABAW1_AUS if n in annotations.AU_NAMES]
  assert builder.info.metadata["annotated_au_names"] == kept
  assert builder.info.metadata["summary"]["train"]["dropped_au_labels"]["AU20"] > 0
  unannotated = [annotations.AU_NAMES.index(n) for n in annotations.AU_NAMES
                 if n not in kept]
  masks = np.stack([r["au_mask"] for r in records(builder, "train")])
  assert masks.any() and not masks[:, unannotated].any()


# Issue 16, point 8 for the build command: one `error:` line.

def test_build_errors_are_one_error_line(tmp_path, capsys):
  missing = str(tmp_path / "nowhere")
  argv = ["--manual_dir", missing, "--data_dir", str(tmp_path / "tfds")]
  assert cli.run_as_script(build.main, argv) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == f"error: --manual_dir {missing}: no such folder (the unpacked ABAW " \
                "release)"
  assert cli.main(["build", *argv]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == err
  with pytest.raises(MissingReleasePartError):  # --verbose: the traceback
    cli.run_as_script(build.main, [*argv, "--verbose"])
  root = tiny_release(tmp_path / "release")
  video, files = next(iter(train_files(root).items()))
  with open(files[0][1], "ab") as f:
    f.write(b"1,2\x0c3\n")
  assert cli.run_as_script(build.main, ["--manual_dir", root, "--data_dir",
                            str(tmp_path / "tfds")]) == 1
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(f"error: {files[0][1]}:")
  assert "Traceback" not in err


def test_a_layout_flag_that_is_not_json_is_an_error_line(tmp_path, capsys):
  assert cli.run_as_script(build.main, ["--manual_dir", str(tmp_path), "--data_dir",
                            str(tmp_path / "tfds"), "--layout", "{image_roots: x}"]) == 1
  assert "error: --layout is not JSON" in capsys.readouterr().err
