"""The input pipeline's fast path: records parsed from the raw tf.train.Example (no TFDS
feature decoding), crop + resize + flip instead of a warp when there is no rotation,
colour jitter as one colour matrix, one grain element per batch. Each is checked
against the formulation it replaced."""
import pickle
import sys
import types

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from affect_jax import input_pipeline as ip
# The benchmark keeps the replaced formulation as its peer; the tests compare with it.
from benchmarks.input_pipeline import before_jitter_colours


def _sources(built_union, split="train"):
  raw = ip.open_data_source("affwild2/union", split, built_union[1])
  return raw, ip.open_data_source("affwild2/union", split, built_union[1], raw=False)


def _assert_same_record(got, want, where):
  assert set(got) == set(want), where
  for key, value in want.items():
    if isinstance(value, np.ndarray):
      assert isinstance(got[key], np.ndarray), (where, key)
      assert (got[key].dtype, got[key].shape) == (value.dtype, value.shape), (where, key)
      np.testing.assert_array_equal(got[key], value, err_msg=f"{where} {key}")
    else:
      assert type(got[key]) is type(value) and got[key] == value, (where, key)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_raw_parse_equals_tfds_decoding_for_every_field(built_union, split):
  raw, tfds_source = _sources(built_union, split)
  assert isinstance(raw, ip.RawExampleSource)
  assert not isinstance(tfds_source, ip.RawExampleSource)
  assert len(raw) == len(tfds_source) > 0
  indices = sorted(set(range(0, len(raw), 7)) | {len(raw) - 1})
  for i in indices:
    _assert_same_record(raw[i], tfds_source[i], f"{split} record {i}")
  for got, want in zip(raw.__getitems__(indices[:5]), tfds_source.__getitems__(indices[:5])):
    _assert_same_record(got, want, split)
  raw.check_against_tfds(indices)
  _assert_same_record(pickle.loads(pickle.dumps(raw))[indices[-1]],
                      tfds_source[indices[-1]], "unpickled")  # as in grain's workers
  assert raw.dataset_info.name == "affwild2"
  assert "tensorflow" not in sys.modules  # upb's parser, TFDS's own compiled proto


def test_a_feature_spec_the_raw_parser_misreads_is_an_error_not_wrong_data(built_union):
  raw, _ = _sources(built_union)
  # As if the builder stored the AU labels as int16: the check against TFDS names the
  # field instead of handing out arrays of the wrong dtype.
  raw._fields = tuple(
      (name, kind, ip._Converter(np.dtype(np.int16), (12,)) if name == "au" else conv)
      for name, kind, conv in raw._fields)
  with pytest.raises(ValueError, match=r"record 0, feature 'au'.*raw=False"):
    raw.check_against_tfds()
  # A shape that does not match the record's values names the record and the feature.
  raw._fields = tuple(
      (name, kind, ip._Converter(np.dtype(np.float32), (3,)) if name ==
       "valence_arousal" else conv) for name, kind, conv in raw._fields)
  with pytest.raises(ValueError, match=r"record 4: feature 'valence_arousal'.*2 values, "
                     r"expected 3"):
    raw[4]


def test_a_spec_of_nested_or_variable_features_falls_back_to_tfds(built_union,
                                                                  monkeypatch, caplog):
  info = tfds.features.TensorInfo(shape=(None,), dtype=np.int64)
  with pytest.raises(ip.UnsupportedFeatureSpec, match="variable shape"):
    ip._raw_fields({"boxes": info})
  with pytest.raises(ip.UnsupportedFeatureSpec, match="not a single tensor"):
    ip._raw_fields({"nested": {"a": tfds.features.TensorInfo(shape=(), dtype=np.int64)}})

  parquet = types.SimpleNamespace(dataset_info=types.SimpleNamespace(
      file_format="parquet"))
  with pytest.raises(ip.UnsupportedFeatureSpec, match="parquet"):
    ip.RawExampleSource(parquet)

  def unsupported(_):
    raise ip.UnsupportedFeatureSpec("feature 'x' has a variable shape (None,)")

  monkeypatch.setattr(ip, "_raw_fields", unsupported)
  with caplog.at_level("WARNING"):
    source = ip.open_data_source("affwild2/union", "train", built_union[1])
  assert not isinstance(source, ip.RawExampleSource)
  assert "TFDS's feature decoding" in caplog.text
  assert isinstance(source[0]["image"], bytes)


