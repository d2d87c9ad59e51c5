"""Feeding the devices: prefetch, and datasets that live on the device.

`prefetch_to_device` keeps a few host batches in flight, so the transfer of
batch t+1 overlaps the step on batch t.

`DeviceDataset` is for training splits that fit in device memory (CIFAR,
MNIST): the whole split is uploaded once as uint8, and each step gathers its
examples and pad-crops, flips and normalises them in a jitted JAX function, so
the host does nothing per step but compute indices. The order is the same
(seed, epoch) permutation the host pipeline uses; the augmentation is keyed by
(seed, global example counter) with JAX's RNG, so it is a function of
(seed, step) too (though not the same draws as tf.data's).
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError
# Pure Python and numpy; neither imports TensorFlow.
from resnet_jax.input_pipeline import _train_indices, augment_kind
from resnet_jax.preprocess import pixel_norm
from resnet_jax.parallel import Parallel


def prefetch_to_device(par: Parallel, batches: Iterator[dict[str, np.ndarray]],
                       size: int = 2) -> Iterator[Any]:
  """Puts up to `size` batches on the devices ahead of their use."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(par.put_batch(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def normalise(images: jax.Array, norm: tuple[np.ndarray, np.ndarray] | None) -> jax.Array:
  """uint8 pixels -> the model's float32 input, (x - mean) * (1 / std); others as they are.

  `norm` is `preprocess.pixel_norm`'s. The host pipeline sends uint8 batches (a
  quarter of float32's bytes) and the jitted steps call this first, so
  normalising runs on the device, fused with the first convolution. It is the
  host's float32 arithmetic (a subtraction and a multiplication, each exactly
  rounded; XLA:CPU's division is not), so the values are the same bits.
  """
  if norm is None or images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) - norm[0]) * norm[1]


def _augment_one(image: jax.Array, key: jax.Array, pad: int, flip: bool) -> jax.Array:
  h, w, _ = image.shape
  if pad:
    ky, kx, key = jax.random.split(key, 3)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(ky, (), 0, 2 * pad + 1)
    dx = jax.random.randint(kx, (), 0, 2 * pad + 1)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[-1]))
  if flip:
    image = jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)
  return image


def check_augment(config_ds: Any) -> str:
  """The augmentation a device dataset will apply: pad_crop or none, resolved like the host's.

  'auto' means what it means on the host (pad_crop up to 64 px, random_resized_crop
  above), so the device never pad-crops where the host would resize-crop.
  """
  kind = augment_kind(config_ds)
  if kind not in ('pad_crop', 'none'):
    named = config_ds.get('augment', 'auto')
    means = f' (at image_size {int(config_ds.image_size)} that means {kind})' \
        if named != kind else ''
    raise UserError(f'config.dataset.on_device: supports augment pad_crop or none, not '
                    f'{named!r}{means}; set config.dataset.augment=pad_crop or on_device=False')
  return kind


class DeviceDataset:
  """A training split held on every device as uint8, batched and augmented there."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, config: Any, par: Parallel):
    if par.mode != 'jit':
      raise UserError('config.dataset.on_device: needs parallelism=jit')
    cds = config.dataset
    augment = check_augment(cds)
    size = int(cds.image_size)
    if images.shape[1:] != (size, size, 3):
      raise UserError(f'config.dataset.on_device: images are {images.shape[1:]}, expected '
                      f'{(size, size, 3)}')
    self.n = len(labels)
    self.seed = int(config.seed)
    self.par = par
    self.images = jax.device_put(images, par.replicated)
    self.labels = jax.device_put(labels.astype(np.int32), par.replicated)
    pad = int(cds.get('crop_padding', 4)) if augment == 'pad_crop' else 0
    flip = bool(cds.get('flip', True))
    norm = pixel_norm(cds)
    base_key = jax.random.key(self.seed)

    def make_batch(images, labels, idx, counters):
      keys = jax.vmap(lambda c: jax.random.fold_in(base_key, c))(counters)
      picked = jnp.take(images, idx, axis=0)
      picked = jax.vmap(lambda im, k: _augment_one(im, k, pad, flip))(picked, keys)
      return {'image': normalise(picked, norm), 'label': jnp.take(labels, idx, axis=0)}

    self._make = jax.jit(make_batch, out_shardings=par.batch_sharding)

  def iterate(self, global_batch: int, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Global batches from `start_step` on (every process computes the same indices)."""
    for idx, counters in _train_indices(self.seed, self.n, global_batch, start_step, 0, 1):
      yield self._make(self.images, self.labels, jax.device_put(idx, self.par.replicated),
                       jax.device_put(counters, self.par.replicated))
