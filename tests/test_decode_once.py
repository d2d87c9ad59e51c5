"""Image folders of equal-sized files are decoded once and read from memory."""

import os

import numpy as np
from PIL import Image

from resnet_jax import input_pipeline


def _batches(config, n=4):
  data = input_pipeline.create_data(config)
  train = data.train_iter(4, start_step=2)
  return data, [next(train) for _ in range(n)] + list(data.eval_iter(4))


def test_decoding_once_feeds_the_same_pixels_as_reading_the_files(folder_config, monkeypatch):
  reads = []
  original = input_pipeline.decoded_once
  monkeypatch.setattr(input_pipeline, 'decoded_once',
                      lambda source, *a: reads.append(len(source)) or original(source, *a))
  data, once = _batches(folder_config)
  assert data._readable('train').images is not None   # In memory.
  assert data._readable('eval').images is not None
  assert reads == [30, 15]                           # Each split decoded once.
  folder_config.dataset.decode_once = False
  data, files = _batches(folder_config)
  assert data._readable('train').paths is not None
  assert len(once) == len(files)
  for a, b in zip(once, files):
    for key in b:
      np.testing.assert_array_equal(a[key], b[key])


def test_files_of_mixed_sizes_or_too_many_bytes_keep_being_read(folder_config):
  root = folder_config.dataset.data_dir
  odd = os.path.join(root, 'train', 'cat', '0002.png')
  Image.fromarray(np.full((10, 14, 3), 7, np.uint8)).save(odd)
  data = input_pipeline.create_data(folder_config)
  assert data._readable('train').paths is not None          # Mixed sizes: files.
  assert data._readable('eval').images is not None          # Equal sizes: memory.
  assert next(data.train_iter(4))['image'].shape == (4, 8, 8, 3)
  source = data.eval_source
  assert input_pipeline.decoded_once(source, limit=12 * 12 * 3 * 15 - 1) is source
  assert input_pipeline.decoded_once(source, limit=12 * 12 * 3 * 15).images.shape == (
      15, 12, 12, 3)
