"""Image folders, TFDS (mocked), split slices, determinism, and counting every eval example."""

import logging
import os

import numpy as np
import pytest

from resnet_jax import input_pipeline as ip
from resnet_jax.errors import UserError
from tests.conftest import CLASSES, tiny_config, write_image_folder


def test_image_folder_classes_sorted_and_split_sliced_per_class(image_folder, folder_config):
  folder_config.dataset.train_split = 'train[:60%]'
  folder_config.dataset.eval_split = 'train[60%:]'
  data = ip.create_data(folder_config)
  assert data.info.class_names == sorted(CLASSES)
  assert data.info.num_train == 18 and data.info.num_eval == 12   # 6 + 4 of 10 per class.
  train_files = set(data.train_source.paths)
  eval_files = set(data.eval_source.paths)
  assert not train_files & eval_files
  for label, cls in enumerate(sorted(CLASSES)):
    picked = [p for p, l in zip(data.train_source.paths, data.train_source.labels) if l == label]
    assert all(os.sep + cls + os.sep in p for p in picked) and len(picked) == 6


def test_split_parser():
  assert ip.parse_split('f', 'train[:90%]') == ('train', '', '90%')
  assert ip.apply_slice(list(range(10)), '-3', '') == [7, 8, 9]
  with pytest.raises(UserError, match='cannot parse split'):
    ip.parse_split('config.dataset.train_split', 'train[::2]')


def test_batches_are_normalised_rgb_and_grayscale_becomes_three_channels(folder_config):
  folder_config.dataset.augment = 'none'
  folder_config.dataset.flip = False
  data = ip.create_data(folder_config)
  # The first file of each class is a grayscale PNG; it must come out with 3 equal channels.
  gray = [i for i, p in enumerate(data.eval_source.paths) if p.endswith('0000.png')]
  batches = list(data.eval_iter(15))
  images = np.concatenate([b['image'] for b in batches])
  assert images.shape[1:] == (8, 8, 3) and images.dtype == np.float32
  mean = np.asarray(folder_config.dataset.mean) * 255
  std = np.asarray(folder_config.dataset.std) * 255
  raw = images[gray[0]] * std + mean
  np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-3)


