"""Unknown config fields are errors wherever they are set; the package installs and runs anywhere."""

import os
import re
import sys
import tomllib

from configs import default
from resnet_jax import config_fields
from resnet_jax.errors import UserError
from tests.conftest import REPO
from tests.test_main import assert_one_line_error, run_main


def test_typo_inside_a_config_is_named_with_the_closest_field():
  c = default.get_config()
  c.model.nme = 'resnet50'
  c.optimzer = 3
  try:
    config_fields.check_known_fields(c, default.get_config())
  except UserError as e:
    msg = str(e)
  else:
    raise AssertionError('an unknown field was accepted')
  assert 'config.model.nme: unknown field (did you mean config.model.name?)' in msg
  assert 'config.optimzer: unknown field (did you mean config.optimizer?)' in msg


def test_every_shipped_config_uses_only_known_fields_and_valid_values():
  import importlib

  from resnet_jax import train
  for name in sorted(os.listdir(os.path.join(REPO, 'configs'))):
    if name.endswith('.py') and name != '__init__.py':
      module = importlib.import_module(f'configs.{name[:-3]}')
      config_fields.check_known_fields(module.get_config(), default.get_config())
      train.validate_config(module.get_config())


def test_unknown_fields_on_the_command_line_and_in_a_file(tmp_path):
  proc = run_main('--config=configs/default.py', f'--workdir={tmp_path}/wd', '--config.foo=1')
  assert_one_line_error(proc, 'config.foo', 'unknown field')
  proc = run_main('--config=configs/default.py', f'--workdir={tmp_path}/wd',
                  '--config.model.nme=resnet50')
  assert_one_line_error(proc, 'config.model.nme', 'did you mean config.model.name?')
  typo = tmp_path / 'typo.py'
  typo.write_text('from configs import default\n\n\ndef get_config():\n'
                  '  c = default.get_config()\n  c.dataset.imag_size = 64\n  return c\n')
  proc = run_main(f'--config={typo}', f'--workdir={tmp_path}/wd')
  assert_one_line_error(proc, 'config.dataset.imag_size', 'config.dataset.image_size')
  proc = run_main('--config', str(typo), f'--workdir={tmp_path}/wd')  # The spaced form.
  assert_one_line_error(proc, 'config.dataset.imag_size', 'config.dataset.image_size')
  assert not os.path.exists(tmp_path / 'wd')


def test_config_file_without_get_config_names_the_file(tmp_path):
  bad = tmp_path / 'no_getter.py'
  bad.write_text('def make():\n  return None\n')
  proc = run_main(f'--config={bad}', f'--workdir={tmp_path}/wd')
  assert_one_line_error(proc, str(bad), 'get_config')


def test_help_exits_zero_and_runs_from_any_directory(tmp_path):
  import subprocess
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-m', 'resnet_jax.main', '--help'], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert '--workdir' in proc.stdout and '--config' in proc.stdout
  # configs/<name>.py resolves against the installed configs package from elsewhere.
  proc = subprocess.run([sys.executable, '-m', 'resnet_jax.main', '--config=configs/cifar10.py',
                         f'--workdir={tmp_path}/wd', '--config.model.nme=x'], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=120)
  assert_one_line_error(proc, 'config.model.nme')


def test_pyproject_declares_every_requirement():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  every = project['dependencies'] + sum(project['optional-dependencies'].values(), [])
  declared = {re.split(r'[<>=!~\[ ]', d)[0].lower().replace('_', '-') for d in every}
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    pinned = {re.split(r'[<>=!~\[ ]', l)[0].lower().replace('_', '-') for l in f
              if l.strip() and not l.startswith('#')}
  assert pinned - declared == set()
