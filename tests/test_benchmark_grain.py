"""scripts/benchmark_grain.py: tf.data and Grain on the same folder give like batches."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import import_script, tiny_config

pytest.importorskip('grain')


def _jpeg_folder(root, classes=3, per_class=6, size=(40, 30)):
  rng = np.random.default_rng(0)
  for c in range(classes):
    d = root / 'train' / f'c{c}'
    d.mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)
      Image.fromarray(pixels).save(d / f'{i}.jpg', quality=90)
  return str(root)


@pytest.mark.parametrize('size,augment,variants', [
    (8, 'pad_crop', {'tfdata', 'grain', 'grain_in_memory'}),
    (16, 'random_resized_crop', {'tfdata', 'grain'}),
])
def test_both_pipelines_time_batches_of_one_shape(tmp_path, capsys, size, augment, variants):
  from absl import flags
  bench = import_script('benchmark_grain')
  config = tiny_config(**{'dataset.name': 'image_folder',
                          'dataset.data_dir': _jpeg_folder(tmp_path),
                          'dataset.train_split': 'train', 'dataset.eval_split': 'train[:20%]',
                          'dataset.image_size': size, 'dataset.augment': augment,
                          'batch_size': 4})
  flags.FLAGS(['benchmark_grain', '--steps=2', '--rounds=2', '--warmup=1', '--workers=1'])
  flags.FLAGS.config = config   # Parsed flags, as on the command line: Grain reads its own.
  try:
    bench.main([])
  finally:
    flags.FLAGS.unparse_flags()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert variants == {k for k, v in result.items() if isinstance(v, dict)}
  assert result['augment'] == augment and result['workers'] == 1
  assert result['grain_best'] in variants - {'tfdata'}
  assert result['grain_over_tfdata'] == pytest.approx(
      result[result['grain_best']]['images_per_sec'] / result['tfdata']['images_per_sec'])
  for name in variants:
    side = result[name]
    assert side['images_per_sec'] > 0 and side['images_per_sec_per_core'] > 0
    assert len(side['round_images_per_sec']) == 2
    assert side['image_shape'] == [4, size, size, 3] and side['image_dtype'] == 'uint8'
    assert side['label_dtype'] == 'int32'
    assert 0 <= side['label_min'] <= side['label_max'] < result['num_classes'] == 3

