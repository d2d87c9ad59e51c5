"""Batches cross to the device as uint8 and are normalised in the jitted step."""

import jax
import numpy as np
import pytest

from resnet_jax import checkpointing, device_data, input_pipeline, preprocess, train
from resnet_jax.errors import UserError


def _first(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize('size', [12, 8])
def test_uint8_batches_normalised_on_the_device_are_the_host_float_batches(folder_config, size):
  """The folder's images are 12px: at 12 the crops and flips keep integral pixels and the
  values are the same bits; at 8 they are resized and rounded to uint8 (half a level)."""
  folder_config.dataset.image_size = size
  data = input_pipeline.create_data(folder_config)
  norm = preprocess.pixel_norm(folder_config.dataset)
  normalise = jax.jit(lambda x: device_data.normalise(x, norm))
  pairs = [(_first(data.train_iter(4, start_step=1, as_uint8=True), 3),
            _first(data.train_iter(4, start_step=1), 3)),
           (list(data.eval_iter(4, as_uint8=True)), list(data.eval_iter(4)))]
  for small, wide in pairs:
    assert len(small) == len(wide)
    for a, b in zip(small, wide):
      assert a['image'].dtype == np.uint8 and b['image'].dtype == np.float32
      assert a['image'].nbytes * 4 == b['image'].nbytes
      np.testing.assert_array_equal(a['label'], b['label'])
      real = a.get('mask', np.ones(len(a['label']))) > 0   # Padding differs: masked anyway.
      got, want = np.asarray(normalise(a['image']))[real], b['image'][real]
      if size == 12:
        np.testing.assert_array_equal(got, want)
      else:
        assert np.abs(got - want).max() <= 0.5 * norm[1].max() + 1e-6
        assert not np.array_equal(got, want)


def test_training_sends_uint8_and_trains_bit_identically_to_float32(folder_config, tmp_path):
  folder_config.dataset.image_size = 12   # The folder's size: integral pixels, exact.
  assert preprocess.sends_uint8(folder_config.dataset)
  results = {}
  for transfer in ('uint8', 'float32'):
    folder_config.dataset.transfer = transfer
    workdir = str(tmp_path / transfer)
    results[transfer] = train.train_and_evaluate(folder_config, workdir)
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    results[transfer]['state'] = ckpt.restore(ckpt.steps()[-1])[0]
    ckpt.close()
  a, b = results['uint8'], results['float32']
  assert a['accuracy'] == b['accuracy'] and a['loss'] == b['loss']
  for part in ('params', 'batch_stats', 'opt_state'):
    for x, y in zip(jax.tree.leaves(a['state'][part]), jax.tree.leaves(b['state'][part])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_erasing_keeps_normalising_on_the_host_and_a_bad_transfer_is_one_line(folder_config):
  folder_config.dataset.random_erasing = 0.25   # Erases in normalised space.
  assert not preprocess.sends_uint8(folder_config.dataset)
  folder_config.dataset.transfer = 'int8'
  with pytest.raises(UserError, match=r"^config\.dataset\.transfer: choose 'uint8' or "
                                      r"'float32', got 'int8'$"):
    train.validate_config(folder_config)
