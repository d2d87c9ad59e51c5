"""JAX's persistent compilation cache: a rerun, a resume or the next trial skips XLA's compile.

The compiled train step of a ResNet-50 takes tens of seconds to a few minutes
to build; every resume after a preemption, every `--mode=eval` and every sweep
trial with the same shapes pays it again. JAX can keep compiled executables on
disk (`jax_compilation_cache_dir`); this module only chooses the directory and
says what it chose. Nothing here is hand-written caching: JAX keys the entries
by the program, the compile options and the backend, so a stale entry is never
used.

The directory: `--compilation_cache_dir` if given ('' or 'none' switches the
cache off); else `$JAX_COMPILATION_CACHE_DIR` when the user set it (JAX reads it
itself); else `~/.cache/resnet_jax/jax` (XDG_CACHE_HOME respected). A default
that cannot be created (a read-only home) is a warning and no cache, as the
cache only saves time; a directory the user named that cannot be written is an
error, since they asked for it. JAX stores only programs that took at least
`jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile.
"""

from __future__ import annotations

import logging
import os

from resnet_jax.errors import UserError

OFF = ('', 'none', 'off')
ENV = 'JAX_COMPILATION_CACHE_DIR'


def default_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return os.path.join(os.path.expanduser(root), 'resnet_jax', 'jax')


def choose_dir(flag_value: str | None) -> tuple[str | None, bool]:
  """(directory or None for off, whether the user named it) for a flag value (None: not given)."""
  if flag_value is not None:
    value = flag_value.strip()
    if value.lower() in OFF:
      return None, True
    return os.path.abspath(os.path.expanduser(value)), True
  if os.environ.get(ENV):
    return os.path.abspath(os.path.expanduser(os.environ[ENV])), True
  return default_dir(), False


def configure(flag_value: str | None) -> str | None:
  """Points JAX at the cache directory (creating it); returns it, or None when off.

  Call before the first compilation. Needs no JAX backend, so it may run
  before `jax.distributed.initialize`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  path, named = choose_dir(flag_value)
  if path is None:
    jax.config.update('jax_compilation_cache_dir', None)
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  try:
    os.makedirs(path, exist_ok=True)
    writable = os.access(path, os.W_OK | os.X_OK)
  except OSError as e:
    writable, reason = False, e.strerror
  else:
    reason = 'not writable'
  if not writable:
    if named:
      raise UserError(f'--compilation_cache_dir: cannot use {path} ({reason}); give a writable '
                      "directory, or 'none' to compile without a cache")
    logging.warning('compilation cache off: cannot use %s (%s); --compilation_cache_dir=DIR '
                    'names another', path, reason)
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  return path
