"""The TFDS builder (counts, byte-exact images, discovery) and the grain pipeline
(reproducible order, exact resume, sharding over processes, eval padding)."""
import collections
import io
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_affwild2  # noqa: F401  (registers the builder)
from affect_jax.data import augment
from affect_jax.data import pipeline
from affect_jax.data import records
from tfds_affwild2 import annotations, build, layout, source_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metadata_counts_equal_the_generated_ground_truth(built_union, synthetic_release):
  builder, _ = built_union
  _, truth = synthetic_release
  summary = builder.info.metadata["summary"]
  for split in ("train", "validation"):
    expected = truth["splits"][split]
    assert builder.info.splits[split].num_examples == expected["frames"]
    for key in ("videos", "frames", "labelled", "expr_class_counts",
                "au_positive_counts"):
      assert summary[split][key] == expected[key], (split, key)
    for key, value in expected["skipped"].items():
      assert summary[split]["skipped"][key] == value
  assert builder.info.splits["test"].num_examples == truth["splits"]["test"]["images"]
  assert "tensorflow" not in sys.modules  # built and read without TensorFlow
  root, _ = synthetic_release
  release_layout = layout.find_release_layout(root)
  assert builder.info.metadata["source_fingerprint"] == \
      source_fingerprint.source_fingerprint(release_layout)
  assert builder.info.metadata["annotated_au_names"] == list(annotations.AU_NAMES)
  assert builder.info.metadata["videos_in_train_and_validation"] == []


def test_images_round_trip_byte_exact_and_labels_match(built_union, synthetic_release):
  _, data_dir = built_union
  root, _ = synthetic_release
  builder = tfds.builder("affwild2/union", data_dir=data_dir)  # found by name
  source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  image_roots = [os.path.join(root, d) for d in os.listdir(root)
                 if d.startswith("cropped_aligned")]
  for i in range(0, len(source), 17):
    record = source[i]
    video = record["video"].decode()
    name = f"{record['frame']:05d}.jpg"
    paths = [os.path.join(r, video, name) for r in image_roots
             if os.path.exists(os.path.join(r, video, name))]
    assert len(paths) == 1
    with open(paths[0], "rb") as f:
      assert record["image"] == f.read()
    assert bool(record["expression_mask"]) == (record["expression"] >= 0)
    assert record["expression_mask"] or record["au_mask"].any() or record["va_mask"]


def test_build_command_prints_the_summary(synthetic_release, tmp_path, capsys):
  root, truth = synthetic_release
  assert build.main(["--manual_dir", root, "--data_dir", str(tmp_path), "--config",
                     "mtl"]) == 0
  out = capsys.readouterr().out
  assert "frames/s" in out and "peak memory" in out
  builder = tfds.builder("affwild2/mtl", data_dir=str(tmp_path))
  labelled = builder.info.metadata["summary"]["train"]["labelled"]
  assert labelled == truth["mtl"]["train"]["labelled"]


def _indices(iterator, num_batches):
  return [next(iterator)["record_index"].tolist() for _ in range(num_batches)]


def train_source(built_union):
  return records.open_data_source("affwild2/union", "train", built_union[1])


def test_order_is_reproducible_and_reshuffled_each_epoch(built_union):
  source = train_source(built_union)
  make = lambda seed: pipeline.as_iterator(pipeline.train_dataset(  # noqa: E731
      source, global_batch_size=8, seed=seed, augment=augment.AugmentConfig()))
  epoch_batches = len(source) // 8
  first = _indices(make(0), 2 * epoch_batches)
  assert first == _indices(make(0), 2 * epoch_batches)
  assert first != _indices(make(1), 2 * epoch_batches)
  epoch_one = sum(first[:epoch_batches], [])
  epoch_two = sum(first[epoch_batches:], [])
  assert len(set(epoch_one)) == len(epoch_one)  # no repeats inside an epoch
  assert epoch_one != epoch_two


WORKER_SCRIPT = """
import sys
from affect_jax.data import augment
from affect_jax.data import pipeline
from affect_jax.data import records

def main():
  source = records.open_data_source("affwild2/union", "train", sys.argv[1])
  ds = pipeline.train_dataset(source, global_batch_size=4, seed=0,
                        augment=augment.AugmentConfig.from_policy("basic"))
  iterator = pipeline.as_iterator(ds, worker_count=2)
  print("batch", next(iterator)["image"].shape)
  iterator.close()

if __name__ == "__main__":
  main()
"""


