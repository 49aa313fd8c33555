"""A whole decoded split kept on the devices, batches drawn and augmented inside jit.

When a split fits in device memory (s-Aff-Wild2's 142k training frames at 112x112 are
5.3 GB of uint8, against 80 GB on an H100), the host input pipeline can leave the
training loop entirely:

  dataset = load_split_to_device(source, mesh)          # once: decode, upload in chunks
  draw = compile_draw_batch(mesh, global_batch_size=256, seed=config.seed,
                            augment=AugmentConfig.from_policy("basic"))
  for step in ...:
    batch = draw(dataset, step)        # on device: indices, gather, augment
    state, metrics = train_fn(state, batch)

The batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
shuffles the records by a permutation drawn from (seed, e), and step s takes its slice
of it, so a run resumes exactly from the step alone (no iterator state). Each epoch
visits every record at most once (exactly once when the batch size divides the split;
otherwise a different remainder of fewer than one batch is left out each epoch).

Augmentation follows the host pipeline's policies (`augment.AugmentConfig`):
one bilinear warp for random resized crop + rotation + horizontal flip (the same affine
parametrisation as the host's OpenCV warp, reflect-101 border), then brightness,
contrast and saturation jitter; random draws come from jax.random, so the images are
not bit-identical to the host pipeline's, only identically distributed. Images leave
`augment_on_device` as float32 pixel values in [0, 255]; the train step normalises
them as it does uint8 batches (`pipeline.normalize_images`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from affect_jax import vocabulary
from affect_jax.data import pipeline
from affect_jax.data.augment import AugmentConfig
from affect_jax.data_parallel import AXIS

GREY_WEIGHTS = (0.299, 0.587, 0.114)
LABEL_KEYS = vocabulary.LABEL_KEYS + ("record_index",)


@flax.struct.dataclass
class DeviceDataset:
  """A decoded split on the devices (a pytree: pass it to jitted functions).

  images: uint8 [N, H, W, 3], replicated on every device of the mesh.
  labels: the training labels of `records.record_to_example` (float masks, 0
    fillers under masks) and `record_index`, each [N, ...], replicated.
  """
  images: jax.Array
  labels: dict[str, jax.Array]

  @property
  def num_records(self) -> int:
    return self.images.shape[0]


def split_nbytes(num_records: int, image_size: int = vocabulary.IMAGE_SIZE) -> int:
  """Device bytes of a split's uint8 images (labels add ~80 bytes per record)."""
  return num_records * image_size * image_size * 3


def _device_memory_limit(mesh: Mesh) -> int | None:
  # Only this process's devices report their memory.
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def _replicated_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  # The callback form works on one process and on many (each process holds the data).
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_chunk(images, chunk, start):
  return jax.lax.dynamic_update_slice(images, chunk, (start, 0, 0, 0))


def load_split_to_device(source, mesh: Mesh, *, image_size: int = vocabulary.IMAGE_SIZE,
                         chunk_size: int = 4096, max_fraction_of_device_memory: float = 0.5
                         ) -> DeviceDataset:
  """Decodes every record of `source` (a TFDS data source of `affwild2`, or any
  sequence of such records) and places the split on every device of `mesh`.

  Host memory stays bounded: images are decoded and uploaded `chunk_size` at a time
  into a preallocated device array. Refuses a split whose images would take more than
  `max_fraction_of_device_memory` of a device's memory (where the device reports it).
  """
  num_records = len(source)
  if num_records == 0:
    raise ValueError("the split has no record")
  nbytes = split_nbytes(num_records, image_size)
  limit = _device_memory_limit(mesh)
  if limit is not None and nbytes > max_fraction_of_device_memory * limit:
    raise ValueError(
        f"the split's {num_records} images take {nbytes / 2**30:.1f} GiB, more than "
        f"{max_fraction_of_device_memory:.0%} of the device's {limit / 2**30:.1f} GiB; "
        "use the host input pipeline (config.input.device_resident=False)")
  replicated = NamedSharding(mesh, P())
  images = jax.jit(lambda: jnp.zeros((num_records, image_size, image_size, 3), jnp.uint8),
                   out_shardings=replicated)()
  labels: dict[str, list[np.ndarray]] = {key: [] for key in LABEL_KEYS}
  for start in range(0, num_records, chunk_size):
    stop = min(start + chunk_size, num_records)
    pixels = np.empty((stop - start, image_size, image_size, 3), np.uint8)
    for row, index in enumerate(range(start, stop)):
      record = source[index]
      example = pipeline.load_example(record, index, AugmentConfig(),
                                            None, image_size)
      pixels[row] = example["image"]
      for key in LABEL_KEYS:
        labels[key].append(np.asarray(example[key]))
    images = _write_chunk(images, _replicated_array(pixels, replicated),
                          jnp.int32(start))
  label_arrays = {key: _replicated_array(np.stack(values), replicated)
                  for key, values in labels.items()}
  return DeviceDataset(images=images, labels=label_arrays)


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
  if not 0 < global_batch_size <= num_records:
    raise ValueError(f"batch size {global_batch_size} must be in 1..{num_records} "
                     "(the number of records)")
  return num_records // global_batch_size


