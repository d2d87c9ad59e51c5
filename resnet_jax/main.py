"""Command line: `python -m resnet_jax.main --config=configs/<name>.py --workdir=DIR`.

`--mode=eval` without `--config` uses the workdir's own config.json
(`--config.x=y` overrides still apply on top).

Bad input of any kind (unknown names, missing paths, wrong types in overrides)
ends with one line on stderr naming the problem, exit code 2, and no traceback.

Several processes (one per host or GPU) form one job with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or with
`--distributed=auto` on SLURM, Cloud TPU, Kubernetes or Open MPI. Exit codes:
0 done, 2 bad input, 3 non-finite loss, 4 another process of the job was lost,
128 + signal after a signal (checkpoint saved), 130 Ctrl-C before training.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from resnet_jax import console  # Light: before anything heavy, Ctrl-C must exit cleanly.

if __name__ == '__main__':
  console.install_startup_interrupt()

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise for our users.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import compile_cache, distributed, saved_config  # noqa: E402  (JAX-free imports)
from resnet_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to an experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (resumes if possible) or eval.')
flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'], 'Which checkpoint --mode=eval uses.')
flags.DEFINE_enum('weights', 'raw', ['raw', 'ema'], '--mode=eval: the trained weights or their '
                  'moving average (config.ema).')
flags.DEFINE_string('report_dir', None, '--mode=eval: write the reports here instead of the '
                    'workdir (a read-only workdir without it: stdout only).')
flags.DEFINE_string('coordinator_address', None, 'Several processes: HOST:PORT of process 0, '
                    'the same on every process.')
flags.DEFINE_integer('num_processes', None, 'Several processes: how many form the job.')
flags.DEFINE_integer('process_id', None, 'Several processes: this one, 0..num_processes-1.')
flags.DEFINE_enum('distributed', None, ['auto'], 'auto: take the three flags above from the '
                  'cluster (SLURM, Cloud TPU, Kubernetes, Open MPI); given ones win.')
flags.DEFINE_integer('distributed_init_timeout', distributed.DEFAULT_INIT_TIMEOUT,
                     'Seconds for every process to connect to the coordinator.')
flags.DEFINE_string('compilation_cache_dir', None, 'Where compiled XLA programs are kept so a '
                    'rerun, resume or eval skips compiling (default: $JAX_COMPILATION_CACHE_DIR, '
                    "else ~/.cache/resnet_jax/jax); 'none' switches the cache off.")
flags.DEFINE_integer('heartbeat_timeout', distributed.DEFAULT_HEARTBEAT_TIMEOUT,
                     'Seconds of silence after which another process counts as dead and this '
                     'one stops (exit 4).')


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  distributed.abort(message, code)  # Several processes: tell the others, exit now.
  sys.exit(code)


def _distributed_options() -> distributed.Options:
  return distributed.Options(
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id, auto=FLAGS.distributed == 'auto',
      init_timeout=FLAGS.distributed_init_timeout, heartbeat_timeout=FLAGS.heartbeat_timeout)


def _reference_config():
  """configs/default.py, which lists every known field."""
  from configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def resolve_config_path(path: str) -> str:
  """A --config path as given, or else relative to the installed `configs` package.

  So `--config=configs/cifar10.py` works from any directory once the project is
  installed (`pip install -e .`).
  """
  file_part, sep, arg = path.partition(':')
  if os.path.exists(file_part):
    return path
  import configs  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(configs.__file__)))
  candidate = os.path.join(root, file_part)
  return candidate + sep + arg if os.path.isfile(candidate) else path


def _config_file_arg(argv: list[str]) -> tuple[int, int, str] | None:
  """(first index, end index, path) of `--config=PATH` or `--config PATH` (the last wins)."""
  found = None
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      found = (i, i + 1, arg.split('=', 1)[1])
    elif arg in ('--config', '-config') and i + 1 < len(argv):
      found = (i, i + 2, argv[i + 1])
  return found


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.x.y=v` whose field the reference config lacks, described."""
  from resnet_jax import config_fields  # pylint: disable=import-outside-toplevel
  known = config_fields.field_paths(_reference_config())
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      if path not in known:
        return config_fields.describe_unknown(path, known)
  return None


