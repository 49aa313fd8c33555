"""The input pipeline's fast path: records parsed from the raw tf.train.Example (no TFDS
feature decoding), crop + resize + flip instead of a warp when there is no rotation,
colour jitter as one colour matrix, one grain element per batch, vectorised draws, the
warp done in RGBA, RandAugment's shears and translations composed into the crop warp.
Each is checked against the formulation it replaced."""
import collections
import math
import pickle
import sys
import types

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from affect_jax.data import augment
from affect_jax.data import pipeline
from affect_jax.data import records
from affect_jax import vocabulary
# The benchmark keeps the replaced formulations; the tests compare with them.
from benchmarks.input_pipeline import before_jitter_colours, unfolded_augment, warp_crop


def _sources(built_union, split="train"):
  raw = records.open_data_source("affwild2/union", split, built_union[1])
  return raw, records.open_data_source("affwild2/union", split, built_union[1], raw=False)


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
  assert isinstance(raw, records.RawExampleSource)
  assert not isinstance(tfds_source, records.RawExampleSource)
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
      (name, kind, records.FieldConverter(np.dtype(np.int16), (12,)) if name == "au" else conv)
      for name, kind, conv in raw._fields)
  with pytest.raises(ValueError, match=r"record 0, feature 'au'.*raw=False"):
    raw.check_against_tfds()
  # A shape that does not match the record's values names the record and the feature.
  raw._fields = tuple(
      (name, kind, records.FieldConverter(np.dtype(np.float32), (3,)) if name ==
       "valence_arousal" else conv) for name, kind, conv in raw._fields)
  with pytest.raises(ValueError, match=r"record 4: feature 'valence_arousal'.*2 values, "
                     r"expected 3"):
    raw[4]


def test_a_spec_of_nested_or_variable_features_falls_back_to_tfds(built_union,
                                                                  monkeypatch, caplog):
  info = tfds.features.TensorInfo(shape=(None,), dtype=np.int64)
  with pytest.raises(records.UnsupportedFeatureSpec, match="variable shape"):
    records.raw_fields({"boxes": info})
  with pytest.raises(records.UnsupportedFeatureSpec, match="not a single tensor"):
    records.raw_fields({"nested": {"a": tfds.features.TensorInfo(shape=(), dtype=np.int64)}})

  parquet = types.SimpleNamespace(dataset_info=types.SimpleNamespace(
      file_format="parquet"))
  with pytest.raises(records.UnsupportedFeatureSpec, match="parquet"):
    records.RawExampleSource(parquet)

  def unsupported(_):
    raise records.UnsupportedFeatureSpec("feature 'x' has a variable shape (None,)")

  monkeypatch.setattr(records, "raw_fields", unsupported)
  with caplog.at_level("WARNING"):
    source = records.open_data_source("affwild2/union", "train", built_union[1])
  assert not isinstance(source, records.RawExampleSource)
  assert "TFDS's feature decoding" in caplog.text
  assert isinstance(source[0]["image"], bytes)


# The previous formulation, kept here as the reference of the fast one.


def _previous_augment(pixels, rng, cfg):
  """Geometry and colour of 3de3617: a warp for any crop or flip, three colour blends."""
  if cfg.flip or cfg.rotation_degrees or cfg.crop_scale != (1.0, 1.0):
    pixels = warp_crop(pixels, rng, cfg)
  if cfg.brightness or cfg.contrast or cfg.saturation:
    pixels = before_jitter_colours(pixels, rng, cfg)
  return pixels


def _face_images(built_union, count=48):
  raw, _ = _sources(built_union)
  return [records.decode_jpeg(raw[i]["image"]) for i in range(0, len(raw), len(raw) // count)]


def _mean_abs_diff(a, b):
  return float(np.mean(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))))