def device_batch_indices(step, num_records: int, global_batch_size: int, seed: int
                         ) -> jax.Array:
  """Record indices [global_batch_size] (int32) of training step `step` (jittable).

  Step s of epoch e = s // steps_per_epoch reads positions
  [(s mod steps_per_epoch) * B, ... + B) of a permutation of the records drawn from
  (seed, e): no record twice in an epoch, and the same indices for the same step
  whatever happened before it.
  """
  per_epoch = steps_per_epoch(num_records, global_batch_size)
  step = jnp.asarray(step, jnp.int32)
  epoch, position = step // per_epoch, step % per_epoch
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  order = jax.random.permutation(key, num_records).astype(jnp.int32)
  return jax.lax.dynamic_slice(order, (position * global_batch_size,),
                               (global_batch_size,))


# ----------------------------------------------------------------------------------
# Augmentation on the device.
# ----------------------------------------------------------------------------------


def _policy(augment) -> AugmentConfig:
  cfg = (AugmentConfig.from_policy(augment) if isinstance(augment, str)
         else augment)
  if cfg.randaugment_ops:
    raise ValueError("RandAugment-like operations run on the host pipeline only; "
                     "device augmentation has the policies none, basic and strong")
  return cfg


def _affine_matrix(key, size: int, cfg: AugmentConfig) -> jax.Array:
  """[2, 3] output->input map in pixel-centre coordinates; the parametrisation of
  augment.crop_draws and _crop_rows (random resized crop, rotation, flip)."""
  keys = jax.random.split(key, 6)
  area = size * size * jax.random.uniform(keys[0], (), minval=cfg.crop_scale[0],
                                          maxval=cfg.crop_scale[1])
  log_ratio = jax.random.uniform(keys[1], (), minval=math.log(cfg.crop_ratio[0]),
                                 maxval=math.log(cfg.crop_ratio[1]))
  ratio = jnp.exp(log_ratio)
  crop_w = jnp.minimum(size, jnp.sqrt(area * ratio))
  crop_h = jnp.minimum(size, jnp.sqrt(area / ratio))
  centre_x = jax.random.uniform(keys[2], (), minval=crop_w / 2, maxval=size - crop_w / 2)
  centre_y = jax.random.uniform(keys[3], (), minval=crop_h / 2, maxval=size - crop_h / 2)
  angle = jnp.deg2rad(jax.random.uniform(keys[4], (), minval=-cfg.rotation_degrees,
                                         maxval=cfg.rotation_degrees))
  flip = jnp.where(cfg.flip & (jax.random.uniform(keys[5], ()) < 0.5), -1.0, 1.0)
  scale_x, scale_y = crop_w / size * flip, crop_h / size
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  linear = jnp.array([[cos * scale_x, -sin * scale_y], [sin * scale_x, cos * scale_y]])
  half = jnp.array([size / 2, size / 2])
  offset = jnp.array([centre_x, centre_y]) - linear @ half + linear @ jnp.array(
      [0.5, 0.5]) - 0.5
  return jnp.concatenate([linear, offset[:, None]], axis=1)