def test_worker_processes_start_in_a_program_that_never_parsed_absl_flags(
    built_union, tmp_path):
  # grain reads absl flags when it starts workers; an argparse script or a notebook
  # never parses them (pytest does not either, but other tests may have).
  script = tmp_path / "read_with_workers.py"
  script.write_text(WORKER_SCRIPT)
  log = tmp_path / "log.txt"
  with open(log, "wb") as out:
    code = subprocess.run([sys.executable, str(script), built_union[1]], cwd=REPO,
                          stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
  text = log.read_text(errors="replace")
  assert code == 0, text[-3000:]
  assert "batch (4, 112, 112, 3)" in text


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_saved_state_continues_with_identical_batches(built_union,
                                                                  worker_count):
  source = train_source(built_union)
  ds = pipeline.train_dataset(source, global_batch_size=4, seed=5,
                        augment=augment.AugmentConfig.from_policy("strong"))
  reference = pipeline.as_iterator(ds, worker_count)
  for _ in range(3):
    next(reference)
  state = reference.get_state()
  expected = [next(reference) for _ in range(3)]
  resumed = pipeline.as_iterator(ds, worker_count)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  for it in (reference, resumed):
    if hasattr(it, "close"):
      it.close()


def test_processes_split_each_global_batch_and_cover_each_record_once(built_union):
  source = train_source(built_union)
  steps = len(source) // 8  # one epoch of global batches of 8
  single = _indices(pipeline.as_iterator(pipeline.train_dataset(
      source, global_batch_size=8, seed=0, augment=augment.AugmentConfig.from_policy(
          "strong"))), steps)
  shares = []
  for process in range(2):
    ds = pipeline.train_dataset(source, global_batch_size=8, seed=0,
                          augment=augment.AugmentConfig.from_policy("strong"),
                          process_index=process, process_count=2)
    shares.append(_indices(pipeline.as_iterator(ds), steps))
  # The two processes' rows, side by side, are exactly the one-process global batches.
  assert [a + b for a, b in zip(*shares)] == single
  seen = collections.Counter(sum(single, []))
  assert set(seen.values()) == {1} and len(seen) == steps * 8
  ds0 = pipeline.train_dataset(source, global_batch_size=8, seed=0,
                         augment=augment.AugmentConfig.from_policy("strong"))
  ds1 = pipeline.train_dataset(source, global_batch_size=8, seed=0,
                         augment=augment.AugmentConfig.from_policy("strong"),
                         process_index=1, process_count=2)
  np.testing.assert_array_equal(ds0[0]["image"][4:], ds1[0]["image"])  # same augmentation
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_dataset(source, global_batch_size=9, seed=0, augment=augment.AugmentConfig(),
                     process_count=2)


def test_eval_pads_with_masked_examples_and_keeps_images_unaugmented(built_union):
  source = records.open_data_source("affwild2/union", "validation", built_union[1])
  batches = list(pipeline.eval_dataset(source, local_batch_size=16))
  assert len(batches) == pipeline.eval_num_batches(len(source), 16, 1)
  indices = np.concatenate([b["record_index"] for b in batches])
  assert sorted(indices[indices >= 0].tolist()) == list(range(len(source)))
  padding = indices < 0
  for key in ("expression_mask", "va_mask"):
    mask = np.concatenate([b[key] for b in batches])
    assert not mask[padding].any()
  first = np.asarray(Image.open(io.BytesIO(source[0]["image"])))
  # OpenCV's and PIL's JPEG decoders may round an IDCT differently: 1 level at most.
  np.testing.assert_allclose(batches[0]["image"][0], first, atol=2)


def test_augmentation_policies():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 255, (112, 112, 3), np.uint8)
  image = pixels
  np.testing.assert_array_equal(augment.augment_image(image, rng, augment.AugmentConfig()), pixels)
  flip_only = augment.AugmentConfig(flip=True)
  outcomes = {augment.augment_image(image, np.random.default_rng(s), flip_only).tobytes()
              for s in range(8)}
  assert outcomes == {pixels.tobytes(), pixels[:, ::-1].tobytes()}
  strong = augment.augment_image(image, np.random.default_rng(1),
                            augment.AugmentConfig.from_policy("strong"))
  assert strong.shape == (112, 112, 3) and strong.dtype == np.uint8
  assert not np.array_equal(strong, pixels)
  with pytest.raises(ValueError, match="unknown augmentation policy"):
    augment.AugmentConfig.from_policy("extreme")


