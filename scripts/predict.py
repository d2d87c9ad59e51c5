"""Prints the top-k classes with probabilities for images, using a trained workdir.

  python scripts/predict.py --workdir=/tmp/run photo1.jpg photo2.png some_folder/
  python scripts/predict.py --exported=/tmp/export photo1.jpg

The model, preprocessing and class names come from the workdir (config.json and
the checkpoint), so predictions see images exactly as evaluation did.
`--config=FILE` replaces config.json; `--config.x=y` overrides either. With
--exported they come from an export of scripts/export.py instead (no model code
and no checkpoint involved); images are resized the same way, then rounded to uint8.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, "Config file (default: the workdir's config.json).",
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'A workdir written by resnet_jax.main.')
flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to use.')
flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
flags.DEFINE_enum('weights', 'raw', ['raw', 'ema'], 'The trained weights or their moving '
                  'average (a run with config.ema.decay > 0).')
flags.DEFINE_string('exported', None, 'An export directory of scripts/export.py (instead of '
                    '--workdir).')
FLAGS = flags.FLAGS


def list_images(paths: list[str]) -> list[str]:
  from resnet_jax.image_folder import IMAGE_EXTENSIONS
  from resnet_jax.errors import UserError
  found = []
  for p in paths:
    if os.path.isdir(p):
      for root, _, files in sorted(os.walk(p)):
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    elif os.path.isfile(p):
      found.append(p)
    else:
      raise UserError(f'{p} does not exist')
  if not found:
    raise UserError('no JPEG or PNG images among the given paths')
  return found


def predict(workdir: str, paths: list[str], top_k: int = 5, which: str = 'best',
            batch_size: int = 32, config: Any = None, weights: str = 'raw'
            ) -> list[tuple[str, list[tuple[str, float]]]]:
  """Returns [(path, [(class name, probability), ...]), ...]; unreadable files are skipped.

  `config` defaults to the workdir's config.json; one that builds another
  network than the checkpoint's is a UserError naming the field.
  """
  import logging

  import jax
  import numpy as np

  from resnet_jax import input_pipeline, models, resume, saved_config
  from resnet_jax.errors import UserError

  if config is None:
    if not os.path.isfile(os.path.join(workdir, 'config.json')):
      raise UserError(f'--workdir: {workdir} has no config.json (not a resnet_jax workdir?)')
    config = saved_config.load(workdir)
  hint = "predict with the config it was trained with (leave out --config to use config.json)"
  step, variables, meta = resume.restore_variables(config, workdir, which, None, None,
                                                   '--workdir', hint, weights=weights)
  class_names = [str(c) for c in meta.get('class_names') or []]
  if not class_names:
    raise UserError(f'--workdir: checkpoint {step} in {workdir} names no classes (a converted '
                    'pretrained checkpoint, not a trained classifier?)')
  model = models.create_model(config.model, len(class_names))
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)))
  tf = input_pipeline._tf()  # pylint: disable=protected-access
  preprocess = input_pipeline.make_preprocess(config.dataset, train=False)
  images, kept = [], []
  for path in list_images(paths):
    try:
      raw = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
      images.append(preprocess(raw, tf.zeros([2], tf.int64)).numpy())
      kept.append(path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Skipping unreadable image %s (%s)', path, type(e).__name__)
  results = []
  k = min(top_k, len(class_names))
  for i in range(0, len(images), batch_size):
    probs = np.asarray(apply(variables, np.stack(images[i:i + batch_size])))
    for path, p in zip(kept[i:i + batch_size], probs):
      order = np.argsort(-p, kind='stable')[:k]  # As exported.top_k orders ties.
      results.append((path, [(class_names[j], float(p[j])) for j in order]))
  logging.info('Predicted with checkpoint %d of %s', step, workdir)
  return results


def predict_exported(export_dir: str, paths: list[str], top_k: int = 5,
                     batch_size: int = 32) -> list[tuple[str, list[tuple[str, float]]]]:
  """predict() from an export directory: the same output, computed by the exported function."""
  import logging

  import numpy as np

  from resnet_jax import exported

  classifier = exported.load(export_dir)
  images, kept = [], []
  for path in list_images(paths):
    try:
      with open(path, 'rb') as f:
        images.append(classifier.decode_image(f.read()))
      kept.append(path)
    except (OSError, exported.ImageError) as e:
      logging.warning('Skipping unreadable image %s (%s)', path, e)
  results = []
  for i in range(0, len(images), batch_size):
    probs = classifier(np.stack(images[i:i + batch_size]))
    results += [(path, exported.top_k(p, classifier.class_names, top_k))
                for path, p in zip(kept[i:i + batch_size], probs)]
  return results


def main(argv):
  from resnet_jax import console
  from resnet_jax.errors import UserError
  console.quiet_libraries()  # No Orbax INFO, no "directory is read only".
  console.import_tensorflow_quietly()
  if bool(FLAGS.workdir) == bool(FLAGS.exported):
    print('error: give exactly one of --workdir and --exported', file=sys.stderr)
    sys.exit(2)
  if len(argv) < 2:
    print('error: give image files or folders after the flags', file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.exported:
      results = predict_exported(FLAGS.exported, argv[1:], FLAGS.top_k, FLAGS.batch_size)
    else:
      results = predict(FLAGS.workdir, argv[1:], FLAGS.top_k, FLAGS.checkpoint,
                        FLAGS.batch_size, FLAGS.config, FLAGS.weights)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for path, top in results:
    print(f'{path}: ' + ', '.join(f'{name} {p:.3f}' for name, p in top), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with the workdir's config.json as --config; bad flags are one line."""
  from resnet_jax import saved_config
  try:
    remaining = FLAGS(saved_config.with_saved_config(argv, always=True))
    if FLAGS.config is not None:
      FLAGS.config.keys()  # A config file that failed to load raises on first use.
    return remaining
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f'error: {lines[-1] if lines else type(e).__name__}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
