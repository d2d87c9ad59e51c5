"""One job, several processes: start-up, a watchdog for lost peers, and exits that reach everyone.

JAX's multi-controller runtime runs one process per host (or per GPU); process
0 hosts the coordination service the others connect to. Three things here make
that safe to use from the command line:

* `initialize` checks the flags (one `UserError` line for a bad value), then
  calls `jax.distributed.initialize` before anything touched a JAX backend.
  A coordinator that never answers, or processes that never all arrive, end
  in one `error:` line after `--distributed_init_timeout` seconds (JAX itself
  aborts with a C++ stack trace; our deadline fires first).
* `Watchdog`: a daemon thread that publishes this process's heartbeat in the
  coordination service's key-value store and reads everyone else's. A process
  that died (kill -9, out of memory, a lost node) leaves the others blocked in
  a collective that never completes; the watchdog ends them with one line
  naming the process, within `--heartbeat_timeout` seconds (exit 4). JAX's own
  heartbeat check is set to `JAX_HEARTBEAT_FACTOR` (4) times that, as a
  backstop: at twice, a slow watchdog poll on a loaded machine sometimes lost
  the race and the user saw JAX's abort (exit 134) instead of our line. When process 0 itself
  dies, JAX's client sees the coordinator's connection close and ends the
  others at once with its own fatal line ("Terminating process because the
  JAX distributed service detected fatal errors ... another task died") and
  a stack dump (exit 134): jaxlib 0.10.2 offers a callback for that moment,
  but one set from Python aborts (its status argument has no Python type).
* `abort`: a process that stops with an error first records the error in the
  key-value store, so the others' watchdogs stop them with that line and exit
  code, instead of leaving them waiting in a collective.

The agreement on *when* to stop after a signal is not here: the stop flag
rides along with every training batch (`parallel.Parallel.put_stop_flag`) and
the step reduces it over all devices, so it costs no extra round trip.

This module imports JAX only inside its functions: `main` calls `initialize`
before anything else may load a backend.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Any

from resnet_jax.errors import UserError

EXIT_PEER_LOST = 4           # Another process of the job died or stopped answering.
KEY_PREFIX = 'resnet_jax'
DEFAULT_INIT_TIMEOUT = 300   # s: every process must have connected by then.
JAX_HEARTBEAT_FACTOR = 4  # JAX's own heartbeat limit, in units of ours (a backstop).
DEFAULT_HEARTBEAT_TIMEOUT = 60  # s: a process silent for this long is taken for dead.


@dataclasses.dataclass
class Options:
  """The command line's distributed flags."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  init_timeout: int = DEFAULT_INIT_TIMEOUT
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT

  @property
  def wanted(self) -> bool:
    return self.auto or any(v is not None for v in (self.coordinator_address,
                                                    self.num_processes, self.process_id))


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  host = host.strip('[]')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--coordinator_address: {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)')
  return host, int(port)


def check(opts: Options) -> None:
  """The flags make sense together; no network, no JAX."""
  for name in ('init_timeout', 'heartbeat_timeout'):
    if getattr(opts, name) <= 0:
      flag = 'distributed_init_timeout' if name == 'init_timeout' else name
      raise UserError(f'--{flag}: must be a positive number of seconds, got {getattr(opts, name)}')
  if not opts.auto and opts.wanted:
    given = {'coordinator_address': opts.coordinator_address,
             'num_processes': opts.num_processes, 'process_id': opts.process_id}
    missing = [f'--{k}' for k, v in given.items() if v is None]
    if missing:
      raise UserError(f'{", ".join(missing)}: needed with '
                      f'{", ".join(f"--{k}" for k, v in given.items() if v is not None)} '
                      '(or --distributed=auto to detect SLURM, Cloud TPU, Kubernetes, Open MPI)')
  if opts.coordinator_address is not None:
    _split_address(opts.coordinator_address)
  if opts.num_processes is not None and opts.num_processes < 1:
    raise UserError(f'--num_processes: must be at least 1, got {opts.num_processes}')
  if opts.process_id is not None:
    n = opts.num_processes
    if opts.process_id < 0 or (n is not None and opts.process_id >= n):
      raise UserError(f'--process_id: {opts.process_id} is out of range; with '
                      f'--num_processes={n} it is one of 0..{n - 1}' if n is not None else
                      f'--process_id: must be >= 0, got {opts.process_id}')


