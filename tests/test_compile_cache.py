"""The persistent compilation cache: where it lives, the off switch, and a real hit in a rerun."""

import json
import os
import subprocess
import sys

import jax
import pytest

from resnet_jax import compile_cache
from resnet_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_jax_cache_config():
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  yield
  jax.config.update('jax_enable_compilation_cache', before[0])
  jax.config.update('jax_compilation_cache_dir', before[1])


def test_the_flag_wins_then_the_environment_then_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  assert compile_cache.choose_dir(None) == (str(tmp_path / 'xdg' / 'resnet_jax' / 'jax'), False)
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.choose_dir(None) == (str(tmp_path / 'env'), True)
  assert compile_cache.choose_dir(str(tmp_path / 'flag')) == (str(tmp_path / 'flag'), True)
  for off in ('none', 'None', '', 'off'):
    assert compile_cache.choose_dir(off) == (None, True)


def test_off_switch_and_a_named_directory(restore_jax_cache_config, tmp_path):
  assert compile_cache.configure('none') is None
  assert not jax.config.jax_enable_compilation_cache
  path = compile_cache.configure(str(tmp_path / 'cache'))
  assert path == str(tmp_path / 'cache') and os.path.isdir(path)
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == path


def test_an_unusable_named_directory_is_one_line_and_an_unusable_default_only_warns(
    restore_jax_cache_config, tmp_path, monkeypatch, caplog):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match=r'^--compilation_cache_dir: cannot use .*a_file/cache'):
    compile_cache.configure(str(blocker / 'cache'))
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(blocker))  # The default lands under a file.
  assert compile_cache.configure(None) is None
  assert not jax.config.jax_enable_compilation_cache
  assert 'compilation cache off' in caplog.text


_PROBE = r'''
import json, sys
import jax
from jax import monitoring
from resnet_jax import compile_cache
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
compile_cache.configure(sys.argv[1])
f = jax.jit(lambda x: (x @ x.T).sum() * 3.0)
f(jax.numpy.ones((8, 8))).block_until_ready()
print(json.dumps({'hits': events.count('/jax/compilation_cache/cache_hits')}))
'''


def _probe(cache_dir):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', _PROBE, cache_dir], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])['hits']


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
  cache = str(tmp_path / 'cache')
  assert _probe(cache) == 0
  assert os.listdir(cache), 'the first process wrote nothing to the cache'
  assert _probe(cache) >= 1
  assert _probe('none') == 0
