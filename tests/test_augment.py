"""RandAugment and random erasing (resnet_jax/augment.py), and the grid of what the model sees."""

import math
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from resnet_jax import augment, device_data, input_pipeline, parallel, preprocess, train
from resnet_jax.errors import UserError
from tests.conftest import REPO, import_script, tiny_config

FILL = (125, 123, 114)


@pytest.fixture(scope='module')
def tf():
  return input_pipeline._tf()  # pylint: disable=protected-access


def _pil_reference(name, image, level, sign):
  """timm's rand_augment_ops ('increasing' ranges, M = 10 * level): the PIL calls it makes."""
  pil, (h, w) = Image.fromarray(image), image.shape[:2]
  factor = max(0.1, 1 + sign * 0.9 * level)
  affine = lambda c: pil.transform(pil.size, Image.AFFINE, c, Image.NEAREST, fillcolor=FILL)
  return np.asarray({
      'identity': lambda: pil,
      'autocontrast': lambda: ImageOps.autocontrast(pil),
      'equalize': lambda: ImageOps.equalize(pil),
      'rotate': lambda: pil.rotate(sign * level * 30, resample=Image.NEAREST, fillcolor=FILL),
      'solarize': lambda: ImageOps.solarize(pil, 256 - int(min(level, 1) * 256)),
      'color': lambda: ImageEnhance.Color(pil).enhance(factor),
      'posterize': lambda: ImageOps.posterize(pil, 8 - int(min(level, 1) * 4)),
      'contrast': lambda: ImageEnhance.Contrast(pil).enhance(factor),
      'brightness': lambda: ImageEnhance.Brightness(pil).enhance(factor),
      'sharpness': lambda: ImageEnhance.Sharpness(pil).enhance(factor),
      'shear_x': lambda: affine((1, sign * level * 0.3, 0, 0, 1, 0)),
      'shear_y': lambda: affine((1, 0, 0, sign * level * 0.3, 1, 0)),
      'translate_x': lambda: affine((1, 0, sign * level * 0.45 * w, 0, 1, 0)),
      'translate_y': lambda: affine((1, 0, 0, 0, 1, sign * level * 0.45 * h)),
  }[name]()).astype(np.float32)


def test_every_operation_is_pils_keeps_shape_dtype_range_and_is_the_identity_at_zero(tf):
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (24, 21, 3))   # Over 255 pixels, or equalize does nothing.
  dull = 100 + noise // 6   # Low contrast: equalize and autocontrast change it.
  for image in (noise.astype(np.uint8), dull.astype(np.uint8)):
    x = tf.constant(image.astype(np.float32))
    for i, name in enumerate(augment.OPS):
      for level, sign in ((0.0, 1.0), (0.5, -1.0), (0.9, 1.0), (1.7, -1.0), (2.3, 1.0)):
        out = augment._apply_op(tf, tf.constant(i), x, level, tf.constant(sign), FILL).numpy()
        assert out.shape == image.shape and out.dtype == np.float32, name
        assert np.array_equal(out, np.clip(np.round(out), 0, 255)), name  # uint8 values.
        ref = _pil_reference(name, image, level, sign)
        # PIL maps pixels in 16.16 fixed point and settles ties (a centre mapped exactly onto
        # a pixel edge) its own way; the levels avoid round angles and shears, which make
        # many ties, but a rotation can still meet one or two.
        allowed = 2 if name == 'rotate' else 0
        assert np.sum(np.any(out != ref, -1)) <= allowed, (name, level, sign)
        if level == 0 and name not in ('autocontrast', 'equalize'):  # No magnitude.
          np.testing.assert_array_equal(out, image, err_msg=name)
        if level == 0.9 and name != 'identity' and image.max() < 150:
          assert not np.array_equal(out, image), name


def test_randaugment_is_a_function_of_seed_and_example_counter(tf):
  config_ds = tiny_config(**{'dataset.randaugment': '3,9'}).dataset
  fn = preprocess.make_preprocess(config_ds, train=True)
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8))
  run = lambda seed, counter: fn(image, tf.constant([seed, counter], tf.int64)).numpy()
  np.testing.assert_array_equal(run(0, 5), run(0, 5))
  assert not np.array_equal(run(0, 5), run(0, 6))
  assert not np.array_equal(run(0, 5), run(1, 5))
  # Erasing that never fires switches the later stream on: crop and flip draw as before.
  config_ds.randaugment, config_ds.random_erasing = '', 1e-12
  quiet = preprocess.make_preprocess(config_ds, train=True)
  config_ds.random_erasing = 0.0
  plain = preprocess.make_preprocess(config_ds, train=True)
  for counter in range(4):
    seed = tf.constant([0, counter], tf.int64)
    np.testing.assert_array_equal(quiet(image, seed).numpy(), plain(image, seed).numpy())


