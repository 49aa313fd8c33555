"""Tests of the device-resident split: shard assignment, epoch coverage, determinism
from the step, augmentation shapes, dtypes and flip correctness, loading into shards
and sharded batches."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from affect_jax.data import device_augment, device_resident
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


@pytest.mark.parametrize("num_records, shards", [(64, 8), (70, 8), (5, 8), (9, 1)])
def test_records_are_dealt_to_shards_once_each_evenly_and_by_seed(num_records, shards):
  assignment = device_resident.shard_assignment(num_records, shards, seed=3)
  dealt = assignment[assignment != device_resident.PADDING]
  assert sorted(dealt.tolist()) == list(range(num_records))
  sizes = (assignment != device_resident.PADDING).sum(axis=1)
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(
      assignment, device_resident.shard_assignment(num_records, shards, seed=3))
  if num_records > shards:
    assert not np.array_equal(
        assignment, device_resident.shard_assignment(num_records, shards, seed=4))


@pytest.mark.parametrize("valid_rows, rows, batch", [(64, 64, 8), (70, 71, 8), (9, 10, 9)])
def test_each_shard_row_at_most_once_per_epoch_never_padding(valid_rows, rows, batch):
  valid = jnp.arange(rows) < valid_rows
  per_epoch = device_resident.steps_per_epoch(valid_rows, batch)
  indices = jax.jit(device_resident.shard_batch_indices, static_argnums=(2, 3, 4))
  for epoch in range(2):
    seen = np.concatenate([np.asarray(indices(epoch * per_epoch + s, valid, batch,
                                              per_epoch, 0, 1))
                           for s in range(per_epoch)])
    assert len(seen) == len(set(seen.tolist())) == per_epoch * batch
    assert seen.min() >= 0 and seen.max() < valid_rows  # padding rows never read
    if valid_rows % batch == 0:
      assert sorted(seen.tolist()) == list(range(valid_rows))


def test_rows_depend_only_on_seed_step_and_shard():
  valid = jnp.ones(64, bool)
  first = device_resident.shard_batch_indices(5, valid, 8, 8, seed=1, shard=0)
  again = jax.jit(device_resident.shard_batch_indices, static_argnums=(2, 3, 4))(
      5, valid, 8, 8, 1, 0)
  np.testing.assert_array_equal(first, again)
  for other in (dict(seed=2, shard=0), dict(seed=1, shard=1)):
    assert not np.array_equal(
        first, device_resident.shard_batch_indices(5, valid, 8, 8, **other))
  # Epochs are shuffled differently: step 0 and the first step of epoch 1 differ.
  assert not np.array_equal(device_resident.shard_batch_indices(0, valid, 8, 8, 1, 0),
                            device_resident.shard_batch_indices(8, valid, 8, 8, 1, 0))


def test_batch_larger_than_a_shard_is_refused():
  with pytest.raises(ValueError, match="batch size per device"):
    device_resident.steps_per_epoch(4, 8)


@pytest.mark.parametrize("policy", ["none", "basic", "strong"])
def test_augmentation_shapes_dtypes_and_range(policy):
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3)),
                       jnp.uint8)
  out = jax.jit(device_augment.augment_on_device, static_argnums=(2,))(
      images, jax.random.key(0), policy)
  assert out.shape == (6, 20, 20, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0 and float(out.max()) <= 255
  if policy == "none":
    np.testing.assert_array_equal(out, images.astype(jnp.float32))
  else:
    assert not np.allclose(out, images.astype(jnp.float32))


def test_resizes_to_the_requested_size():
  images = jnp.full((2, 20, 20, 3), 100, jnp.uint8)
  out = device_augment.augment_on_device(images, jax.random.key(0), "basic", out_size=12)
  assert out.shape == (2, 12, 12, 3)
  np.testing.assert_allclose(out, 100.0, atol=1e-3)  # a flat image stays flat


def test_flip_mirrors_exactly_and_both_ways_occur():
  flip_only = augment.AugmentConfig(flip=True)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (32, 9, 9, 3)),
                       jnp.uint8)
  out = np.asarray(device_augment.augment_on_device(images, jax.random.key(3), flip_only))
  source = np.asarray(images, np.float32)
  flipped = [np.array_equal(o, s[:, ::-1]) for o, s in zip(out, source)]
  kept = [np.array_equal(o, s) for o, s in zip(out, source)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def _shards(array, mesh):
  """Each device's rows of a sharded array, in data-axis order."""
  by_device = {shard.device: np.asarray(shard.data) for shard in array.addressable_shards}
  return [by_device[device] for device in mesh.devices.flat]


