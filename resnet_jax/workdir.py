"""The workdir as a resource: may it be written, and is another run using it?

Two rules keep a workdir sound:
  * nothing is written before every check has passed, so `check_writable` only
    looks (it creates nothing, not even the folder);
  * one run at a time: `Lock` holds `<workdir>/run.lock` for the whole run.
    The lock is an `fcntl.flock` on that file, which the kernel drops when its
    process dies however it dies, so a lock file that nobody holds is stale by
    definition; the file names the holder (pid, host, start time) so a refused
    run can say who is in the way.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

from resnet_jax.errors import UserError

LOCK_NAME = 'run.lock'


def check_writable(workdir: str) -> None:
  """Fails if `workdir` could not be created or written; changes nothing on disk."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir: {workdir} exists and is not a directory')
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'--workdir: cannot create {workdir}: {existing} is not a directory')
  if not os.access(existing, os.W_OK | os.X_OK):
    what = 'is not writable' if existing == os.path.abspath(workdir) else (
        f'cannot be created ({existing} is not writable)')
    raise UserError(f'--workdir: {workdir} {what}')


def _describe(holder: dict[str, Any]) -> str:
  started = holder.get('started')
  when = f', started {time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}' if (
      isinstance(started, (int, float))) else ''
  return f'pid {holder.get("pid", "?")} on {holder.get("host", "?")}{when}'


def _read_holder(fd: int) -> dict[str, Any]:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 4096)
  try:
    holder = json.loads(raw.decode() or '{}')
    return holder if isinstance(holder, dict) else {}
  except (UnicodeDecodeError, ValueError):
    return {}


def holder(workdir: str) -> str | None:
  """Who holds the workdir's lock ('pid 12 on host, started ...'), or None; changes nothing."""
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  except BlockingIOError:
    return _describe(_read_holder(fd))
  except OSError:
    return None
  finally:
    os.close(fd)


class Lock:
  """`with Lock(workdir):` one run per workdir; a second one is a one-line UserError.

  Taken after validation and before the first write; it creates the workdir if
  needed. Released (and the file removed) on exit, also on errors. In a
  multi-host run only the lead process takes it (`enabled`); the others share
  the workdir with it.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.enabled = enabled
    self._fd: int | None = None

  def __enter__(self) -> 'Lock':
    os.makedirs(self.workdir, exist_ok=True)
    if not self.enabled:
      return self
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except PermissionError:
        raise UserError(f'--workdir: cannot open its lock file {self.path} (permission denied; '
                        'left by another user?)') from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise UserError(f'--workdir: {self.workdir} is in use by another run '
                        f'({_describe(holder)}); wait for it to end or use another '
                        'workdir') from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
          os.close(fd)
          raise
        logging.warning('The filesystem of %s does not support locks; nothing stops a second '
                        'run on this workdir.', self.workdir)
      # The holder before us may have removed the file between our open and our
      # flock; then we hold a lock on a deleted file. Start again on the new one.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    holder = _read_holder(fd)
    if holder:
      logging.warning('Taking over the stale lock in %s left by %s, which is no longer running.',
                      self.workdir, _describe(holder))
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + '\n').encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._fd is None:
      return
    try:
      os.remove(self.path)  # Before unlocking, so nobody locks a file we then delete.
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None