def _reflect_101(index, size: int):
  """OpenCV's BORDER_REFLECT_101 (dcb|abcd|cba), then clipped for far outliers."""
  if size == 1:
    return jnp.zeros_like(index)
  index = jnp.abs(index)
  index = jnp.where(index > size - 1, 2 * (size - 1) - index, index)
  return jnp.clip(index, 0, size - 1)


def _warp(image, matrix, size: int):
  """Bilinear sampling of `image` [H, W, C] at `matrix` @ (x, y, 1) -> [size, size, C]."""
  height, width = image.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32),
                        jnp.arange(size, dtype=jnp.float32), indexing="ij")
  x_in = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
  y_in = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
  x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
  wx, wy = (x_in - x0)[..., None], (y_in - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  pixels = image.astype(jnp.float32)

  def tap(y, x):
    return pixels[_reflect_101(y, height), _reflect_101(x, width)]

  top = (1 - wx) * tap(y0, x0) + wx * tap(y0, x0 + 1)
  bottom = (1 - wx) * tap(y0 + 1, x0) + wx * tap(y0 + 1, x0 + 1)
  return (1 - wy) * top + wy * bottom


def _grey(pixels):
  # A weighted sum, not a matmul: XLA:CPU runs a dot with 3-long contraction slowly.
  return (GREY_WEIGHTS[0] * pixels[..., 0] + GREY_WEIGHTS[1] * pixels[..., 1]
          + GREY_WEIGHTS[2] * pixels[..., 2])


def _jitter_colours(keys, pixels, grey, cfg: AugmentConfig):
  """Brightness, contrast (towards the image's mean grey level), saturation (towards
  each pixel's grey level) of a batch [B, H, W, 3] whose grey levels [B, H, W, 1] are
  given, one factor of each per image, saturated to [0, 255] after each step as the
  host pipeline does. The grey level is carried along (it is affine in the pixels,
  the weights summing to 1) instead of recomputed from the jittered pixels, so no op
  reads the channels apart (such ops made XLA recompute the warp for each channel);
  it differs from the host's only where brightness saturates."""
  def factors(key):
    k = jax.random.split(key, 3)
    return [jax.random.uniform(k[i], (), minval=1 - amount, maxval=1 + amount)
            for i, amount in enumerate((cfg.brightness, cfg.contrast, cfg.saturation))]

  brightness, contrast, saturation = (f[:, None, None, None]
                                      for f in jax.vmap(factors)(keys))
  if cfg.brightness:
    pixels = jnp.clip(pixels * brightness, 0, 255)
    grey = grey * brightness
  if cfg.contrast:
    # The per-image mean as a matmul with a ones vector: XLA:CPU's YNNPACK reduction
    # of this shape is 10x slower.
    flat = grey.reshape(grey.shape[0], -1)
    mean = (flat @ jnp.full((flat.shape[1],), 1.0 / flat.shape[1]))[:, None, None, None]
    pixels = jnp.clip(contrast * pixels + (1 - contrast) * mean, 0, 255)
    grey = contrast * grey + (1 - contrast) * mean
  if cfg.saturation:
    pixels = jnp.clip(saturation * pixels + (1 - saturation) * grey, 0, 255)
  return pixels


def _has_geometry(cfg: AugmentConfig) -> bool:
  return bool(cfg.flip or cfg.rotation_degrees or cfg.crop_scale != (1.0, 1.0))


def _has_colour(cfg: AugmentConfig) -> bool:
  return bool(cfg.brightness or cfg.contrast or cfg.saturation)


def _image_keys(rng, count: int):
  keys = jax.random.split(rng, count)
  return (jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys),
          jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys))