def test_crop_resize_is_close_to_the_warp_and_exact_without_crop(built_union):
  images = _face_images(built_union)
  none = augment.AugmentConfig()
  for pixels in images:
    np.testing.assert_array_equal(augment.augment_image(pixels, None, none), pixels)
  flip_only = augment.AugmentConfig(flip=True)
  basic = augment.AugmentConfig.from_policy("basic")
  diffs = []
  for k, pixels in enumerate(images):
    np.testing.assert_array_equal(
        augment.augment_image(pixels, np.random.default_rng([1, k]), flip_only),
        warp_crop(pixels, np.random.default_rng([1, k]), flip_only))
    fast = augment.augment_image(pixels, np.random.default_rng([2, k]), basic)
    warped = warp_crop(pixels, np.random.default_rng([2, k]), basic)
    assert fast.shape == warped.shape and fast.dtype == np.uint8
    diffs.append(_mean_abs_diff(fast, warped))
  # The box is rounded to whole pixels (<= half a pixel of shift and scale), nothing
  # more: a different crop would differ by tens of grey levels.
  assert np.mean(diffs) < 3.0, diffs
  shifted = [_mean_abs_diff(augment.augment_image(p, np.random.default_rng([2, k]), basic),
                            warp_crop(p, np.random.default_rng([3, k]), basic))
             for k, p in enumerate(images)]
  assert np.mean(shifted) > 3 * np.mean(diffs)


def test_one_colour_matrix_is_close_to_three_blends(built_union):
  colour = augment.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3)
  diffs = []
  for k, pixels in enumerate(_face_images(built_union)):
    fast = augment.augment_image(pixels, np.random.default_rng([4, k]), colour)
    previous = before_jitter_colours(pixels, np.random.default_rng([4, k]), colour)
    diffs.append(_mean_abs_diff(fast, previous))
  # One saturation at the end instead of after each step (bright faces made brighter
  # then less contrasted differ most: the old form clipped at 255 in between), and the
  # grey mean of the unclipped image.
  assert np.mean(diffs) < 1.0 and max(diffs) < 5.0, diffs
  cfg = augment.AugmentConfig.from_policy("strong")
  diffs = [_mean_abs_diff(augment.augment_image(p, np.random.default_rng([5, k]), cfg),
                          _previous_augment(p, np.random.default_rng([5, k]), cfg))
           for k, p in enumerate(_face_images(built_union))]
  assert np.mean(diffs) < 1.0, diffs


def test_batches_are_the_stacked_examples_of_the_per_image_formulation(built_union):
  raw, tfds_source = _sources(built_union)
  cfg = augment.AugmentConfig.from_policy("strong")
  ds = pipeline.train_dataset(raw, global_batch_size=8, seed=3, augment=cfg)
  order = pipeline.ProcessShareOfGlobalBatches(
      pipeline.grain.MapDataset.range(len(raw)).seed(3).shuffle().repeat(None), 8, 8, 0)
  for step in (0, 1, len(raw) // 8 + 2):  # crosses into the second epoch
    batch = ds[step]
    examples = [pipeline.load_example(tfds_source[index], index, cfg,
                                np.random.default_rng([3, position]))
                for position, index in (order[step * 8 + row] for row in range(8))]
    for key in examples[0]:
      want = np.stack([e[key] for e in examples])
      assert (batch[key].dtype, batch[key].shape) == (want.dtype, want.shape), key
      np.testing.assert_array_equal(batch[key], want, err_msg=key)
  valid = records.open_data_source("affwild2/union", "validation", built_union[1])
  batches = list(pipeline.eval_dataset(valid, local_batch_size=16))
  last = batches[-1]
  pad = last["record_index"] < 0
  assert pad.any()
  for key, value in pipeline.empty_example().items():
    np.testing.assert_array_equal(last[key][pad], np.stack([value] * int(pad.sum())))
  first = pipeline.load_example(valid[0], 0, augment.AugmentConfig(), None)
  for key, value in first.items():
    np.testing.assert_array_equal(batches[0][key][0], value)


@pytest.mark.parametrize("task_balanced", [False, True])
def test_batches_do_not_depend_on_worker_or_process_count(built_union, task_balanced):
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  raw, _ = _sources(built_union)
  cfg = augment.AugmentConfig.from_policy("basic")
  make = lambda **kw: pipeline.train_dataset(raw, global_batch_size=8, seed=7,  # noqa: E731
                                       augment=cfg, task_balanced=task_balanced, **kw)
  single = pipeline.as_iterator(make())
  reference = [next(single) for _ in range(4)]
  workers = pipeline.as_iterator(make(), worker_count=2)
  try:
    for want in reference:
      got = next(workers)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  finally:
    workers.close()
  shares = [pipeline.as_iterator(make(process_index=p, process_count=4)) for p in range(4)]
  for want in reference:
    parts = [next(share) for share in shares]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key],
                                    err_msg=key)


