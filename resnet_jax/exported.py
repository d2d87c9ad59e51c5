"""Use an export written by resnet_jax.export, without the model code or the checkpoint.

`load(dir)` deserializes the jax.export artefact (only JAX is needed to run it)
and reads the labels and the model card. `decode_image` turns file bytes into
the uint8 [S, S, 3] the export takes, the way evaluation prepared images:
tf.io.decode_image, then the eval resize of input_pipeline.make_preprocess,
then rounding to uint8 (exact when the image already has the trained size).
TensorFlow is imported only when an image is decoded.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from typing import Any

import numpy as np

from resnet_jax.errors import UserError

JAX_EXPORT_FILE = 'model.jaxexport'
LABELS_FILE = 'labels.json'
CARD_JSON = 'model_card.json'
MAX_PIXELS = 40_000_000  # A decoded image above this is refused before decoding.


class ImageError(ValueError):
  """The bytes are not an image we can decode, or one too large to decode."""

  def __init__(self, message: str, too_large: bool = False):
    super().__init__(message)
    self.too_large = too_large


class Classifier:
  """An exported classifier: uint8 images [n, S, S, 3] -> probabilities [n, C]."""

  def __init__(self, directory: str):
    import jax
    self.directory = os.path.abspath(directory)
    with open(os.path.join(self.directory, CARD_JSON)) as f:
      self.card = json.load(f)
    with open(os.path.join(self.directory, LABELS_FILE)) as f:
      self.class_names = [str(c) for c in json.load(f)]
    with open(os.path.join(self.directory, JAX_EXPORT_FILE), 'rb') as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    self.image_size = int(self.exported.in_avals[0].shape[1])
    pre = self.card.get('preprocessing', {})
    self.resize_size = int(pre.get('resize_size', 0) or 0)
    self.centre_crop = bool(pre.get('centre_crop', False))
    self._call = jax.jit(self.exported.call)  # Compiles once per batch size.

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'expected uint8 [n, {self.image_size}, {self.image_size}, 3], '
                       f'got {images.dtype} {list(images.shape)}')
    return np.asarray(self._call(images))

  def decode_image(self, data: bytes) -> np.ndarray:
    return decode_image(data, self.image_size, self.resize_size, self.centre_crop)


def load(directory: str) -> Classifier:
  """Opens an export directory; a missing or foreign one is a UserError."""
  if not directory or not os.path.isdir(directory):
    raise UserError(f'--exported: {directory!r} is not a directory')
  missing = [f for f in (JAX_EXPORT_FILE, LABELS_FILE, CARD_JSON)
             if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise UserError(f'--exported: {directory} lacks {", ".join(missing)} '
                    '(not written by scripts/export.py?)')
  try:
    return Classifier(directory)
  except (OSError, ValueError) as e:
    raise UserError(f'--exported: cannot read {directory}: {type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}') from None


def _check_header(data: bytes) -> None:
  """Refuses non-images and decompression bombs from the header alone."""
  from PIL import Image
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # We check below.
      with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
  except Image.DecompressionBombError:
    raise ImageError(f'image is over the limit of {MAX_PIXELS} pixels', too_large=True) from None
  except Exception:  # pylint: disable=broad-except
    raise ImageError('not a JPEG, PNG, GIF or BMP image') from None
  if width * height > MAX_PIXELS:
    raise ImageError(f'image of {width}x{height} pixels is over the limit of {MAX_PIXELS}',
                     too_large=True)


def resize_like_eval(tf: Any, image: Any, size: int, resize_size: int, centre_crop: bool) -> Any:
  """float32 HxWx3 -> float32 SxSx3: the eval branch of input_pipeline.make_preprocess."""
  if centre_crop and resize_size > size:
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(resize_size, tf.float32) / tf.minimum(h, w)
    new = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
    image = tf.image.resize(image, new, method='bilinear', antialias=True)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    return tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)
  return tf.image.resize(image, (size, size), antialias=True)


def decode_image(data: bytes, size: int, resize_size: int = 0,
                 centre_crop: bool = False) -> np.ndarray:
  """File bytes -> uint8 [size, size, 3], as evaluation saw the image (up to rounding)."""
  if not data:
    raise ImageError('empty image')
  _check_header(data)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.OpError, ValueError):
    raise ImageError('not a decodable JPEG, PNG, GIF or BMP image') from None
  if tuple(image.shape[:2]) == (size, size) and not (centre_crop and resize_size > size):
    return image.numpy()  # Resizing to its own size is the identity: skip the work.
  image = resize_like_eval(tf, tf.cast(image, tf.float32), size, resize_size, centre_crop)
  return np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8)


def top_k(probs: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
  """[(class name, probability), ...], most probable first."""
  order = np.argsort(-np.asarray(probs), kind='stable')[:max(0, min(k, len(class_names)))]
  return [(class_names[i], float(probs[i])) for i in order]