def _geometry(images_uint8, warp_keys, cfg, size: int, with_grey: bool):
  """Crop + rotation + flip (+ resize to `size`) of a batch; float32 pixels, and the
  grey level as a fourth channel when `with_grey` (for the colour jitter)."""
  resize = size != images_uint8.shape[1] or size != images_uint8.shape[2]

  def one(key, image):
    image = image.astype(jnp.float32)
    if with_grey:
      image = jnp.concatenate([image, _grey(image)[..., None]], axis=-1)
    if not (_has_geometry(cfg) or resize):
      return image
    matrix = (_affine_matrix(key, size, cfg) if _has_geometry(cfg)
              else jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    if resize:  # map the output square onto the whole stored image first
      scale = jnp.diag(jnp.array([image.shape[1] / size, image.shape[0] / size, 1.0]))
      shift = jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
      unshift = jnp.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
      matrix = (unshift @ scale @ shift
                @ jnp.vstack([matrix, jnp.array([0.0, 0.0, 1.0])]))[:2]
    return _warp(image, matrix, size)

  return jax.vmap(one)(warp_keys, images_uint8)


def _colour(pixels, colour_keys, cfg):
  """The colour jitter of `_geometry`'s output (which carries the grey channel)."""
  if not _has_colour(cfg):
    return pixels
  return _jitter_colours(colour_keys, pixels[..., :3], pixels[..., 3:], cfg)


def augment_on_device(images_uint8, rng, augment, out_size: int | None = None
                      ) -> jax.Array:
  """uint8 [B, H, W, 3] -> augmented float32 [B, out_size, out_size, 3] in [0, 255]
  (jittable; `augment` is an AugmentConfig or a policy name: none, basic, strong).
  Each image draws its own crop, rotation, flip and colour factors from `rng`.

  Under one jit XLA fuses the bilinear gathers of the warp into every consumer of the
  colour jitter and recomputes them (6-7x slower on XLA:CPU with contrast or
  saturation); `compile_draw_batch` runs the two parts as two computations.
  """
  cfg = _policy(augment)
  warp_keys, colour_keys = _image_keys(rng, images_uint8.shape[0])
  pixels = _geometry(images_uint8, warp_keys, cfg, out_size or images_uint8.shape[1],
                     _has_colour(cfg))
  return _colour(pixels, colour_keys, cfg)


# ----------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------


def _batch_rng(seed: int, step):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x5EED), step)


def draw_batch(dataset: DeviceDataset, step, *, global_batch_size: int, seed: int,
               augment: Any = "basic", image_size: int | None = None) -> dict:
  """The training batch of `step` (jittable): indices, gathered labels, augmented
  images (float32 pixels). The augmentation key is derived from (seed, step) too."""
  indices = device_batch_indices(step, dataset.num_records, global_batch_size, seed)
  batch = {key: jnp.take(value, indices, axis=0) for key, value in dataset.labels.items()}
  batch["image"] = augment_on_device(jnp.take(dataset.images, indices, axis=0),
                                     _batch_rng(seed, step), augment, image_size)
  return batch


def compile_draw_batch(mesh: Mesh, *, global_batch_size: int, seed: int,
                       augment: Any = "basic", image_size: int | None = None):
  """`draw_batch` as device computations whose batch comes out sharded over the mesh's
  data axis, as `train.device_batch` places host batches: each device gathers and
  augments its own rows of the global batch. Returns fn(dataset, step) -> batch, the
  same values as draw_batch; two computations (indices + gather + warp, then colour)
  dispatched back to back, with no host round trip."""
  if global_batch_size % mesh.devices.size:
    raise ValueError(f"batch size {global_batch_size} must be a multiple of the "
                     f"number of devices ({mesh.devices.size})")
  cfg = _policy(augment)
  sharded = NamedSharding(mesh, P(AXIS))

  def gather_and_warp(dataset, step):
    indices = device_batch_indices(step, dataset.num_records, global_batch_size, seed)
    batch = {key: jnp.take(value, indices, axis=0)
             for key, value in dataset.labels.items()}
    warp_keys, colour_keys = _image_keys(_batch_rng(seed, step), global_batch_size)
    images = jnp.take(dataset.images, indices, axis=0)
    batch["image"] = _geometry(images, warp_keys, cfg, image_size or images.shape[1],
                               _has_colour(cfg))
    return batch, colour_keys

  first = jax.jit(gather_and_warp, out_shardings=(sharded, sharded))
  if not _has_colour(cfg):
    return lambda dataset, step: first(dataset, step)[0]

  def colour(batch, colour_keys):
    return dict(batch, image=_colour(batch["image"], colour_keys, cfg))

  second = jax.jit(colour, out_shardings=sharded)
  return lambda dataset, step: second(*first(dataset, step))