# True when --config named a file; False when eval/predict took the workdir's config.json,
# which an older version may have written with fields default.py no longer has.
_CONFIG_FROM_FILE = True


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad flag or override is one line, not a usage dump."""
  if any(a in ('--help', '-h', '-?', '--helpshort', '--helpfull') for a in argv[1:]):
    print(__doc__.strip() + '\n\nflags:' + FLAGS.main_module_help())
    sys.exit(0)
  found = _config_file_arg(argv)
  global _CONFIG_FROM_FILE
  _CONFIG_FROM_FILE = found is not None
  config_path = None
  if found is not None:
    config_path = resolve_config_path(found[2])
    argv = argv[:found[0]] + [f'--config={config_path}'] + argv[found[1]:]
  try:
    return FLAGS(saved_config.with_saved_config(argv))
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else 'bad command-line flags')
  except Exception as e:  # pylint: disable=broad-except
    # config files that fail to load or overrides of the wrong type end up here.
    msg = str(e).strip().splitlines()
    if isinstance(e, AttributeError) and 'get_config' in str(e) and config_path:
      _fail(f'--config: {config_path} has no get_config() function')
    if isinstance(e, (AttributeError, KeyError)):
      unknown = _unknown_override(argv)
      if unknown:
        _fail(unknown)
    _fail(f'{type(e).__name__}: {msg[-1] if msg else ""}')
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    _fail('--config is required, e.g. --config=configs/cifar10.py (--mode=eval can do without '
          "it when the workdir holds its config.json)")
  try:
    FLAGS.config.keys()  # A config file that failed to load raises on first use.
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'cannot load --config: {lines[-1] if lines else type(e).__name__}')
  if not FLAGS.workdir:
    _fail('--workdir is required')
  from resnet_jax import config_fields
  try:
    if _CONFIG_FROM_FILE:
      config_fields.check_known_fields(FLAGS.config, _reference_config())
  except UserError as e:
    _fail(str(e))
  if FLAGS.report_dir and FLAGS.mode != 'eval':
    _fail('--report_dir: only --mode=eval writes its reports elsewhere')
  logging.getLogger().setLevel(logging.INFO)
  console.quiet_libraries()
  try:
    # Before anything starts a JAX backend (nothing above imports JAX).
    distributed.initialize(_distributed_options())
    compile_cache.configure(FLAGS.compilation_cache_dir)
  except UserError as e:
    _fail(str(e))
  console.import_tensorflow_quietly()
  from resnet_jax import train  # After flag parsing: importing JAX takes a while.
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    if FLAGS.mode == 'eval':
      train.evaluate_checkpoint(FLAGS.config, workdir, FLAGS.checkpoint, FLAGS.report_dir,
                                FLAGS.weights)
    else:
      train.train_and_evaluate(FLAGS.config, workdir)
  except UserError as e:
    _fail(str(e))
  except train.Preempted as e:
    # Every process stops at the same step (the flag is agreed in the step), so all
    # leave through JAX's shutdown barrier together.
    print(f'preempted: {e}', file=sys.stderr, flush=True)
    distributed.finish()
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # A second Ctrl-C while training: stopped at once.
    message = ('interrupted: stopped at once (a checkpoint of this step exists only if one was '
               'being written); rerun the same command to resume from the last checkpoint')
    print(message, file=sys.stderr, flush=True)
    distributed.abort(message, 130)
    sys.exit(130)
  except FloatingPointError as e:
    _fail(str(e), code=3)
  except Exception as e:  # pylint: disable=broad-except
    if not distributed.active():
      raise
    traceback.print_exc()  # A bug, or a collective that failed: the others must not wait.
    _fail(f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:300]}', code=1)
  distributed.finish()


def run() -> None:
  console.install_startup_interrupt()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
