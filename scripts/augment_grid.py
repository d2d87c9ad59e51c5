"""Writes a PNG grid of training examples exactly as the training pipeline makes them.

  python scripts/augment_grid.py --config=configs/cifar10.py --out=grid.png \
      [--rows=4 --cols=8] [--step=0] [--config.dataset.randaugment=2,9 ...]

The images are the first rows x cols examples of the training batch at `--step`
(crop, flip, RandAugment, random erasing as configured), taken from the
project's own pipeline and un-normalised for display (erased noise is clipped),
so a user can look at what the model sees before paying for a run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('out', 'augmented.png', 'PNG file to write.')
flags.DEFINE_integer('rows', 4, 'Rows of the grid.')
flags.DEFINE_integer('cols', 8, 'Columns of the grid.')
flags.DEFINE_integer('step', 0, 'Which training step\'s batch to show.')
FLAGS = flags.FLAGS


def grid(config, rows: int, cols: int, step: int = 0):
  """(rows*H, cols*W, 3) uint8: the first rows*cols examples of step's training batch."""
  import numpy as np

  from resnet_jax import input_pipeline, train
  from resnet_jax.errors import UserError
  if rows < 1 or cols < 1:
    raise UserError(f'--rows/--cols: must be positive, got {rows}x{cols}')
  train.validate_config(config)
  data = input_pipeline.create_data(config)
  n = rows * cols
  if data.info.num_train < max(n, int(config.batch_size)):
    raise UserError(f'--rows/--cols: {n} images asked for, the training split has '
                    f'{data.info.num_train}')
  # The run's own batch (its order depends on the batch size), or a larger one if asked.
  batch = next(data.train_iter(max(n, int(config.batch_size)), step))
  mean = np.asarray(config.dataset.mean, np.float32) * 255.0
  std = np.asarray(config.dataset.std, np.float32) * 255.0
  images = np.clip(batch['image'][:n] * std + mean, 0, 255).round().astype(np.uint8)
  h, w = images.shape[1:3]
  return images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, cols * w, 3)


def main(argv):
  del argv
  from PIL import Image

  from resnet_jax.errors import UserError
  try:
    picture = grid(FLAGS.config, FLAGS.rows, FLAGS.cols, FLAGS.step)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  Image.fromarray(picture).save(FLAGS.out)
  print(f'wrote {FLAGS.out} ({picture.shape[1]}x{picture.shape[0]})')


if __name__ == '__main__':
  app.run(main)