def _probe(address: str) -> str:
  """Why nothing may be answering at `address`, in words ('' when a TCP connect works)."""
  host, port = _split_address(address)
  try:
    with socket.create_connection((host, port), timeout=3):
      return ''
  except OSError as e:
    return f'nothing answers at {address} ({e.strerror or type(e).__name__})'


def _say_and_exit(message: str, code: int, linger: float = 0.0) -> None:
  """One line on stderr, then exit at once (from any thread, without waiting for peers).

  `linger`: seconds to stay before exiting, so that (on process 0, which hosts
  the key-value store) the other processes can still read what happened.
  """
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  os.write(2, f'error: {message}\n'.encode(errors='replace'))
  time.sleep(linger)
  os._exit(code)


def _init_deadline(opts: Options) -> threading.Timer:
  """Ends the process with one line if `jax.distributed.initialize` is still waiting."""

  def expire():
    if opts.coordinator_address is None:  # --distributed=auto found the cluster's.
      _say_and_exit('--distributed=auto: the processes of this cluster job did not all reach '
                    f'their coordinator within --distributed_init_timeout={opts.init_timeout} s',
                    2)
    where = opts.coordinator_address
    if opts.process_id == 0:
      why = (f'process 0 waited at {where} for all {opts.num_processes} processes, and '
             'some never connected')
    else:
      probe = _probe(where)
      why = (f'{probe}: is process 0 running there?' if probe else
             f'connected to {where}, but not all processes arrived')
    _say_and_exit(f'--coordinator_address: {why} (gave up after --distributed_init_timeout='
                  f'{opts.init_timeout} s; every process needs the same --coordinator_address '
                  'and --num_processes and its own --process_id)', 2)

  timer = threading.Timer(opts.init_timeout, expire)
  timer.daemon = True
  return timer


_watchdog: 'Watchdog | None' = None


