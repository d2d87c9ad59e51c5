"""Per-example preprocessing in TensorFlow: crop, flip, RandAugment, normalise, erase.

`make_preprocess` builds the function the host tf.data pipeline maps over
every example (`input_pipeline.Data`), for training and for evaluation.
Training draws every random choice with stateless ops from the example's seed
(seed, global example counter), split into one stream per stage: [0] crop,
[1] flip, [2] RandAugment and random erasing (`augment.py`), so the data stay a
function of (seed, step) and turning the later stages on leaves the crop and
flip of every example as they were.

Order: crop and flip on 0..255 pixels, RandAugment on those pixels (rounded to
uint8 values, as the PIL operations of the references see them), then
normalisation, then random erasing in normalised space.

TensorFlow is imported lazily (`_tf`), so importing this module costs nothing
where only JAX is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from resnet_jax import augment
from resnet_jax.errors import UserError

AUGMENTATIONS = ('auto', 'pad_crop', 'random_resized_crop', 'resize_crop', 'none')
# random_resized_crop's box (Inception): its share of the image's area, its width / height, and
# the tries before the whole image is taken. Shared by tf.data (here) and Grain (grain_loader).
CROP_AREA, CROP_RATIO, CROP_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10


def _tf():
  """Imports TensorFlow with its GPUs hidden, so tf.data never takes accelerator memory."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised; devices were hidden the first time.
    pass
  return tf


def decode(tf: Any, data: Any) -> Any:
  """Encoded image bytes -> uint8 HxWx3: the one decoder of training, verification and the
  in-memory and on-device copies of a split (image_folder), so all see the same pixels."""
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def fit_to_size(tf: Any, image: Any, size: int) -> Any:
  """RGB float32 at size x size: the host pipeline's and the device dataset's shared first step."""
  image = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  if image.shape[0] == size and image.shape[1] == size:
    return image
  # Decoded files have no static height and width: decide per image, so images
  # already at the size (every CIFAR file) skip the resize, which is the identity.
  shape = tf.shape(image)
  return tf.cond(tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size)),
                 lambda: image,
                 lambda: tf.image.resize(image, (size, size), antialias=True))


def augment_kind(config_ds: Any) -> str:
  """The training augmentation: 'auto' is pad_crop up to 64 px, random_resized_crop above."""
  kind = config_ds.get('augment', 'auto')
  if kind not in AUGMENTATIONS:
    raise UserError(f'config.dataset.augment: unknown augmentation {kind!r}; choose one of '
                    f'{", ".join(AUGMENTATIONS)}')
  if kind == 'auto':
    return 'pad_crop' if int(config_ds.image_size) <= 64 else 'random_resized_crop'
  return kind


def _resize_shorter(tf: Any, image: Any, size: int) -> Any:
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.minimum(h, w)
  new = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
  return tf.image.resize(image, new, method='bilinear', antialias=True)


def pixel_norm(config_ds: Any) -> tuple[np.ndarray, np.ndarray]:
  """(255 * mean, 1 / (255 * std)) in float32: normalising is (x - mean) * inv_std.

  One set of constants and one formula for the host (here) and the device
  (`device_data.normalise`): a multiplication rounds the same everywhere.
  """
  mean = np.asarray(config_ds.mean, np.float32) * np.float32(255.0)
  std = np.asarray(config_ds.std, np.float32) * np.float32(255.0)
  return mean, np.float32(1.0) / std


def sends_uint8(config_ds: Any) -> bool:
  """Whether batches leave the host as uint8 pixels (normalised in the jitted step).

  `dataset.transfer='uint8'` (the default) sends a quarter of float32's bytes;
  random erasing works in normalised space, so with it on the host normalises.
  """
  transfer = config_ds.get('transfer', 'uint8')
  if transfer not in ('uint8', 'float32'):
    raise UserError(f"config.dataset.transfer: choose 'uint8' or 'float32', got {transfer!r}")
  return transfer == 'uint8' and not float(config_ds.get('random_erasing', 0.0))


