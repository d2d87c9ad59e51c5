"""random_resized_crop decodes only the crop window of a JPEG (preprocess's from_file)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import default
from resnet_jax import preprocess


def _encoded(fmt, size=(120, 90), mode='RGB', seed=0):
  small = (np.random.default_rng(seed).uniform(size=(12, 12, 3)) * 255).astype(np.uint8)
  image = Image.fromarray(small).resize(size, Image.BICUBIC).convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt, quality=90)
  return buf.getvalue()


@pytest.mark.parametrize('fmt, mode', [('JPEG', 'RGB'), ('JPEG', 'L'), ('PNG', 'RGB')])
def test_the_crop_window_decode_gives_the_whole_decodes_crop(fmt, mode):
  """The same box (drawn from the header's size) and the same pixels, except that a
  4:2:0 JPEG's chroma near the window's edges is upsampled from fewer neighbours: a few
  pixels in a hundred differ there (at this small size). Other formats decode whole: the
  same bits."""
  tf = preprocess._tf()
  config = default.get_config()
  config.dataset.image_size, config.dataset.augment = 24, 'random_resized_crop'
  fn = preprocess.make_preprocess(config.dataset, train=True, as_uint8=True)
  differing = []
  for k in range(8):
    data = tf.constant(_encoded(fmt, mode=mode, seed=k))
    seed = tf.constant([3, k], tf.int64)
    cropped = fn.from_file(data, seed).numpy()
    whole = fn(tf.io.decode_image(data, channels=3, expand_animations=False), seed).numpy()
    assert cropped.shape == whole.shape == (24, 24, 3) and cropped.dtype == np.uint8
    differing.append(np.mean(cropped != whole))
    if fmt == 'PNG':
      np.testing.assert_array_equal(cropped, whole)
    else:  # The same crop, not another box: nearly every pixel equal.
      assert np.mean(np.abs(cropped.astype(int) - whole) <= 2) > 0.98
  assert np.mean(differing) < 0.05


def test_the_side_by_side_script_times_both_decodes(tmp_path, capsys):
  from absl import flags  # pylint: disable=import-outside-toplevel

  from tests.conftest import import_script  # pylint: disable=import-outside-toplevel
  script = import_script('benchmark_jpeg_crop')
  for k in range(3):
    (tmp_path / f'{k}.jpg').write_bytes(_encoded('JPEG', seed=k))
  flags.FLAGS(['benchmark_jpeg_crop', f'--data_dir={tmp_path}', '--image_size=16',
               '--images=8', '--rounds=1'])
  try:
    script.main([])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['whole_decode_images_per_sec'] > 0 and result['crop_window_decode_per_core'] > 0
    assert result['ratio'] == pytest.approx(result['crop_window_decode_images_per_sec'] /
                                            result['whole_decode_images_per_sec'], rel=0.01)
    flags.FLAGS(['benchmark_jpeg_crop', f'--data_dir={tmp_path / "none"}'])
    with pytest.raises(SystemExit) as info:
      script.main([])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().startswith('error: --data_dir: no .jpg files under')
  finally:
    flags.FLAGS.unparse_flags()
