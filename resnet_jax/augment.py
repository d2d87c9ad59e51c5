"""Training augmentations beyond crop and flip: RandAugment and random erasing, in TensorFlow.

Both run in the host tf.data pipeline (`input_pipeline.make_preprocess`) and
are stateless: every random choice comes from the example's seed, which is
keyed by (seed, example counter), so the data stays a function of (seed, step)
and a resumed run sees the same images.

RandAugment (Cubuk et al. 2020): N operations drawn uniformly (with
replacement) from the 14 below, each applied at the same magnitude M on the
0..10 scale (values above 10 extrapolate), with a random sign where the
operation has a direction. The operations and their ranges follow timm's
`rand_augment_ops` and big_vision's TF port: rotate up to 30 degrees, shear
up to 0.3, translate up to 45% of the side, solarize threshold 256 down to 0,
posterize 8 down to 4 bits, colour/contrast/brightness/sharpness factors
1 +- 0.9. Hand-written because the maintained TF implementation
(tensorflow_addons) is discontinued and the others live in model repositories,
not libraries.

Random erasing (Zhong et al. 2020): with probability p, one box of 2%-33% of
the image with aspect ratio 0.3-3.3 (log-uniform) is replaced by per-pixel
normal noise in normalised space (timm's 'pixel' mode); the box is clipped to
the image rather than retried.
"""

from __future__ import annotations

import math
from typing import Any

from resnet_jax.errors import UserError

MAX_MAGNITUDE = 30.0
OPS = ('identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color', 'posterize',
       'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x',
       'translate_y')


def parse_randaugment(text: str) -> tuple[int, float] | None:
  """'N,M' -> (N, M); '' -> None. Bad text is a UserError naming the field."""
  text = (text or '').strip()
  if not text:
    return None
  parts = text.split(',')
  try:
    n, m = int(parts[0]), float(parts[1])
    if len(parts) != 2:
      raise ValueError
  except (ValueError, IndexError):
    raise UserError(f"config.dataset.randaugment: expected 'N,M' such as '2,9' ('' = off), "
                    f'got {text!r}') from None
  if not 1 <= n <= 10:
    raise UserError(f'config.dataset.randaugment: N (operations per image) must be in 1..10, '
                    f'got {n}')
  if not 0 <= m <= MAX_MAGNITUDE:
    raise UserError(f'config.dataset.randaugment: M (magnitude) must be in 0..{MAX_MAGNITUDE:g}, '
                    f'got {m:g}')
  return n, m


def check_config(config_ds: Any) -> None:
  parse_randaugment(config_ds.get('randaugment', ''))
  p = float(config_ds.get('random_erasing', 0.0))
  if not 0.0 <= p <= 1.0:
    raise UserError(f'config.dataset.random_erasing: a probability in [0, 1], got {p}')
  if config_ds.get('on_device', False) and (config_ds.get('randaugment', '') or p > 0):
    raise UserError('config.dataset.on_device: the device-resident split crops and flips in '
                    'JAX only; RandAugment and random erasing need the host pipeline '
                    '(on_device=False)')


def _blend(tf: Any, a: Any, b: Any, factor: Any) -> Any:
  """a + factor * (b - a), clipped to 0..255 (PIL's ImageEnhance)."""
  return tf.clip_by_value(a + factor * (b - a), 0.0, 255.0)


def _gray(tf: Any, image: Any) -> Any:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _transform(tf: Any, image: Any, matrix: list[Any]) -> Any:
  """Projective transform (output pixel -> input pixel), nearest, gray fill."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  transform = tf.cast(tf.stack(matrix + [0.0, 0.0])[None], tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.stack([h, w]),
      fill_value=128.0, interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def _equalize(tf: Any, image: Any) -> Any:
  """Per-channel histogram equalisation (PIL's ImageOps.equalize)."""
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.where(step > 0, tf.gather(lut, c), c), tf.float32)
  return tf.stack([channel(tf.round(image[..., i])) for i in range(3)], -1)


def _apply_op(tf: Any, index: Any, image: Any, level: float, sign: Any) -> Any:
  """Operation `index` of OPS at magnitude level (M / 10) with direction `sign` (+-1)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  factor = 1.0 + sign * 0.9 * level

  def rotate():
    angle = sign * level * 30.0 * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _transform(tf, image, [cos, -sin, cx - cos * cx + sin * cy,
                                  sin, cos, cy - sin * cx - cos * cy])

  def autocontrast():
    lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.where(hi > lo, scaled, image)

  def posterize():
    bits = 8 - int(round(min(level, 1.0) * 4))
    shift = 8 - bits
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(
        tf.cast(tf.round(image), tf.uint8), shift), shift), tf.float32)

  def sharpness():
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'SAME')[0]
    return _blend(tf, blurred, image, factor)

  shear, shift = sign * level * 0.3, sign * level * 0.45
  branches = [
      lambda: image,
      autocontrast,
      lambda: _equalize(tf, image),
      rotate,
      lambda: tf.where(image >= 256.0 - 256.0 * min(level, 1.0), 255.0 - image, image),
      lambda: _blend(tf, _gray(tf, image), image, factor),
      posterize,
      lambda: _blend(tf, tf.fill(tf.shape(image), tf.reduce_mean(_gray(tf, image))), image,
                     factor),
      lambda: _blend(tf, tf.zeros_like(image), image, factor),
      sharpness,
      lambda: _transform(tf, image, [1.0, shear, 0.0, 0.0, 1.0, 0.0]),
      lambda: _transform(tf, image, [1.0, 0.0, 0.0, shear, 1.0, 0.0]),
      lambda: _transform(tf, image, [1.0, 0.0, shift * w, 0.0, 1.0, 0.0]),
      lambda: _transform(tf, image, [1.0, 0.0, 0.0, 0.0, 1.0, shift * h]),
  ]
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def randaugment(tf: Any, image: Any, n: int, magnitude: float, seed: Any) -> Any:
  """N random operations at magnitude M on a float32 image of 0..255 values (HxWx3)."""
  seeds = tf.random.experimental.stateless_split(seed, 2 * n)
  level = magnitude / 10.0
  for i in range(n):
    index = tf.random.stateless_uniform([], seeds[2 * i], 0, len(OPS), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], seeds[2 * i + 1]) < 0.5, -1.0, 1.0)
    image = _apply_op(tf, index, image, level, sign)
  return image


def random_erasing(tf: Any, image: Any, probability: float, seed: Any) -> Any:
  """One erased box (normal noise) with probability p, on a normalised image (HxWxC)."""
  seeds = tf.random.experimental.stateless_split(seed, 6)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  area = tf.cast(h * w, tf.float32) * tf.random.stateless_uniform([], seeds[0], 0.02, 1 / 3)
  log_ratio = tf.random.stateless_uniform([], seeds[1], math.log(0.3), math.log(1 / 0.3))
  ratio = tf.exp(log_ratio)
  eh = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), 1, h)
  ew = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), 1, w)
  top = tf.random.stateless_uniform([], seeds[2], 0, h - eh + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[3], 0, w - ew + 1, tf.int32)
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
  noise = tf.random.stateless_normal(tf.shape(image), seeds[4])
  erase = tf.random.stateless_uniform([], seeds[5]) < probability
  return tf.where(inside & erase, noise, image)
