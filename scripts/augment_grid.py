"""Writes a PNG grid of training examples exactly as the training pipeline makes them.

  python scripts/augment_grid.py --config=configs/cifar10.py --out=grid.png \
      [--rows=4 --cols=8] [--step=0] [--config.dataset.randaugment=2,9 ...]

The images are the first rows x cols examples that training feeds the model
from step `--step` on (crop, flip, RandAugment, random erasing as configured;
the next steps' batches when one batch holds fewer), taken from the batches
`train` itself iterates (the host pipeline, or the device-resident split with
`dataset.on_device`) and un-normalised for display (erased noise is clipped
to 0..255). mixup and CutMix happen later, inside the train step, and are not
shown.
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
flags.DEFINE_integer('step', 0, "The training step whose batch comes first.")
FLAGS = flags.FLAGS

MAX_IMAGES = 1024


def grid(config, rows: int, cols: int, step: int = 0):
  """(rows*H, cols*W, 3) uint8: the first rows*cols training examples from `step` on."""
  import types

  import jax
  import numpy as np

  from resnet_jax import input_pipeline, parallel, train
  from resnet_jax.errors import UserError
  n = rows * cols
  if rows < 1 or cols < 1 or n > MAX_IMAGES:
    raise UserError(f'--rows/--cols: 1 to {MAX_IMAGES} images, got {rows}x{cols}')
  if step < 0:
    raise UserError(f'--step: must be >= 0, got {step}')
  train.validate_config(config)
  data = input_pipeline.create_data(config)
  input_pipeline.check_steps_per_epoch(data.info.num_train, int(config.batch_size))
  # The batches training iterates: train._train_batches needs only the parallel
  # layout and the per-process batch of a Setup, not its model.
  par = parallel.Parallel(config.get('parallelism', 'jit'))
  feed = types.SimpleNamespace(par=par, local_batch=par.check_batch(
      'config.batch_size', int(config.batch_size)))
  batches = train._train_batches(config, data, feed, step)  # pylint: disable=protected-access
  images = []
  while sum(len(b) for b in images) < n:
    image = np.asarray(jax.device_get(next(batches)['image']))
    images.append(image.reshape((-1,) + image.shape[-3:]))  # pmap: [devices, batch, ...].
  images = np.concatenate(images)[:n]
  if images.dtype != np.uint8:  # Normalised on the host (random erasing, transfer=float32).
    mean = np.asarray(config.dataset.mean, np.float32) * 255.0
    std = np.asarray(config.dataset.std, np.float32) * 255.0
    images = np.clip(images * std + mean, 0, 255).round().astype(np.uint8)
  h, w = images.shape[1:3]
  return images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, cols * w, 3)


def write(config, out: str, rows: int, cols: int, step: int = 0) -> tuple[int, int]:
  """Writes the grid as a PNG; returns its (width, height)."""
  from PIL import Image

  from resnet_jax.errors import UserError
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise UserError(f'--out: folder {folder} does not exist')
  picture = grid(config, rows, cols, step)
  Image.fromarray(picture).save(out, format='PNG')
  return picture.shape[1], picture.shape[0]


def main(argv):
  from resnet_jax.errors import UserError

  def fail(message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)

  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    fail('--config is required, e.g. --config=configs/cifar10.py')
  try:
    FLAGS.config.keys()  # A config file that failed to load raises on first use.
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f'cannot load --config: {lines[-1] if lines else type(e).__name__}')
  from configs import default
  from resnet_jax import config_fields, console
  console.quiet_libraries()
  try:
    config_fields.check_known_fields(FLAGS.config, default.get_config())
    console.import_tensorflow_quietly()
    width, height = write(FLAGS.config, FLAGS.out, FLAGS.rows, FLAGS.cols, FLAGS.step)
  except UserError as e:
    fail(str(e))
  print(f'wrote {FLAGS.out} ({width}x{height})')


if __name__ == '__main__':
  app.run(main)
