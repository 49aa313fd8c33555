"""Augmentation inside jit, for batches drawn on the devices (device_resident.py).

The host pipeline's policies (`augment.AugmentConfig`): one bilinear warp for random
resized crop + rotation + horizontal flip (the same affine parametrisation as the
host's OpenCV warp, reflect-101 border), then brightness, contrast and saturation
jitter. Random draws come from jax.random, so the images are not bit-identical to the
host pipeline's, only identically distributed. Images come out as float32 pixel values
in [0, 255]; the train step normalises them as it does uint8 batches.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from affect_jax.data.augment import AugmentConfig

GREY_WEIGHTS = (0.299, 0.587, 0.114)


def augment_policy(augment) -> AugmentConfig:
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


def has_geometry(cfg: AugmentConfig) -> bool:
  return bool(cfg.flip or cfg.rotation_degrees or cfg.crop_scale != (1.0, 1.0))


def has_colour(cfg: AugmentConfig) -> bool:
  return bool(cfg.brightness or cfg.contrast or cfg.saturation)


def image_keys(rng, count: int):
  keys = jax.random.split(rng, count)
  return (jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys),
          jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys))


def warp_batch(images_uint8, warp_keys, cfg, size: int, with_grey: bool):
  """Crop + rotation + flip (+ resize to `size`) of a batch; float32 pixels, and the
  grey level as a fourth channel when `with_grey` (for the colour jitter)."""
  resize = size != images_uint8.shape[1] or size != images_uint8.shape[2]

  def one(key, image):
    image = image.astype(jnp.float32)
    if with_grey:
      image = jnp.concatenate([image, _grey(image)[..., None]], axis=-1)
    if not (has_geometry(cfg) or resize):
      return image
    matrix = (_affine_matrix(key, size, cfg) if has_geometry(cfg)
              else jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    if resize:  # map the output square onto the whole stored image first
      scale = jnp.diag(jnp.array([image.shape[1] / size, image.shape[0] / size, 1.0]))
      shift = jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
      unshift = jnp.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
      matrix = (unshift @ scale @ shift
                @ jnp.vstack([matrix, jnp.array([0.0, 0.0, 1.0])]))[:2]
    return _warp(image, matrix, size)

  return jax.vmap(one)(warp_keys, images_uint8)


def jitter_batch(pixels, colour_keys, cfg):
  """The colour jitter of `warp_batch`'s output (which carries the grey channel)."""
  if not has_colour(cfg):
    return pixels
  return _jitter_colours(colour_keys, pixels[..., :3], pixels[..., 3:], cfg)


def augment_on_device(images_uint8, rng, augment, out_size: int | None = None
                      ) -> jax.Array:
  """uint8 [B, H, W, 3] -> augmented float32 [B, out_size, out_size, 3] in [0, 255]
  (jittable; `augment` is an AugmentConfig or a policy name: none, basic, strong).
  Each image draws its own crop, rotation, flip and colour factors from `rng`.

  Under one jit XLA:CPU fuses the bilinear gathers of the warp into every consumer of
  the colour jitter and recomputes them (6-7x slower with contrast or saturation);
  on a CPU mesh `compile_draw_batch` runs the two parts as two computations.
  """
  cfg = augment_policy(augment)
  warp_keys, colour_keys = image_keys(rng, images_uint8.shape[0])
  pixels = warp_batch(images_uint8, warp_keys, cfg, out_size or images_uint8.shape[1],
                     has_colour(cfg))
  return jitter_batch(pixels, colour_keys, cfg)