@pytest.mark.parametrize('n_eval,batch', [(15, 4), (15, 5), (15, 32)])
def test_eval_counts_every_example_once(tmp_path, n_eval, batch):
  root = write_image_folder(str(tmp_path), splits=(('train', 4), ('test', n_eval // 3)))
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': root})
  data = ip.create_data(c)
  seen = []
  for b in data.eval_iter(batch):
    assert b['image'].shape[0] == batch and b['mask'].shape == (batch,)
    seen += list(b['label'][b['mask'] > 0])
  assert len(seen) == n_eval
  np.testing.assert_array_equal(seen, data.eval_source.labels)


def _identities(batches):
  """Each real example as (label, its image's bytes): noise images are all distinct."""
  return [(int(l), im.tobytes()) for b in batches
          for im, l, m in zip(b['image'], b['label'], b['mask']) if m]


def test_eval_shards_cover_the_split_once_across_processes(folder_config):
  data = ip.create_data(folder_config)
  whole = _identities(data.eval_iter(4))
  assert len(set(whole)) == len(whole) == data.info.num_eval == 15
  counts, shards = [], []
  for pid in range(3):
    batches = list(data.eval_iter(2, process_index=pid, process_count=3))
    counts.append(len(batches))
    shards += _identities(batches)
  assert len(set(counts)) == 1        # Equal batch counts, so collectives line up.
  assert sorted(shards) == sorted(whole)   # Every example once: none twice, none missing.


def test_training_data_is_a_function_of_seed_and_step(folder_config):
  data = ip.create_data(folder_config)
  # 30 images in batches of 4: 7 steps per epoch. Resume in the middle of the
  # first and the second epoch, and run on across the next epoch boundary.
  full = [next(it) for it in [data.train_iter(4, 0)] for _ in range(17)]
  for start in (3, 10):
    resumed = data.train_iter(4, start_step=start)
    for step in range(start, start + 7):
      b = next(resumed)
      np.testing.assert_array_equal(b['label'], full[step]['label'], err_msg=f'{start} {step}')
      np.testing.assert_array_equal(b['image'], full[step]['image'], err_msg=f'{start} {step}')
  # Another seed gives another order.
  folder_config.seed = 1
  other = next(ip.create_data(folder_config).train_iter(4, 0))
  assert not np.array_equal(other['image'], full[0]['image'])


def test_each_epoch_is_a_permutation_and_processes_take_disjoint_parts():
  gen = ip._train_indices(0, 10, 2, 0, 0, 1)
  first_epoch = np.concatenate([next(gen)[0] for _ in range(5)])
  second_epoch = np.concatenate([next(gen)[0] for _ in range(5)])
  assert sorted(second_epoch) == list(range(10))
  assert not np.array_equal(first_epoch, second_epoch)
  assert sorted(first_epoch) == list(range(10))
  a = ip._train_indices(0, 12, 2, 0, 0, 2)
  b = ip._train_indices(0, 12, 2, 0, 1, 2)
  for _ in range(3):
    ia, ca = next(a)
    ib, cb = next(b)
    assert not set(ia) & set(ib) and not set(ca) & set(cb)


def test_unreadable_image_is_skipped_with_a_warning_or_is_an_error(folder_config, caplog):
  bad = os.path.join(folder_config.dataset.data_dir, 'train', 'cat', '0099.jpg')
  with open(bad, 'wb') as f:
    f.write(b'not a jpeg at all')
  with caplog.at_level(logging.WARNING):
    data = ip.create_data(folder_config)
  assert bad not in set(data.train_source.paths) and data.info.num_train == 30
  assert any(bad in r.getMessage() for r in caplog.records)
  folder_config.dataset.on_bad_image = 'error'
  with pytest.raises(UserError, match='0099.jpg'):
    ip.create_data(folder_config)


@pytest.mark.parametrize('field,value,message', [
    ('dataset.data_dir', '/nonexistent/images', 'does not exist'),
    ('dataset.train_split', 'validation', 'does not exist'),
    ('dataset.classes', 'cat,zebra', 'zebra'),
    ('dataset.augment', 'mixup', 'unknown augmentation'),
    ('dataset.image_size', 0, 'must be positive'),
])
def test_bad_dataset_settings_are_user_errors(folder_config, field, value, message):
  section, key = field.split('.')
  folder_config[section][key] = value
  with pytest.raises(UserError, match=message):
    ip.create_data(folder_config)


def test_class_subset_relabels_in_sorted_order(folder_config):
  folder_config.dataset.classes = 'frog,cat'
  data = ip.create_data(folder_config)
  assert data.info.class_names == ['cat', 'frog'] and data.info.num_classes == 2
  assert set(data.train_source.labels) == {0, 1}


def test_tfds_by_name_on_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  c = tiny_config(**{'dataset.name': 'mnist', 'dataset.data_dir': str(tmp_path),
                     'dataset.eval_split': 'test'})
  with tfds.testing.mock_data(num_examples=21):
    data = ip.create_data(c)
    assert data.info.num_classes == 10 and data.info.num_eval == 21
    b = next(data.train_iter(4))
    assert b['image'].shape == (4, 8, 8, 3)        # Grayscale digits come out as RGB.
    assert sum(int(x['mask'].sum()) for x in data.eval_iter(4)) == 21


def test_unknown_tfds_dataset_is_a_user_error(tmp_path):
  c = tiny_config(**{'dataset.name': 'no_such_dataset_xyz', 'dataset.data_dir': str(tmp_path)})
  with pytest.raises(UserError, match='unknown dataset'):
    ip.create_data(c)


def test_streaming_tfds_is_deterministic_resumable_and_counts_eval_once(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  c = tiny_config(**{'dataset.name': 'cifar10', 'dataset.data_dir': str(tmp_path),
                     'dataset.in_memory': 'never', 'dataset.shuffle_buffer': 64})
  with tfds.testing.mock_data(num_examples=23):
    data = ip.create_data(c)
    assert isinstance(data.train_source, ip.StreamSource) and data.info.num_eval == 23
    it = data.train_iter(4)
    full = [next(it) for _ in range(10)]
    # 23 records: step 3 starts at record 12 and step 7 at record 28, both mid-pass,
    # and both run on past the end of a pass over the records.
    for start in (3, 7):
      resumed = data.train_iter(4, start_step=start)
      for step in range(start, 10):
        b = next(resumed)
        np.testing.assert_array_equal(b['label'], full[step]['label'])
        np.testing.assert_array_equal(b['image'], full[step]['image'])
    assert sum(int(b['mask'].sum()) for b in data.eval_iter(5)) == 23


def _image_bytes(fmt, size=12, seed=0):
  import io
  from PIL import Image
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, fmt)
  return buf.getvalue()


def test_verification_uses_the_training_decoder(folder_config, caplog):
  """A TIFF named .jpg opens in PIL but not in tf.io.decode_image: it must not reach training."""
  cat = os.path.join(folder_config.dataset.data_dir, 'train', 'cat')
  tiff, bmp = os.path.join(cat, '0098.jpg'), os.path.join(cat, '0099.jpg')
  with open(tiff, 'wb') as f:
    f.write(_image_bytes('TIFF'))
  with open(bmp, 'wb') as f:
    f.write(_image_bytes('BMP'))       # Decodes in training too, so it is kept.
  with caplog.at_level(logging.WARNING):
    data = ip.create_data(folder_config)
  paths = set(data.train_source.paths)
  assert tiff not in paths and bmp in paths and data.info.num_train == 31
  named = [r.getMessage() for r in caplog.records if tiff in r.getMessage()]
  assert len(named) == 1 and 'Unknown image file format' in named[0]
  assert '{{' not in named[0] and '[Op:' not in named[0]       # TF's wrapping is cut.
  # Every file that reached training decodes: a whole epoch and more runs.
  it = data.train_iter(4)
  for _ in range(9):
    assert next(it)['image'].shape == (4, 8, 8, 3)
  folder_config.dataset.on_bad_image = 'error'
  with pytest.raises(UserError, match='0098.jpg'):
    ip.create_data(folder_config)


@pytest.mark.parametrize('fmt', ['BMP', 'WEBP', 'GIF'])
def test_the_training_decoder_reads_bmp_webp_and_gif(fmt):
  """What IMAGE_EXTENSIONS promises (and why .gif, first frame only, is left out)."""
  tf = ip._tf()
  image = ip._decode(tf, tf.constant(_image_bytes(fmt)))
  assert tuple(image.shape) == (12, 12, 3)


def test_bmp_and_webp_files_are_training_images(folder_config):
  cat = os.path.join(folder_config.dataset.data_dir, 'train', 'cat')
  for name, fmt in (('a.bmp', 'BMP'), ('b.WEBP', 'WEBP')):
    with open(os.path.join(cat, name), 'wb') as f:
      f.write(_image_bytes(fmt))
  data = ip.create_data(folder_config)
  names = {os.path.basename(p) for p in data.train_source.paths}
  assert {'a.bmp', 'b.WEBP'} <= names and data.info.num_train == 32


def test_files_skipped_for_extension_or_depth_are_counted_in_one_warning(folder_config, caplog):
  root = folder_config.dataset.data_dir
  extra = ['train/cat/anim.gif', 'train/cat/notes.txt', 'train/dog/scan.tiff',
           'train/stray.jpg', 'train/frog/more/0000.jpg', 'train/frog/more/deep/1.png']
  for rel in extra:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    with open(os.path.join(root, rel), 'wb') as f:
      f.write(_image_bytes('PNG'))
  with open(os.path.join(root, 'train', 'cat', '.DS_Store'), 'wb') as f:
    f.write(b'hidden files are not images and not worth a word')
  folder_config.dataset.train_split = 'train[:50%]'     # Two slices of one folder split:
  folder_config.dataset.eval_split = 'train[50%:]'      # still one warning.
  with caplog.at_level(logging.WARNING):
    data = ip.create_data(folder_config)
  warnings = [r.getMessage() for r in caplog.records if 'ignored' in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert 'ignored 6 files' in warnings[0]
  assert '3 for their extension (1 .gif, 1 .tiff, 1 .txt' in warnings[0]
  assert '3 for their depth' in warnings[0]
  assert data.info.num_train + data.info.num_eval == 30    # None of them was used.
  # Two split folders: still one warning, counting the files of both.
  with open(os.path.join(root, 'test', 'README'), 'w') as f:
    f.write('a file directly in a split folder')
  folder_config.dataset.train_split, folder_config.dataset.eval_split = 'train', 'test'
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    ip.create_data(folder_config)
  warnings = [r.getMessage() for r in caplog.records if 'ignored' in r.getMessage()]
  assert len(warnings) == 1 and 'ignored 7 files' in warnings[0], warnings
  assert '4 for their depth' in warnings[0]


def test_a_single_class_is_an_error(tmp_path, folder_config):
  folder_config.dataset.classes = 'cat'
  with pytest.raises(UserError, match='config.dataset.classes: .*only 1 class'):
    ip.create_data(folder_config)
  root = write_image_folder(str(tmp_path / 'one'), classes=('cat',))
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': root,
                     'dataset.eval_split': 'test'})
  with pytest.raises(UserError, match='config.dataset.data_dir: .*only 1 class'):
    ip.create_data(c)


@pytest.mark.parametrize('train_split,eval_split,shared', [
    ('train[:60%]', 'train[50%:]', 3),     # One image per class in both.
    ('train', 'train', 30),
    ('train[:60%]', 'train[60%:]', 0),
    ('train', 'test', 0),
])
def test_overlapping_train_and_eval_slices_warn(folder_config, caplog, train_split, eval_split,
                                                shared):
  folder_config.dataset.train_split = train_split
  folder_config.dataset.eval_split = eval_split
  with caplog.at_level(logging.WARNING):
    data = ip.create_data(folder_config)
  assert len(set(data.train_source.paths) & set(data.eval_source.paths)) == shared
  warnings = [r.getMessage() for r in caplog.records if 'also training' in r.getMessage()]
  if shared:
    assert len(warnings) == 1 and f'{shared} of the {data.info.num_eval} eval' in warnings[0]
    assert train_split in warnings[0] and eval_split in warnings[0]
  else:
    assert not warnings


@pytest.fixture(scope='module')
def tiny_stream_dir(tmp_path_factory):
  """A real prepared TFDS dataset (mock_data ignores split slices and file order):
  60 training records of 8x8 noise in 4 files, 9 eval records."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class ResnetJaxTinyStream(tfds.core.GeneratorBasedBuilder):  # Registers itself by this name.
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(8, 8, 3)),
          'label': tfds.features.ClassLabel(names=list(CLASSES))}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(60, 0), 'test': self._generate_examples(9, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {'image': rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 'label': i % 3}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  ResnetJaxTinyStream(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=4))
  return data_dir


def test_streaming_resume_reads_at_most_one_epoch_and_processes_read_disjoint_parts(
    tiny_stream_dir):
  """Resuming at step 43 (epoch 2 of 15-step epochs) reads only epoch 2's records, where the
  old endless stream skipped all 172 records since step 0; the data stay a function of
  (seed, step); two processes read disjoint parts."""
  import tensorflow as tf
  c = tiny_config(**{'dataset.name': 'resnet_jax_tiny_stream', 'dataset.data_dir': tiny_stream_dir,
                     'dataset.eval_split': 'test', 'dataset.in_memory': 'never',
                     'dataset.shuffle_buffer': 8})
  data = ip.create_data(c)
  assert isinstance(data.train_source, ip.StreamSource) and data.info.num_train == 60
  reads = tf.Variable(0, dtype=tf.int64)
  as_dataset = data.train_source.builder.as_dataset

  def counting(*args, **kwargs):
    return as_dataset(*args, **kwargs).map(lambda ex: (reads.assign_add(1), ex)[1])

  data.train_source.builder.as_dataset = counting
  full = data.train_iter(4)
  full = [next(full) for _ in range(47)]
  assert int(reads.numpy()) >= 3 * 60   # The counter counts: three epochs were read.
  reads.assign(0)
  resumed = data.train_iter(4, start_step=43)
  for step in (43, 44):   # The rest of epoch 2 (steps 30..44).
    b = next(resumed)
    np.testing.assert_array_equal(b['image'], full[step]['image'], err_msg=str(step))
  assert int(reads.numpy()) <= 60
  for step in (45, 46):   # On into epoch 3.
    np.testing.assert_array_equal(next(resumed)['image'], full[step]['image'])
  assert not np.array_equal(full[0]['image'], full[15]['image'])   # Epochs differ in order.

  # Two processes, 4 examples each per step: 7 steps per epoch from disjoint halves
  # (without augmentation, so equal bytes mean the same record).
  c.dataset.augment, c.dataset.flip = 'none', False
  plain = ip.create_data(c)
  seen = []
  for pid in (0, 1):
    it = plain.train_iter(4, 0, process_index=pid, process_count=2)
    seen.append({im.tobytes() for _ in range(7) for im in next(it)['image']})
  assert len(seen[0]) == len(seen[1]) == 28 and not seen[0] & seen[1]