def test_the_split_is_sharded_each_device_holding_its_assigned_records(mesh):
  records = _records(11)
  dataset = device_resident.load_split_to_device(records, mesh, seed=5, image_size=16,
                                                 chunk_size=1)
  devices = mesh.devices.size
  assignment = device_resident.shard_assignment(11, devices, seed=5)
  assert dataset.num_records == 11 and dataset.images.dtype == jnp.uint8
  assert dataset.images.sharding == NamedSharding(mesh, P("data"))
  assert dataset.rows_per_device == assignment.shape[1] == 2
  assert dataset.images.shape[0] == devices * 2  # not a copy per device
  assert dataset.shortest_shard == 1
  for ids, images, index, valid, mask in zip(
      assignment, _shards(dataset.images, mesh),
      _shards(dataset.labels["record_index"], mesh), _shards(dataset.valid, mesh),
      _shards(dataset.labels["expression_mask"], mesh)):
    real = ids != device_resident.PADDING
    np.testing.assert_array_equal(valid, real)
    np.testing.assert_array_equal(index[real], ids[real])
    np.testing.assert_array_equal(images[real], np.stack([records[i]["pixels"]
                                                          for i in ids[real]]))
    np.testing.assert_array_equal(mask[real], [float(i % 3 != 0) for i in ids[real]])
    assert not images[~real].any()


def test_compiled_batches_are_sharded_deterministic_and_labelled(mesh):
  records = _records(40)
  dataset = device_resident.load_split_to_device(records, mesh, image_size=16)
  batch_size = 2 * mesh.devices.size
  draw = device_resident.compile_draw_batch(mesh, dataset, global_batch_size=batch_size,
                                            seed=0, augment="none")
  batch = draw(dataset, 3)
  assert batch["image"].shape == (batch_size, 16, 16, 3)
  assert batch["image"].sharding == NamedSharding(mesh, P("data"))
  indices = np.asarray(batch["record_index"])
  assert len(set(indices.tolist())) == batch_size
  assignment = device_resident.shard_assignment(40, mesh.devices.size, seed=0)
  for shard, rows in enumerate(indices.reshape(mesh.devices.size, 2)):
    assert set(rows.tolist()) <= set(assignment[shard].tolist())  # its own shard
  np.testing.assert_array_equal(batch["image"],
                                np.stack([records[i]["pixels"] for i in indices]))
  np.testing.assert_array_equal(batch["expression"], [i % 8 for i in indices])
  np.testing.assert_array_equal(draw(dataset, 3)["record_index"], indices)
  assert not np.array_equal(draw(dataset, 4)["record_index"], indices)


def test_two_computations_equal_one(mesh):
  dataset = device_resident.load_split_to_device(_records(16), mesh, image_size=16)
  kwargs = dict(global_batch_size=8, seed=4, augment="strong")
  one = device_resident.compile_draw_batch(mesh, dataset, split_colour=False, **kwargs)
  two = device_resident.compile_draw_batch(mesh, dataset, split_colour=True, **kwargs)
  got, reference = two(dataset, 2), one(dataset, 2)
  assert set(got) == set(reference)
  np.testing.assert_allclose(got["image"], reference["image"], atol=1e-3)
  np.testing.assert_array_equal(got["record_index"], reference["record_index"])
