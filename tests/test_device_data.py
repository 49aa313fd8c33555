"""Tests of the device-resident split: epoch coverage, determinism from the step,
augmentation shapes, dtypes and flip correctness, loading and sharded batches."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from affect_jax.data import device_resident
from affect_jax.data import augment


def _records(count, size=16, seed=0):
  """Records as the TFDS source gives them; PNG bytes decode exactly."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(count):
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    assert ok
    records.append({
        "image": encoded.tobytes(), "expression": i % 8, "expression_mask": i % 3 != 0,
        "au": (np.arange(12) + i) % 2, "au_mask": np.ones(12, bool),
        "valence_arousal": np.array([i / count, -i / count], np.float32),
        "va_mask": True, "pixels": pixels})
  return records


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("num_records, batch", [(64, 8), (70, 8), (24, 24)])
def test_each_record_at_most_once_per_epoch_and_all_when_divisible(num_records, batch):
  per_epoch = device_resident.steps_per_epoch(num_records, batch)
  indices = jax.jit(device_resident.device_batch_indices, static_argnums=(1, 2, 3))
  for epoch in range(2):
    seen = np.concatenate([np.asarray(indices(epoch * per_epoch + s, num_records, batch, 0))
                           for s in range(per_epoch)])
    assert len(seen) == len(set(seen.tolist())) == per_epoch * batch
    assert seen.min() >= 0 and seen.max() < num_records
    if num_records % batch == 0:
      assert sorted(seen.tolist()) == list(range(num_records))


def test_batches_depend_only_on_seed_and_step():
  first = device_resident.device_batch_indices(5, 64, 8, seed=1)
  again = jax.jit(device_resident.device_batch_indices, static_argnums=(1, 2, 3))(5, 64, 8, 1)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, device_resident.device_batch_indices(5, 64, 8, seed=2))
  # Epochs are shuffled differently: step 0 and the first step of epoch 1 differ.
  assert not np.array_equal(device_resident.device_batch_indices(0, 64, 8, 1),
                            device_resident.device_batch_indices(8, 64, 8, 1))


def test_batch_larger_than_split_is_refused():
  with pytest.raises(ValueError, match="batch size"):
    device_resident.device_batch_indices(0, 4, 8, 0)


@pytest.mark.parametrize("policy", ["none", "basic", "strong"])
def test_augmentation_shapes_dtypes_and_range(policy):
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3)),
                       jnp.uint8)
  out = jax.jit(device_resident.augment_on_device, static_argnums=(2,))(
      images, jax.random.key(0), policy)
  assert out.shape == (6, 20, 20, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0 and float(out.max()) <= 255
  if policy == "none":
    np.testing.assert_array_equal(out, images.astype(jnp.float32))
  else:
    assert not np.allclose(out, images.astype(jnp.float32))


def test_resizes_to_the_requested_size():
  images = jnp.full((2, 20, 20, 3), 100, jnp.uint8)
  out = device_resident.augment_on_device(images, jax.random.key(0), "basic", out_size=12)
  assert out.shape == (2, 12, 12, 3)
  np.testing.assert_allclose(out, 100.0, atol=1e-3)  # a flat image stays flat


def test_flip_mirrors_exactly_and_both_ways_occur():
  flip_only = augment.AugmentConfig(flip=True)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (32, 9, 9, 3)),
                       jnp.uint8)
  out = np.asarray(device_resident.augment_on_device(images, jax.random.key(3), flip_only))
  source = np.asarray(images, np.float32)
  flipped = [np.array_equal(o, s[:, ::-1]) for o, s in zip(out, source)]
  kept = [np.array_equal(o, s) for o, s in zip(out, source)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def test_load_split_to_device_matches_the_records(mesh):
  records = _records(11)
  dataset = device_resident.load_split_to_device(records, mesh, image_size=16, chunk_size=4)
  assert dataset.num_records == 11
  assert dataset.images.dtype == jnp.uint8
  assert dataset.images.sharding.is_fully_replicated
  np.testing.assert_array_equal(dataset.images, np.stack([r["pixels"] for r in records]))
  np.testing.assert_array_equal(dataset.labels["record_index"], np.arange(11))
  np.testing.assert_array_equal(dataset.labels["expression_mask"],
                                [float(i % 3 != 0) for i in range(11)])
  np.testing.assert_allclose(dataset.labels["valence_arousal"][:, 0], np.arange(11) / 11)


def test_compiled_batches_are_sharded_deterministic_and_labelled(mesh):
  records = _records(32)
  dataset = device_resident.load_split_to_device(records, mesh, image_size=16)
  batch_size = 2 * mesh.devices.size
  draw = device_resident.compile_draw_batch(mesh, global_batch_size=batch_size, seed=0,
                                        augment="none")
  batch = draw(dataset, 3)
  assert batch["image"].shape == (batch_size, 16, 16, 3)
  assert batch["image"].sharding == NamedSharding(mesh, P("data"))
  indices = np.asarray(batch["record_index"])
  np.testing.assert_array_equal(
      indices, device_resident.device_batch_indices(3, 32, batch_size, 0))
  np.testing.assert_array_equal(batch["image"],
                                np.stack([records[i]["pixels"] for i in indices]))
  np.testing.assert_array_equal(batch["expression"], [i % 8 for i in indices])
  np.testing.assert_array_equal(draw(dataset, 3)["record_index"], indices)


def test_compiled_draw_equals_draw_batch_under_one_jit(mesh):
  dataset = device_resident.load_split_to_device(_records(16), mesh, image_size=16)
  draw = device_resident.compile_draw_batch(mesh, global_batch_size=8, seed=4,
                                        augment="strong")
  reference = jax.jit(lambda d, s: device_resident.draw_batch(
      d, s, global_batch_size=8, seed=4, augment="strong"))(dataset, 2)
  got = draw(dataset, 2)
  assert set(got) == set(reference)
  np.testing.assert_allclose(got["image"], reference["image"], atol=1e-3)
  np.testing.assert_array_equal(got["record_index"], reference["record_index"])