def test_crop_keeps_content_where_it_was_and_jitter_keeps_grey_grey():
  # A centred crop of scale 1 with a flip is an exact mirror (pixel-centre bookkeeping),
  # as an integer crop and as a warp.
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 255, (112, 112, 3), np.uint8)
  centred_flip = (112.0, 112.0, 56.0, 56.0, 0.0, True)  # `_crop_draws`' tuple
  np.testing.assert_array_equal(augment.crop_resize_flip(pixels, centred_flip, 112),
                                pixels[:, ::-1])
  np.testing.assert_array_equal(augment.warp(pixels, augment.geometry_map(centred_flip, (), 112)),
                                pixels[:, ::-1])
  grey = np.full((112, 112, 3), 100, np.uint8)
  jittered = augment.jitter_colours(grey, augment.colour_draws(np.random.default_rng(0),
                                                      augment.AugmentConfig(brightness=0.3,
                                                                       contrast=0.3,
                                                                       saturation=0.3)))
  assert np.all(jittered == jittered[0, 0, 0])  # grey stays grey, only its level moves
  bright = np.full((4, 4, 3), 200, np.uint8)
  brighter = cv2.transform(bright, augment.colour_matrix((1.5, 1.0, 1.0), bright))
  assert np.all(brighter == 255)  # saturates instead of wrapping around


def test_normalize_images_uses_imagenet_statistics():
  images = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 255)])
  out = pipeline.normalize_images(images)
  np.testing.assert_allclose(out[0, 0, 0], -pipeline.MEAN_RGB / pipeline.STDDEV_RGB, rtol=1e-6)
  np.testing.assert_allclose(out[1, 0, 0], (255 - pipeline.MEAN_RGB) / pipeline.STDDEV_RGB,
                             rtol=1e-6)


def test_task_balanced_sampling_oversamples_rare_task_labels(built_union):
  source = train_source(built_union)
  masks = pipeline.label_masks(source)
  weights = pipeline.task_balanced_weights(masks)
  fraction = masks.mean(0)
  rare, common = int(np.argmin(fraction)), int(np.argmax(fraction))
  assert fraction[rare] < fraction[common]
  ds = pipeline.train_dataset(source, global_batch_size=8, seed=0, augment=augment.AugmentConfig(),
                        task_balanced=True)
  drawn = np.concatenate(_indices(pipeline.as_iterator(ds), 3 * len(source) // 8))
  drawn_fraction = masks[drawn].mean(0)
  assert drawn_fraction[rare] > fraction[rare]  # the rare task is seen more often
  # Same seed, same draws; resumable from the position alone.
  again = np.concatenate(_indices(pipeline.as_iterator(ds), 3 * len(source) // 8))
  np.testing.assert_array_equal(drawn, again)
  assert weights.min() >= 0 and np.isclose(weights.sum(), 1)
  assert np.all(weights[~masks.any(1)] == 0)


def test_a_build_that_spills_to_disk_needs_no_tensorflow(synthetic_release, built_union,
                                                         tmp_path):
  # A zero memory buffer sends every example through TFDS's on-disk buckets, the path a
  # release larger than the buffer takes (TFDS opens them with tf.io.gfile).
  builder = build.build_dataset(synthetic_release[0], str(tmp_path), "union",
                                memory_buffer_mb=0)
  reference = built_union[0]
  for split in ("train", "validation", "test"):
    assert builder.info.splits[split].num_examples == \
        reference.info.splits[split].num_examples
  spilled = builder.as_data_source("train",
                                   decoders={"image": tfds.decode.SkipDecoding()})
  direct = reference.as_data_source("train",
                                    decoders={"image": tfds.decode.SkipDecoding()})
  key = lambda r: (r["video"], r["frame"])  # noqa: E731
  assert sorted((key(r), r["image"]) for r in spilled) == \
      sorted((key(r), r["image"]) for r in direct)
  assert "tensorflow" not in sys.modules


def test_randaugment_ops_change_images_and_keep_them_uint8():
  rng = np.random.default_rng(5)
  pixels = rng.integers(0, 255, (112, 112, 3), np.uint8)
  for name, op in augment.RANDAUGMENT_OPS.items():
    out = op(pixels, 0.8)
    assert out.shape == pixels.shape and out.dtype == np.uint8, name
    assert not np.array_equal(out, pixels), name
  np.testing.assert_array_equal(augment.RANDAUGMENT_OPS["posterize"](pixels, 0.5),
                                pixels & 0b11111100)
  solarized = augment.RANDAUGMENT_OPS["solarize"](pixels, 1.0)
  np.testing.assert_array_equal(solarized[pixels >= 128], 255 - pixels[pixels >= 128])
  cfg = augment.AugmentConfig.from_policy("randaugment")
  draws = {augment.augment_image(pixels, np.random.default_rng(s), cfg).tobytes()
           for s in range(6)}
  assert len(draws) == 6  # each seed draws its own ops and magnitudes' signs
  np.testing.assert_array_equal(augment.augment_image(pixels, np.random.default_rng(1), cfg),
                                augment.augment_image(pixels, np.random.default_rng(1), cfg))