def test_resume_is_exact_across_an_epoch_boundary(built_union):
  raw, _ = _sources(built_union)
  ds = pipeline.train_dataset(raw, global_batch_size=8, seed=2,
                        augment=augment.AugmentConfig.from_policy("randaugment"),
                        process_index=1, process_count=2)
  per_epoch = len(raw) // 8
  reference = pipeline.as_iterator(ds)
  for _ in range(per_epoch - 1):
    next(reference)
  state = reference.get_state()
  expected = [next(reference) for _ in range(3)]
  resumed = pipeline.as_iterator(ds)
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
    next(pipeline.as_iterator(pipeline.eval_dataset(empty, local_batch_size=8)))
  records[5] = dict(records[5], image=b"\xff\xd8 truncated")
  video = records[5]["video"].decode()
  with pytest.raises(ValueError, match=rf"record 5 \(video '{video}', frame "
                     rf"{records[5]['frame']}\): not a decodable image"):
    pipeline.load_batch(records, [4, 5], augment.AugmentConfig())
  with pytest.raises(ValueError, match="record 5"):
    next(pipeline.as_iterator(pipeline.train_dataset(records, global_batch_size=8, seed=0,
                                         augment=augment.AugmentConfig.from_policy("basic"))))


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
    np.testing.assert_array_equal(augment.RANDAUGMENT_OPS["autocontrast"](pixels, 0.5),
                                  stretched.astype(np.uint8))
    for magnitude in (0.0, -0.3, 0.5, 1.0):
      threshold = 256 - 128 * abs(magnitude)
      np.testing.assert_array_equal(
          augment.RANDAUGMENT_OPS["solarize"](pixels, magnitude),
          np.where(pixels < threshold, pixels, 255 - pixels).astype(np.uint8))


# Vectorised draws and the warp in RGBA: "none", "basic" and "strong" keep their images.