def make_preprocess(config_ds: Any, train: bool, as_uint8: bool = False):
  """Returns fn(image uint8 HxWxC, seed int64[2]) -> float32 normalised image.

  `fn.from_file(encoded bytes, seed)` is the same from an image file's bytes
  (decoding only the crop window of a JPEG under random_resized_crop).

  `as_uint8`: the image before normalisation, rounded to uint8 (pixels that
  crops and flips leave integral stay exact; resizes are rounded, as PIL's
  are); `device_data.normalise` then gives the same float32 values.
  """
  tf = _tf()
  size = int(config_ds.image_size)
  resize_size = int(config_ds.get('resize_size', 0) or 0)
  kind = augment_kind(config_ds) if train else 'eval'
  mean, inv_std = (tf.constant(v) for v in pixel_norm(config_ds))
  pad = int(config_ds.get('crop_padding', 4))
  flip = bool(config_ds.get('flip', True))
  eval_crop = bool(config_ds.get('eval_crop', True))
  rand_augment = augment.parse_randaugment(config_ds.get('randaugment', '')) if train else None
  erasing = float(config_ds.get('random_erasing', 0.0)) if train else 0.0
  fill = augment.fill_colour(config_ds.mean)

  def window(shape, seed):
    """random_resized_crop's box (begin, size) for an image of `shape` [h, w, 3]."""
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=CROP_RATIO,
        area_range=CROP_AREA, max_attempts=CROP_TRIES, use_image_if_no_bounding_boxes=True)
    return begin, crop

  def fn(image, seed):
    image = tf.cast(image, tf.float32)
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    if kind == 'random_resized_crop':
      begin, crop = window(tf.shape(image), seeds[0])
      image = tf.slice(image, begin, crop)
    return finish(image, seeds)

  def from_file(data, seed):
    """fn(decode(data), seed) from encoded bytes: under random_resized_crop a JPEG is
    decoded only inside its crop window (the same box from its header's size, the same
    pixels: `tf.image.decode_and_crop_jpeg`), which saves most of the decoding of a
    large photo; other formats and augmentations decode the whole image."""
    if kind != 'random_resized_crop':
      return fn(decode(tf, data), seed)

    def jpeg_window():
      seeds = tf.random.experimental.stateless_split(seed, 3)
      shape = tf.concat([tf.image.extract_jpeg_shape(data)[:2], [3]], 0)
      begin, crop = window(shape, seeds[0])
      image = tf.image.decode_and_crop_jpeg(
          data, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3)
      return finish(tf.cast(image, tf.float32), seeds)

    return tf.cond(tf.io.is_jpeg(data), jpeg_window, lambda: fn(decode(tf, data), seed))

  def finish(image, seeds):
    """Everything after random_resized_crop's window (the whole of the other kinds)."""
    if kind == 'pad_crop':
      image = fit_to_size(tf, image, size)  # As on the device (to_uint8_images).
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, (size, size, 3), seeds[0])
    elif kind == 'random_resized_crop':
      image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
    elif kind == 'resize_crop':
      image = tf.image.resize(image, (resize_size or size, resize_size or size), antialias=True)
      image = tf.image.stateless_random_crop(image, (size, size, 3), seeds[0])
    elif kind == 'none':
      image = tf.image.resize(image, (size, size), antialias=True)
    else:  # eval: resize (shorter side for large images), centre crop.
      if resize_size > size and eval_crop:
        image = _resize_shorter(tf, image, resize_size)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        image = tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)
      else:
        image = tf.image.resize(image, (size, size), antialias=True)
    if train and flip:
      image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.ensure_shape(image, (size, size, 3))
    if rand_augment or erasing:  # A stream of their own: crop and flip draw as before.
      more = tf.random.experimental.stateless_split(seeds[2], 2)
    if rand_augment:
      image = augment.randaugment(tf, image, rand_augment[0], rand_augment[1], more[0], fill)
    if as_uint8:
      if erasing:
        raise ValueError('random erasing needs the host to normalise (sends_uint8)')
      return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image = (image - mean) * inv_std
    if erasing:
      image = augment.random_erasing(tf, image, erasing, more[1])
    return image

  fn.from_file = from_file
  return fn
