"""Device-resident data and prefetching."""

import jax
import numpy as np
import pytest

from resnet_jax import device_data, input_pipeline, parallel, train
from resnet_jax.errors import UserError


def _dataset(folder_config, **kw):
  for k, v in kw.items():
    folder_config.dataset[k] = v
  data = input_pipeline.create_data(folder_config)
  images = input_pipeline.to_uint8_images(data.train_source, 8)
  par = parallel.Parallel('jit', jax.devices()[:4])
  return data, device_data.DeviceDataset(images, data.train_source.labels, folder_config, par)


def test_device_batches_follow_the_host_order_and_resume(folder_config):
  data, ds = _dataset(folder_config)
  it = ds.iterate(8)
  batches = [next(it) for _ in range(6)]
  host = data.train_iter(8)
  for b in batches:
    np.testing.assert_array_equal(np.asarray(b['label']), next(host)['label'])
    assert b['image'].shape == (8, 8, 8, 3) and len(b['image'].sharding.device_set) == 4
  resumed = ds.iterate(8, start_step=4)
  for step in (4, 5):
    np.testing.assert_array_equal(np.asarray(next(resumed)['image']),
                                  np.asarray(batches[step]['image']))


def test_device_augmentation_crops_and_flips(folder_config):
  _, plain = _dataset(folder_config, augment='none', flip=False)
  _, aug = _dataset(folder_config, augment='pad_crop', flip=True)
  a, b = next(plain.iterate(8)), next(aug.iterate(8))
  np.testing.assert_array_equal(np.asarray(a['label']), np.asarray(b['label']))
  assert not np.allclose(np.asarray(a['image']), np.asarray(b['image']))
  # Unaugmented device images are the stored pixels, normalised.
  mean = np.asarray(folder_config.dataset.mean) * 255
  std = np.asarray(folder_config.dataset.std) * 255
  raw = np.asarray(a['image']) * std + mean
  np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)


def test_on_device_training_end_to_end(folder_config, tmp_path):
  folder_config.dataset.on_device = True
  results = train.train_and_evaluate(folder_config, str(tmp_path / 'wd'))
  assert results['step'] == 4 and results['num_examples'] == 15


def test_on_device_needs_jit(folder_config):
  data = input_pipeline.create_data(folder_config)
  images = input_pipeline.to_uint8_images(data.train_source, 8)
  with pytest.raises(UserError, match='parallelism=jit'):
    device_data.DeviceDataset(images, data.train_source.labels, folder_config,
                              parallel.Parallel('pmap'))


def test_prefetch_keeps_order_and_yields_everything():
  par = parallel.Parallel('jit', jax.devices()[:1])
  batches = [{'x': np.full((2,), i, np.float32)} for i in range(5)]
  out = [int(b['x'][0]) for b in device_data.prefetch_to_device(par, iter(batches), 2)]
  assert out == [0, 1, 2, 3, 4]


def test_device_images_are_the_pixels_the_host_pipeline_decodes(folder_config):
  """to_uint8_images uses the training decoder: PIL decodes these JPEGs differently."""
  folder_config.dataset.image_size = 12          # The files' size: no resize anywhere.
  data = input_pipeline.create_data(folder_config)
  device = input_pipeline.to_uint8_images(data.eval_source, 12)
  host = np.concatenate([b['image'][b['mask'] > 0] for b in data.eval_iter(8)])
  mean = np.asarray(folder_config.dataset.mean) * 255
  std = np.asarray(folder_config.dataset.std) * 255
  assert device.shape == host.shape == (15, 12, 12, 3) and device.dtype == np.uint8
  np.testing.assert_allclose(device, host * std + mean, atol=1e-3)


@pytest.mark.parametrize('augment,size,ok', [('auto', 8, True), ('auto', 72, False),
                                             ('pad_crop', 72, True),
                                             ('random_resized_crop', 8, False)])
def test_on_device_resolves_auto_augment_like_the_host(folder_config, augment, size, ok):
  """'auto' is pad_crop only up to 64 px; above, the host resize-crops, which the device can't."""
  folder_config.dataset.augment = augment
  folder_config.dataset.image_size = size
  par = parallel.Parallel('jit', jax.devices()[:1])
  images, labels = np.zeros((8, size, size, 3), np.uint8), np.zeros((8,), np.int32)
  if ok:
    device_data.DeviceDataset(images, labels, folder_config, par)
  else:
    with pytest.raises(UserError, match='config.dataset.on_device: .*random_resized_crop'):
      device_data.DeviceDataset(images, labels, folder_config, par)