def _scalar_crop_draws(rng, size, cfg):
  """The crop draws as they were defined (9e5a2c9): one Generator.uniform call each."""
  area = size * size * rng.uniform(*cfg.crop_scale)
  log_ratio = rng.uniform(np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1]))
  ratio = math.exp(log_ratio)
  crop_w = min(size, math.sqrt(area * ratio))
  crop_h = min(size, math.sqrt(area / ratio))
  centre_x = rng.uniform(crop_w / 2, size - crop_w / 2)
  centre_y = rng.uniform(crop_h / 2, size - crop_h / 2)
  angle = math.radians(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
  flip = bool(cfg.flip and rng.uniform() < 0.5)
  return crop_w, crop_h, centre_x, centre_y, angle, flip


def _scalar_colour_draws(rng, cfg):
  return tuple(rng.uniform(1 - s, 1 + s) if s else 1.0
               for s in (cfg.brightness, cfg.contrast, cfg.saturation))


def _scalar_draw_augment(pixels, rng, cfg, size=vocabulary.IMAGE_SIZE):
  """basic / strong with the scalar draws and a 3-channel warp."""
  crop = _scalar_crop_draws(rng, size, cfg)
  if cfg.rotation_degrees:
    pixels = cv2.warpAffine(pixels, augment.geometry_map(crop, (), size), (size, size),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT_101)
  else:
    pixels = augment.crop_resize_flip(pixels, crop, size)
  if cfg.brightness or cfg.contrast or cfg.saturation:
    factors = _scalar_colour_draws(rng, cfg)
    pixels = cv2.transform(pixels, augment.colour_matrix(factors, pixels))
  return pixels


def test_vectorised_draws_and_rgba_warp_keep_the_images_of_basic_and_strong(built_union):
  configs = [augment.AugmentConfig.from_policy(p) for p in ("basic", "strong", "randaugment")]
  configs += [augment.AugmentConfig(flip=True),
              augment.AugmentConfig(crop_scale=(0.5, 0.9), crop_ratio=(0.75, 1.33)),
              augment.AugmentConfig(contrast=0.4),
              augment.AugmentConfig(brightness=0.2, saturation=0.5)]
  for cfg in configs:
    for seed in range(300):
      new, old = np.random.default_rng(seed), np.random.default_rng(seed)
      if cfg.flip or cfg.crop_scale != (1.0, 1.0):
        assert augment.crop_draws(new, 112, cfg) == _scalar_crop_draws(old, 112, cfg), seed
      if cfg.brightness or cfg.contrast or cfg.saturation:
        assert augment.colour_draws(new, cfg) == _scalar_colour_draws(old, cfg), seed
      assert new.random() == old.random()  # both took the same number of draws
  for policy in ("basic", "strong"):
    cfg = augment.AugmentConfig.from_policy(policy)
    for k, pixels in enumerate(_face_images(built_union)):
      for seed in range(4):
        np.testing.assert_array_equal(
            augment.augment_image(pixels, np.random.default_rng([k, seed]), cfg),
            _scalar_draw_augment(pixels, np.random.default_rng([k, seed]), cfg))


def test_rgba_warp_equals_a_three_channel_warp():
  rng = np.random.default_rng(11)
  cfg = augment.AugmentConfig.from_policy("randaugment")
  for k in range(200):
    size = (112, 64, 97)[k % 3]
    pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
    ops = augment.randaugment_draws(rng, cfg)
    matrix = augment.geometry_map(augment.crop_draws(rng, size, cfg), ops, size)
    np.testing.assert_array_equal(
        augment.warp(pixels, matrix),
        cv2.warpAffine(pixels, matrix, (size, size),
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REFLECT_101), err_msg=str(k))


# RandAugment: shears and translations composed into the crop warp.


def _smooth_image(size=vocabulary.IMAGE_SIZE):
  """Low-frequency colour waves, on which bilinear interpolation is nearly exact."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  waves = [127.5 + 100 * np.sin(x / 9 + phase) * np.cos(y / 7 - phase)
           for phase in (0.0, 1.0, 2.0)]
  return np.rint(np.stack(waves, -1)).astype(np.uint8)


def _op_warp_matrix(name, magnitude, size):
  """The forward (input -> output) matrix a geometric op was warped with on its own
  before it was composed into the crop warp (about the image's centre)."""
  centre = (size - 1) / 2
  a, shift = 0.3 * magnitude, 0.2 * magnitude * size
  return np.array({"shear_x": [[1, a, -a * centre], [0, 1, 0]],
                   "shear_y": [[1, 0, 0], [a, 1, -a * centre]],
                   "translate_x": [[1, 0, shift], [0, 1, 0]],
                   "translate_y": [[1, 0, 0], [0, 1, shift]]}[name], np.float64)


def _two_step(pixels, crop, ops, size):
  """The crop warp, then one warp per geometric op (as before the fold), and the mask of
  output pixels whose samples stay >= 1 pixel inside the image at every step (where
  the mirrored borders play no part)."""
  pixels = cv2.warpAffine(pixels, augment.geometry_map(crop, (), size), (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)
  for name, magnitude in ops:
    pixels = cv2.warpAffine(pixels, _op_warp_matrix(name, magnitude, size), (size, size),
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  points = np.stack([x.ravel(), y.ravel(), np.ones(size * size)])
  inside = np.ones(size * size, bool)
  maps = [cv2.invertAffineTransform(_op_warp_matrix(n, m, size)) for n, m in ops]
  for matrix in maps[::-1] + [augment.geometry_map(crop, (), size)]:  # walked back from the output
    points = np.vstack([matrix @ points, np.ones(size * size)])
    inside &= np.all((points[:2] >= 1) & (points[:2] <= size - 2), axis=0)
  return pixels, inside.reshape(size, size)


def test_geometric_ops_folded_into_the_crop_warp_equal_warping_after_it():
  size, pixels = vocabulary.IMAGE_SIZE, _smooth_image()
  cfg = augment.AugmentConfig.from_policy("randaugment")
  names = sorted(augment.GEOMETRIC_OPS)
  cases = [[(name, sign * 0.5)] for name in names for sign in (1, -1)]
  cases += [[(a, 0.5), (b, -0.5)] for a in names for b in names if a != b]
  for k, ops in enumerate(cases):
    crop = augment.crop_draws(np.random.default_rng(k), size, cfg)
    folded = augment.warp(pixels, augment.geometry_map(crop, ops, size))
    reference, inside = _two_step(pixels, crop, ops, size)
    assert inside.mean() > 0.3, ops
    diff = np.abs(folded.astype(np.int16) - reference)[inside]
    # One interpolation against two (and one uint8 rounding less): a few levels at most.
    assert diff.max() <= 3 and diff.mean() < 0.5, (ops, diff.max(), diff.mean())
    # Opposite signs (or a wrong centre or axis) land pixels elsewhere: far off.
    wrong = augment.warp(pixels, augment.geometry_map(crop, [(n, -m) for n, m in ops], size))
    assert np.abs(wrong.astype(np.int16) - reference)[inside].mean() > 10, ops


def test_whole_pixel_shifts_compose_exactly():
  size = 100  # translations of 0.2 * 0.5 * 100 = 10 pixels
  pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
  crop = (size, size, size / 2 + 3, size / 2 - 4, 0.0, False)  # content moves (-3, +4)
  ops = [("translate_x", 0.5), ("translate_y", -0.5)]  # then (+10, -10)
  folded = augment.warp(pixels, augment.geometry_map(crop, ops, size))
  expected = np.roll(pixels, (4 - 10, -3 + 10), axis=(0, 1))
  np.testing.assert_array_equal(folded[15:85, 15:85], expected[15:85, 15:85])
  reference, inside = _two_step(pixels, crop, ops, size)
  assert inside.sum() > 60 * 60
  np.testing.assert_array_equal(folded[inside], reference[inside])


def test_shears_are_about_the_image_centre():
  size = 111  # an odd size has a centre row and column
  pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), np.uint8)
  sheared = augment.RANDAUGMENT_OPS["shear_x"](pixels, 0.5)  # x + 0.15 (y - 55)
  np.testing.assert_array_equal(sheared[55], pixels[55])
  np.testing.assert_array_equal(sheared[75, 10:-10], pixels[75, 7:-13])  # 3 px right
  np.testing.assert_array_equal(sheared[35, 10:-10], pixels[35, 13:-7])  # 3 px left
  sheared = augment.RANDAUGMENT_OPS["shear_y"](pixels, -0.5)  # y - 0.15 (x - 55)
  np.testing.assert_array_equal(sheared[:, 55], pixels[:, 55])
  np.testing.assert_array_equal(sheared[10:-10, 75], pixels[13:-7, 75])  # 3 px up


def test_randaugment_draws_every_op_uniformly_and_none_twice():
  cfg = augment.AugmentConfig.from_policy("randaugment")
  draws = [augment.randaugment_draws(np.random.default_rng(s), cfg) for s in range(3000)]
  names = sorted(augment.RANDAUGMENT_OPS)
  assert len(names) == 9 and set(augment.GEOMETRIC_OPS) | set(augment.PHOTOMETRIC_OPS) == set(names)
  assert all(len(d) == 2 and d[0][0] != d[1][0] for d in draws)
  counts = collections.Counter(name for d in draws for name, _ in d)
  expected = 3000 * 2 / 9
  assert set(counts) == set(names)
  assert all(abs(c - expected) < 0.15 * expected for c in counts.values()), counts
  assert len(collections.Counter((d[0][0], d[1][0]) for d in draws)) == 9 * 8
  assert set((name, m) for d in draws for name, m in d) == {
      (name, m) for name in names for m in (0.5, -0.5)}
  assert draws[7] == augment.randaugment_draws(np.random.default_rng(7), cfg)


def _drawn_ops(seed, cfg, size=vocabulary.IMAGE_SIZE):
  rng = np.random.default_rng(seed)
  augment.crop_draws(rng, size, cfg)
  augment.colour_draws(rng, cfg)
  return augment.randaugment_draws(rng, cfg)


def test_randaugment_applies_its_drawn_ops_geometry_in_the_crop_warp(built_union):
  cfg = augment.AugmentConfig.from_policy("randaugment")
  exact, folded, shifted = 0, [], []
  for k, pixels in enumerate(_face_images(built_union)):
    for seed in range(4):
      image = augment.augment_image(pixels, np.random.default_rng([k, seed]), cfg)
      unfolded = unfolded_augment(pixels, np.random.default_rng([k, seed]), cfg)
      if any(name in augment.GEOMETRIC_OPS for name, _ in _drawn_ops([k, seed], cfg)):
        folded.append(_mean_abs_diff(image, unfolded))
        shifted.append(_mean_abs_diff(image, unfolded_augment(
            pixels, np.random.default_rng([k, seed + 100]), cfg)))
      else:  # photometric ops only: the same steps in the same order
        np.testing.assert_array_equal(image, unfolded)
        exact += 1
  assert exact > 20 and len(folded) > 20
  # Geometric ops first (before the colour jitter and the photometric ops), one
  # interpolation, the source's border mirrored: close to warping again afterwards,
  # far from another draw.
  assert np.mean(folded) < 4.0 and np.mean(shifted) > 4 * np.mean(folded), (
      np.mean(folded), np.mean(shifted))