def initialize(opts: Options) -> bool:
  """Joins the job described by `opts`; False (and nothing done) when no flag asks for it."""
  global _watchdog
  check(opts)
  if not opts.wanted:
    return False
  if opts.coordinator_address:
    host, _ = _split_address(opts.coordinator_address)
    try:
      socket.getaddrinfo(host, None)
    except OSError as e:
      raise UserError(f'--coordinator_address: cannot resolve host {host!r} ({e.strerror})') from None
  import jax  # pylint: disable=import-outside-toplevel
  # JAX's preemption service installs a C++ SIGTERM handler that would swallow a
  # SIGTERM during start-up; our own `loop.Preemption` handles signals instead.
  jax.config.update('jax_enable_preemption_service', False)
  # Cross-process collectives between CPU devices (tests, the local launcher).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  deadline = _init_deadline(opts)
  deadline.start()
  try:
    jax.distributed.initialize(
        opts.coordinator_address, opts.num_processes, opts.process_id,
        # JAX's own limits are backstops behind ours (they abort with a stack trace).
        initialization_timeout=opts.init_timeout + 30,
        heartbeat_timeout_seconds=JAX_HEARTBEAT_FACTOR * opts.heartbeat_timeout,
        shutdown_timeout_seconds=opts.heartbeat_timeout)
  except (ValueError, TypeError, RuntimeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    flag = '--distributed=auto' if opts.auto else '--coordinator_address'
    if opts.auto and 'coordinator_address' in first:
      first = ('no cluster detected (SLURM, Cloud TPU, Kubernetes, Open MPI); give '
               '--coordinator_address, --num_processes and --process_id instead')
    raise UserError(f'{flag}: {first}') from None
  finally:
    deadline.cancel()
  if jax.process_count() > 1:
    _watchdog = Watchdog(_client(), jax.process_index(), jax.process_count(),
                         opts.heartbeat_timeout)
    _watchdog.start()
  return True


def _client() -> Any:
  # The coordination service's client; JAX has no public accessor (Orbax and
  # multihost_utils reach it the same way).
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client


def active() -> bool:
  """Whether this process belongs to a job of several processes."""
  return _watchdog is not None


class Watchdog:
  """Heartbeats through the coordination service; ends this process when a peer is lost.

  Every `interval` seconds (two requests): write our beat counter, read
  everyone's, with the failures other processes recorded (`abort`) and the
  ends of run they marked (`finish`). A peer whose counter has not moved for
  `timeout` seconds is dead (its watchdog thread beats even while its main
  thread waits in a collective or compiles). A peer that ended its run is not
  expected to beat, but all processes end together, so still running
  `timeout` seconds later means waiting for it. A coordinator that stops
  answering means process 0 is gone. A process that hangs while alive keeps
  beating: that is not detected.
  """

  def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float):
    self.client = client
    self.process_id = process_id
    self.num_processes = num_processes
    self.timeout = float(timeout)
    self.interval = min(5.0, max(0.2, self.timeout / 10))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='resnet_jax-watchdog', daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout=self.interval + 5)

  def _run(self) -> None:
    beat, seen, done_since = 0, {}, {}   # seen: process -> (last beat, when it changed)
    started = time.monotonic()
    while not self._stop.is_set():
      beat += 1
      try:
        self.client.key_value_set(f'{KEY_PREFIX}/alive/{self.process_id}', str(beat),
                                  allow_overwrite=True)
        entries = self.client.key_value_dir_get(f'{KEY_PREFIX}/')
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        _say_and_exit(f'lost the coordinator (process 0 of {self.num_processes}): it died or the '
                      f'network failed ({first}); stopping this process too; rerun the job to '
                      'resume from its last checkpoint', EXIT_PEER_LOST)
      if self._stop.is_set():
        return
      news: dict[str, dict[int, str]] = {'alive': {}, 'done': {}, 'failed': {}}
      for key, value in entries:
        kind, _, p = key[len(KEY_PREFIX) + 1:].partition('/')
        if kind in news and p.isdigit():
          news[kind][int(p)] = value
      self._check(news, seen, done_since, started)
      self._stop.wait(self.interval)

  def _check(self, news: dict[str, dict[int, str]], seen: dict[int, tuple[str | None, float]],
             done_since: dict[int, float], started: float) -> None:
    """Ends this process when a peer failed, went silent, or ended its run long ago."""
    n = self.num_processes
    for p, value in sorted(news['failed'].items()):
      if p != self.process_id:
        code, _, message = value.partition('|')
        _say_and_exit(f'process {p} of {n} stopped: {message}', int(code), self.linger())
    now = time.monotonic()
    rerun = 'stopping this process too; rerun the job to resume from its last checkpoint'
    for p in range(n):
      if p == self.process_id:
        continue
      if p in news['done']:
        # It left through the normal exit, which all processes reach together; one
        # still running long after is stuck waiting for it.
        done_since.setdefault(p, now)
        if now - done_since[p] > self.timeout:
          _say_and_exit(f'process {p} of {n} ended its run {now - done_since[p]:.0f} s ago '
                        f'(--heartbeat_timeout={self.timeout:g}) while this one still runs; '
                        + rerun, EXIT_PEER_LOST, self.linger())
        continue
      value = news['alive'].get(p)
      if p not in seen or seen[p][0] != value:
        seen[p] = (value, now if value is not None else seen.get(p, (None, started))[1])
      silent = now - seen[p][1]
      if silent > self.timeout:
        what = 'never sent a heartbeat' if value is None else 'stopped sending heartbeats'
        _say_and_exit(f'process {p} of {n} {what} for {silent:.0f} s (--heartbeat_timeout='
                      f'{self.timeout:g}): it died or lost the network; ' + rerun,
                      EXIT_PEER_LOST, self.linger())

  def linger(self) -> float:
    """Process 0 hosts the store: it stays long enough for the others to read the news."""
    return 2 * self.interval + 0.5 if self.process_id == 0 else 0.0


def finish() -> None:
  """Marks this process done (peers stop expecting its heartbeat) and stops the watchdog."""
  global _watchdog
  if _watchdog is None:
    return
  try:
    _watchdog.client.key_value_set(f'{KEY_PREFIX}/done/{_watchdog.process_id}', '1',
                                   allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass
  _watchdog.stop()
  _watchdog = None


def abort(message: str, code: int) -> None:
  """Records `message` for the other processes, then exits at once with `code`.

  Exiting normally would wait in JAX's shutdown barrier for processes that are
  themselves waiting for us in a collective. Process 0 hosts the key-value
  store, so it waits two watchdog intervals for the others to read the message.
  """
  watchdog = _watchdog
  if watchdog is None:
    return
  watchdog.stop()
  try:
    watchdog.client.key_value_set(f'{KEY_PREFIX}/failed/{watchdog.process_id}',
                                  f'{code}|{message}', allow_overwrite=True)
    time.sleep(watchdog.linger())
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  os._exit(code)