# The previous formulation, kept here as the reference of the fast one.


def _warp_geometry(pixels, rng, cfg, size=ip.IMAGE_SIZE):
  return cv2.warpAffine(pixels, ip._affine_for_crop(rng, size, cfg), (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REFLECT_101)


def _previous_augment(pixels, rng, cfg):
  if cfg.flip or cfg.rotation_degrees or cfg.crop_scale != (1.0, 1.0):
    pixels = _warp_geometry(pixels, rng, cfg)
  if cfg.brightness or cfg.contrast or cfg.saturation:
    pixels = before_jitter_colours(pixels, rng, cfg)
  if cfg.randaugment_ops:
    pixels = ip._randaugment(pixels, rng, cfg)
  return pixels


def _face_images(built_union, count=48):
  raw, _ = _sources(built_union)
  return [ip.decode_jpeg(raw[i]["image"]) for i in range(0, len(raw), len(raw) // count)]


def _mean_abs_diff(a, b):
  return float(np.mean(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))))


def test_crop_resize_is_close_to_the_warp_and_exact_without_crop(built_union):
  images = _face_images(built_union)
  none = ip.AugmentConfig()
  for pixels in images:
    np.testing.assert_array_equal(ip.augment_image(pixels, None, none), pixels)
  flip_only = ip.AugmentConfig(flip=True)
  basic = ip.AugmentConfig.from_policy("basic")
  diffs = []
  for k, pixels in enumerate(images):
    np.testing.assert_array_equal(
        ip.augment_image(pixels, np.random.default_rng([1, k]), flip_only),
        _warp_geometry(pixels, np.random.default_rng([1, k]), flip_only))
    fast = ip.augment_image(pixels, np.random.default_rng([2, k]), basic)
    warped = _warp_geometry(pixels, np.random.default_rng([2, k]), basic)
    assert fast.shape == warped.shape and fast.dtype == np.uint8
    diffs.append(_mean_abs_diff(fast, warped))
  # The box is rounded to whole pixels (<= half a pixel of shift and scale), nothing
  # more: a different crop would differ by tens of grey levels.
  assert np.mean(diffs) < 3.0, diffs
  shifted = [_mean_abs_diff(ip.augment_image(p, np.random.default_rng([2, k]), basic),
                            _warp_geometry(p, np.random.default_rng([3, k]), basic))
             for k, p in enumerate(images)]
  assert np.mean(shifted) > 3 * np.mean(diffs)


def test_one_colour_matrix_is_close_to_three_blends(built_union):
  colour = ip.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3)
  diffs = []
  for k, pixels in enumerate(_face_images(built_union)):
    fast = ip.augment_image(pixels, np.random.default_rng([4, k]), colour)
    previous = before_jitter_colours(pixels, np.random.default_rng([4, k]), colour)
    diffs.append(_mean_abs_diff(fast, previous))
  # One saturation at the end instead of after each step (bright faces made brighter
  # then less contrasted differ most: the old form clipped at 255 in between), and the
  # grey mean of the unclipped image.
  assert np.mean(diffs) < 1.0 and max(diffs) < 5.0, diffs
  for policy, bound in (("strong", 1.0), ("randaugment", 1.5)):
    cfg = ip.AugmentConfig.from_policy(policy)
    diffs = [_mean_abs_diff(ip.augment_image(p, np.random.default_rng([5, k]), cfg),
                            _previous_augment(p, np.random.default_rng([5, k]), cfg))
             for k, p in enumerate(_face_images(built_union))]
    assert np.mean(diffs) < bound, (policy, diffs)


