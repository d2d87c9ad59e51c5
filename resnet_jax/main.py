"""Command line: `python -m resnet_jax.main --config=configs/<name>.py --workdir=DIR`.

Bad input of any kind (unknown names, missing paths, wrong types in overrides)
ends with one line on stderr naming the problem, exit code 2, and no traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from resnet_jax import console  # Light: before anything heavy, Ctrl-C must exit cleanly.

if __name__ == '__main__':
  console.install_startup_interrupt()

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise for our users.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to an experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (resumes if possible) or eval.')
flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'], 'Which checkpoint --mode=eval uses.')


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad flag or override is one line, not a usage dump."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else 'bad command-line flags')
  except Exception as e:  # pylint: disable=broad-except
    # config files that fail to load or overrides of the wrong type end up here.
    msg = str(e).strip().splitlines()
    _fail(f'{type(e).__name__}: {msg[-1] if msg else ""}')
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    _fail('--config is required, e.g. --config=configs/cifar10.py')
  try:
    FLAGS.config.keys()  # A config file that failed to load raises on first use.
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'cannot load --config: {lines[-1] if lines else type(e).__name__}')
  if not FLAGS.workdir:
    _fail('--workdir is required')
  logging.getLogger().setLevel(logging.INFO)
  console.quiet_libraries()
  console.import_tensorflow_quietly()
  from resnet_jax import train  # After flag parsing: importing JAX takes a while.
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    if FLAGS.mode == 'eval':
      train.evaluate_checkpoint(FLAGS.config, workdir, FLAGS.checkpoint)
    else:
      train.train_and_evaluate(FLAGS.config, workdir)
  except UserError as e:
    _fail(str(e))
  except train.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # A second Ctrl-C while training: stopped without saving.
    print('interrupted: stopped without saving this step; rerun the same command to resume '
          'from the last checkpoint', file=sys.stderr, flush=True)
    sys.exit(130)
  except FloatingPointError as e:
    _fail(str(e), code=3)


def run() -> None:
  console.install_startup_interrupt()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