def test_random_erasing_erases_one_box_of_timms_area_and_aspect_with_probability_p(tf):
  size, trials = 16, 300
  image = tf.zeros((size, size, 3))
  erased, areas, values = 0, [], []
  for s in range(trials):
    out = augment.random_erasing(tf, image, 0.5, tf.constant([s, 7], tf.int64)).numpy()
    changed = np.any(out != 0, axis=-1)
    if not changed.any():
      continue
    erased += 1
    rows, cols = np.nonzero(changed)
    h, w = rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()
    assert changed.sum() == h * w and h < size and w < size  # One box, fitted, not clipped.
    # Some area A in [2%, 1/3] and ratio r in [0.3, 3.3] round to this box's sides.
    area_lo, area_hi = (h - 0.5) * (w - 0.5), (h + 0.5) * (w + 0.5)
    assert area_lo <= size * size / 3 and area_hi >= 0.02 * size * size, (h, w)
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3, (h, w)
    areas.append(h * w / size**2)
    values.append(out[changed])
  assert abs(erased - trials / 2) <= 4 * math.sqrt(trials / 4)   # Binomial(300, 0.5).
  assert min(areas) < 0.08 and max(areas) > 0.25                 # The range is used.
  values = np.concatenate(values)
  assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1   # N(0, 1), per pixel.
  assert len(np.unique(values)) > 0.99 * values.size
  # p = 0 never erases, p = 1 always does.
  for p, expected in ((0.0, False), (1.0, True)):
    outs = [augment.random_erasing(tf, image, p, tf.constant([s, 3], tf.int64)).numpy()
            for s in range(20)]
    assert all(np.any(o != 0) == expected for o in outs)


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
    ('dataset.randaugment', '2,9,1', r"^config\.dataset\.randaugment: expected 'N,M'"),
    ('dataset.randaugment', 'two,9', r"^config\.dataset\.randaugment: expected 'N,M'"),
    ('dataset.randaugment', '2,40', r'^config\.dataset\.randaugment: M \(magnitude\) must be'),
    ('dataset.randaugment', '2,-1', r'^config\.dataset\.randaugment: M \(magnitude\) must be'),
    ('dataset.randaugment', '2,nan', r'^config\.dataset\.randaugment: M \(magnitude\) must be'),
    ('dataset.randaugment', '0,9', r'^config\.dataset\.randaugment: N \(operations'),
    ('dataset.random_erasing', 1.5, r'^config\.dataset\.random_erasing: a probability'),
    ('dataset.random_erasing', -0.1, r'^config\.dataset\.random_erasing: a probability'),
    ('dataset.random_erasing', float('nan'), r'^config\.dataset\.random_erasing: a probability'),
    ('dataset.on_device', True, r'^config\.dataset\.on_device: the device-resident split'),
])
def test_bad_augmentation_fields_are_one_line(field, value, message):
  overrides = {field: value}
  if field == 'dataset.on_device':
    overrides['dataset.randaugment'] = '2,9'
  with pytest.raises(UserError, match=message) as error:
    train.validate_config(tiny_config(**overrides))
  assert '\n' not in str(error.value)


def test_the_grid_script_shows_the_training_batches(image_folder, tmp_path):
  script = import_script('augment_grid')
  config = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': image_folder,
                          'dataset.eval_split': 'test', 'dataset.randaugment': '1,5',
                          'dataset.random_erasing': 0.5})
  # 12 images: step 1's batch of 8, then 4 of step 2's.
  picture = script.grid(config, 3, 4, step=1)
  assert picture.shape == (3 * 8, 4 * 8, 3) and picture.dtype == np.uint8
  data = input_pipeline.create_data(config)
  batches = data.train_iter(8, 1)
  batch = np.concatenate([next(batches)['image'], next(batches)['image']])[:12]
  shown = np.clip(batch * np.asarray(config.dataset.std) * 255 + np.asarray(
      config.dataset.mean) * 255, 0, 255).round().astype(np.uint8)
  np.testing.assert_array_equal(picture[:8, 8:16], shown[1])
  np.testing.assert_array_equal(picture[16:24, 24:32], shown[11])
  with pytest.raises(UserError, match=r'^--rows/--cols: 1 to 1024 images, got 40x30'):
    script.grid(config, 40, 30)
  # A device-resident split: the grid shows the device's crops and flips.
  config.dataset.randaugment, config.dataset.random_erasing = '', 0.0
  config.dataset.on_device = True
  par = parallel.Parallel('jit')
  device = device_data.DeviceDataset(input_pipeline.to_uint8_images(data.train_source, 8),
                                     data.train_source.labels, config, par)
  first = np.asarray(next(device.iterate(8, 2))['image'])[:4]
  shown = np.clip(first * np.asarray(config.dataset.std) * 255 + np.asarray(
      config.dataset.mean) * 255, 0, 255).round().astype(np.uint8)
  np.testing.assert_array_equal(script.grid(config, 1, 4, step=2), np.concatenate(shown, 1))


def test_the_grid_script_writes_a_png_from_the_command_line(image_folder, tmp_path, capsys,
                                                            monkeypatch):
  script = import_script('augment_grid')
  out = str(tmp_path / 'grid.png')
  argv = ['augment_grid', f'--config={os.path.join(REPO, "configs", "default.py")}',
          '--config.dataset.name=image_folder', f'--config.dataset.data_dir={image_folder}',
          '--config.dataset.eval_split=test', '--config.dataset.image_size=8',
          '--config.batch_size=8', '--config.dataset.randaugment=2,9', f'--out={out}',
          '--rows=2', '--cols=3']
  try:
    monkeypatch.setattr(sys, 'argv', argv)   # config_flags reads its overrides there.
    script.FLAGS(argv)
    script.main([argv[0]])
    with Image.open(out) as png:
      assert png.format == 'PNG' and png.size == (3 * 8, 2 * 8)
    script.FLAGS.unparse_flags()
    # The --config.x flags exist now: a second parse may not define them again.
    argv = argv[:2] + [f'--out={tmp_path}/missing/grid.png']
    monkeypatch.setattr(sys, 'argv', argv)
    script.FLAGS(argv)
    with pytest.raises(SystemExit) as exit_:
      script.main([argv[0]])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message == f'error: --out: folder {tmp_path}/missing does not exist'
  finally:
    script.FLAGS.unparse_flags()
