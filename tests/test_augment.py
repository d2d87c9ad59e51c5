"""RandAugment and random erasing (resnet_jax/augment.py), and the grid of what the model sees."""

import os

import numpy as np
import pytest

from resnet_jax import augment, input_pipeline, train
from resnet_jax.errors import UserError
from tests.conftest import import_script, tiny_config


@pytest.fixture(scope='module')
def tf():
  return input_pipeline._tf()  # pylint: disable=protected-access


def _image(size=16):
  return np.random.default_rng(0).integers(0, 256, (size, size, 3)).astype(np.float32)


def test_every_operation_keeps_shape_and_range_and_those_with_a_magnitude_do_nothing_at_zero(tf):
  image = tf.constant(_image())
  no_magnitude = {'autocontrast', 'equalize'}   # Fixed operations: M does not apply.
  for i, name in enumerate(augment.OPS):
    for sign in (-1.0, 1.0):
      out = augment._apply_op(tf, tf.constant(i), image, 1.0, tf.constant(sign)).numpy()
      assert out.shape == (16, 16, 3) and out.dtype == np.float32, name
      assert 0.0 <= out.min() and out.max() <= 255.0, name
    zero = augment._apply_op(tf, tf.constant(i), image, 0.0, tf.constant(1.0)).numpy()
    if name not in no_magnitude:
      np.testing.assert_array_equal(zero, image.numpy(), err_msg=name)
  # At full magnitude the geometric and colour operations do change the image.
  for name in ('rotate', 'shear_x', 'translate_y', 'color', 'contrast', 'posterize', 'solarize'):
    out = augment._apply_op(tf, tf.constant(augment.OPS.index(name)), image, 1.0,
                            tf.constant(1.0)).numpy()
    assert not np.array_equal(out, image.numpy()), name


def test_randaugment_is_a_function_of_its_seed(tf):
  image = tf.constant(_image())
  run = lambda s: augment.randaugment(tf, image, 2, 9, tf.constant(s, tf.int64)).numpy()
  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  assert any(not np.array_equal(run([1, 2]), run([1, s])) for s in range(3, 8))


def test_random_erasing_erases_one_box_of_the_right_area_with_probability_p(tf):
  image = tf.zeros((16, 16, 3))
  erased, areas = 0, []
  for s in range(200):
    out = augment.random_erasing(tf, image, 0.5, tf.constant([s, 7], tf.int64)).numpy()
    changed = np.any(out != 0, axis=-1)
    if changed.any():
      erased += 1
      rows, cols = np.nonzero(changed)
      box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
      assert box.all()   # One rectangle.
      areas.append(changed.mean())
  assert 70 <= erased <= 130   # p = 0.5 of 200.
  assert min(areas) >= 0.01 and max(areas) <= 0.34 + 0.1


def test_training_data_stays_a_function_of_seed_and_step_with_both_on(image_folder):
  config = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': image_folder,
                          'dataset.eval_split': 'test', 'dataset.randaugment': '2,9',
                          'dataset.random_erasing': 0.5})
  data = input_pipeline.create_data(config)
  first = [next(data.train_iter(8, step))['image'] for step in (0, 1)]
  again = next(data.train_iter(8, 1))['image']
  np.testing.assert_array_equal(first[1], again)     # Resuming at step 1 sees step 1's batch.
  config.dataset.randaugment = ''
  config.dataset.random_erasing = 0.0
  plain = next(input_pipeline.create_data(config).train_iter(8, 1))['image']
  assert not np.array_equal(plain, again)


@pytest.mark.parametrize('field, value, message', [
    ('dataset.randaugment', '2', r"^config\.dataset\.randaugment: expected 'N,M'"),
    ('dataset.randaugment', '2,40', r'^config\.dataset\.randaugment: M \(magnitude\) must be'),
    ('dataset.randaugment', '0,9', r'^config\.dataset\.randaugment: N \(operations'),
    ('dataset.random_erasing', 1.5, r'^config\.dataset\.random_erasing: a probability'),
    ('dataset.on_device', True, r'^config\.dataset\.on_device: the device-resident split'),
])
def test_bad_augmentation_fields_are_one_line(field, value, message):
  config = tiny_config(**{'dataset.randaugment': '2,9', field: value})
  with pytest.raises(UserError, match=message):
    train.validate_config(config)


def test_the_grid_script_shows_the_training_batch(image_folder, tmp_path):
  script = import_script('augment_grid')
  config = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': image_folder,
                          'dataset.eval_split': 'test', 'dataset.randaugment': '1,5'})
  picture = script.grid(config, 2, 3)
  assert picture.shape == (2 * 8, 3 * 8, 3) and picture.dtype == np.uint8
  batch = next(input_pipeline.create_data(config).train_iter(8, 0))['image'][:6]
  shown = np.clip(batch * np.asarray(config.dataset.std) * 255 + np.asarray(
      config.dataset.mean) * 255, 0, 255).round().astype(np.uint8)
  np.testing.assert_array_equal(picture[:8, 8:16], shown[1])
  np.testing.assert_array_equal(picture[8:16, :8], shown[3])
  with pytest.raises(UserError, match='--rows/--cols: 600 images asked for'):
    script.grid(config, 20, 30)
