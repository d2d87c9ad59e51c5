"""Shared fixtures. Four virtual CPU devices, set before JAX is imported anywhere.

Tiny models (ResNet-20 at a quarter width) on 8-16px images keep the whole
suite fast on two cores.
"""

import atexit
import os
import shutil
import sys
import tempfile

# The suite's programs are tiny, so compiling dominates: LLVM at level 2 instead of XLA's
# default 3 halves the compile time (a first tiny run: compiling 8.2 s -> 3.9 s, all of it
# 12.5 s -> 8.3 s). Floats stay as close to level 3's as any two compilations are (1 vs 4
# devices at learning rate 0.1 agree to 8e-7 over ten steps at either); level 0 would save
# another second but moves them apart (2e-3), so tolerance-based comparisons would check
# numerics no user runs. Both programs of every bit-identity comparison compile alike.
FAST_COMPILE = '--xla_backend_optimization_level=2'
# Test modules import this file again as tests.conftest: the settings are made once.
if FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_COMPILE +
                             ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# Identical tiny models recur across tests: compile each once per session. Set in the
# environment (JAX reads these at import) so that the command-line runs of the tests, in
# subprocesses, load what this process or an earlier subprocess compiled.
_XLA_CACHE = os.environ.get('RESNET_JAX_TESTS_XLA_CACHE')
if not _XLA_CACHE:
  _XLA_CACHE = os.environ['RESNET_JAX_TESTS_XLA_CACHE'] = tempfile.mkdtemp(
      prefix='resnet_jax_xla_')
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import resnet_jax  # noqa: E402,F401  (the product's XLA_FLAGS, before JAX starts a backend)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from configs import default  # noqa: E402

assert jax.config.jax_compilation_cache_dir == _XLA_CACHE, 'JAX was imported before conftest'

CLASSES = ('cat', 'dog', 'frog')


def tiny_config(**overrides):
  """A config that trains in seconds: ResNet-20 at 1/4 width on 8px images."""
  c = default.get_config()
  c.model.name = 'resnet20'
  c.model.width_multiplier = 0.25
  c.dataset.image_size = 8
  c.dataset.crop_padding = 1
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2
  c.schedule.warmup_steps = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def write_image_folder(root, splits=(('train', 10), ('test', 5)), size=12, classes=CLASSES,
                       seed=0):
  """<root>/<split>/<class>/<i>.{png,jpg}: class-coloured noise, one grayscale PNG per class."""
  rng = np.random.default_rng(seed)
  for split, n in splits:
    for c, cls in enumerate(classes):
      d = os.path.join(root, split, cls)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        base = np.zeros((size, size, 3), np.uint8)
        base[..., c % 3] = 160
        img = np.clip(base + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
        if i == 0:
          Image.fromarray(img[..., c % 3], mode='L').save(os.path.join(d, f'{i:04d}.png'))
        elif i % 2:
          Image.fromarray(img).save(os.path.join(d, f'{i:04d}.jpg'), quality=95)
        else:
          Image.fromarray(img).save(os.path.join(d, f'{i:04d}.png'))
  return root


@pytest.fixture
def image_folder(tmp_path):
  return write_image_folder(str(tmp_path / 'images'))


@pytest.fixture
def folder_config(image_folder):
  return tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': image_folder,
                        'dataset.eval_split': 'test'})


def import_script(name):
  """Imports scripts/<name>.py as a module.

  Each script defines its absl flags at import (several define --config and
  --workdir), so flags that another script defined in this test process are
  removed first; otherwise the second import fails with DuplicateFlagError.
  """
  import importlib
  from absl import flags
  scripts = os.path.join(REPO, 'scripts')
  # Copies: deleting a flag removes it from these live lists (iterating them skipped flags).
  for module, defined in list(flags.FLAGS.flags_by_module_dict().items()):
    # absl keys flags by module name ('predict'), or by path when run as __main__.
    if os.path.dirname(os.path.abspath(module)) == scripts or os.path.isfile(
        os.path.join(scripts, module + '.py')):
      for flag in list(defined):
        if flag.name in flags.FLAGS:
          delattr(flags.FLAGS, flag.name)
  if scripts not in sys.path:
    sys.path.insert(0, scripts)
  sys.modules.pop(name, None)
  return importlib.import_module(name)


def subprocess_env(devices=None, **overrides):
  """The environment for a command-line run: this one's compile settings and shared cache.

  `devices`: virtual CPU devices of the child (None: XLA's default, one).
  """
  flags = FAST_COMPILE + (f' --xla_force_host_platform_device_count={devices}' if devices else '')
  return dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
              **overrides)


def digest(path):
  """A hash of every file's relative path and bytes under `path`: equal means untouched."""
  import hashlib
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(root, f), path).encode())
      h.update(open(os.path.join(root, f), 'rb').read())
  return h.hexdigest()