def test_batches_are_the_stacked_examples_of_the_per_image_formulation(built_union):
  raw, tfds_source = _sources(built_union)
  cfg = ip.AugmentConfig.from_policy("strong")
  ds = ip.train_dataset(raw, global_batch_size=8, seed=3, augment=cfg)
  order = ip.ProcessShareOfGlobalBatches(
      ip.grain.MapDataset.range(len(raw)).seed(3).shuffle().repeat(None), 8, 8, 0)
  for step in (0, 1, len(raw) // 8 + 2):  # crosses into the second epoch
    batch = ds[step]
    examples = [ip.load_example(tfds_source[index], index, cfg,
                                np.random.default_rng([3, position]))
                for position, index in (order[step * 8 + row] for row in range(8))]
    for key in examples[0]:
      want = np.stack([e[key] for e in examples])
      assert (batch[key].dtype, batch[key].shape) == (want.dtype, want.shape), key
      np.testing.assert_array_equal(batch[key], want, err_msg=key)
  valid = ip.open_data_source("affwild2/union", "validation", built_union[1])
  batches = list(ip.eval_dataset(valid, local_batch_size=16))
  last = batches[-1]
  pad = last["record_index"] < 0
  assert pad.any()
  for key, value in ip.empty_example().items():
    np.testing.assert_array_equal(last[key][pad], np.stack([value] * int(pad.sum())))
  first = ip.load_example(valid[0], 0, ip.AugmentConfig(), None)
  for key, value in first.items():
    np.testing.assert_array_equal(batches[0][key][0], value)


@pytest.mark.parametrize("task_balanced", [False, True])
def test_batches_do_not_depend_on_worker_or_process_count(built_union, task_balanced):
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  raw, _ = _sources(built_union)
  cfg = ip.AugmentConfig.from_policy("basic")
  make = lambda **kw: ip.train_dataset(raw, global_batch_size=8, seed=7,  # noqa: E731
                                       augment=cfg, task_balanced=task_balanced, **kw)
  single = ip.as_iterator(make())
  reference = [next(single) for _ in range(4)]
  workers = ip.as_iterator(make(), worker_count=2)
  try:
    for want in reference:
      got = next(workers)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  finally:
    workers.close()
  shares = [ip.as_iterator(make(process_index=p, process_count=4)) for p in range(4)]
  for want in reference:
    parts = [next(share) for share in shares]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key],
                                    err_msg=key)


def test_resume_is_exact_across_an_epoch_boundary(built_union):
  raw, _ = _sources(built_union)
  ds = ip.train_dataset(raw, global_batch_size=8, seed=2,
                        augment=ip.AugmentConfig.from_policy("randaugment"),
                        process_index=1, process_count=2)
  per_epoch = len(raw) // 8
  reference = ip.as_iterator(ds)
  for _ in range(per_epoch - 1):
    next(reference)
  state = reference.get_state()
  expected = [next(reference) for _ in range(3)]
  resumed = ip.as_iterator(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_an_undecodable_image_names_its_record(built_union):
  raw, _ = _sources(built_union)
  records = [raw[i] for i in range(8)]
  empty = list(records)
  empty[6] = dict(records[6], image=b"")
  with pytest.raises(ValueError, match=r"record 6 .*not a decodable image \(0 bytes\)"):
    next(ip.as_iterator(ip.eval_dataset(empty, local_batch_size=8)))
  records[5] = dict(records[5], image=b"\xff\xd8 truncated")
  video = records[5]["video"].decode()
  with pytest.raises(ValueError, match=rf"record 5 \(video '{video}', frame "
                     rf"{records[5]['frame']}\): not a decodable image"):
    ip.load_batch(records, [4, 5], ip.AugmentConfig())
  with pytest.raises(ValueError, match="record 5"):
    next(ip.as_iterator(ip.train_dataset(records, global_batch_size=8, seed=0,
                                         augment=ip.AugmentConfig.from_policy("basic"))))


def test_lookup_table_ops_equal_their_array_formulas():
  rng = np.random.default_rng(9)
  for k in range(20):
    low, high = sorted(rng.integers(0, 256, 2))
    pixels = rng.integers(low, high + 1, (112, 112, 3)).astype(np.uint8)
    if k == 0:
      pixels[..., 1] = 7  # a flat channel: divided by 1, not 0
    lo = pixels.min(axis=(0, 1), keepdims=True).astype(np.float32)
    hi = pixels.max(axis=(0, 1), keepdims=True).astype(np.float32)
    stretched = np.clip((pixels - lo) * (255.0 / np.maximum(hi - lo, 1.0)) + 0.5, 0, 255)
    np.testing.assert_array_equal(ip.RANDAUGMENT_OPS["autocontrast"](pixels, 0.5),
                                  stretched.astype(np.uint8))
    for magnitude in (0.0, -0.3, 0.5, 1.0):
      threshold = 256 - 128 * abs(magnitude)
      np.testing.assert_array_equal(
          ip.RANDAUGMENT_OPS["solarize"](pixels, magnitude),
          np.where(pixels < threshold, pixels, 255 - pixels).astype(np.uint8))
