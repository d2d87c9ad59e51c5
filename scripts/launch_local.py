"""Runs a multi-process job on this machine: N processes, D CPU devices each.

  python scripts/launch_local.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/cifar10.py --workdir=/tmp/run [--config.x=y ...]

Each process runs `python -m resnet_jax.main <args> --coordinator_address=127.0.0.1:<free port>
--num_processes=N --process_id=I` on JAX's CPU backend with D devices
(`JAX_NUM_CPU_DEVICES`), talking to the others through gloo, as the hosts of a
cluster job would through their network. It is how the tests run several
processes, and how to debug a cluster job before paying for one.

* Every line a process prints comes out prefixed with `[p<i>] ` (stdout to
  stdout, stderr to stderr); the launcher's own lines start with `[launch] `
  and name each process's pid.
* SIGTERM and SIGINT are passed on to every process (so all of them save one
  checkpoint at the same step and stop, as a preempted cluster job would).
* When a process fails, the others get `--grace` seconds to stop by themselves
  (their watchdog notices within main's `--heartbeat_timeout`), then are
  killed. The exit code is the first failing process's (128 + signal when a
  signal ended it), 0 only when every process succeeded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
  """The environment of one process: JAX on CPU with `devices` devices."""
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_NUM_CPU_DEVICES'] = str(devices)
  # JAX_NUM_CPU_DEVICES wins over this XLA flag; drop it anyway, so nothing disagrees.
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['PYTHONUNBUFFERED'] = '1'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH', '')) if p)
  return env


def _pump(stream, out, prefix: str) -> None:
  for line in iter(stream.readline, ''):
    out.write(prefix + line if line.endswith('\n') else prefix + line + '\n')
    out.flush()
  stream.close()


def _code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def parse_args(argv: list[str]) -> argparse.Namespace:
  if '--' in argv:
    split = argv.index('--')
    own, rest = argv[:split], argv[split + 1:]
  else:
    own, rest = argv, []
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--module', default='resnet_jax.main',
                      help='the Python module each process runs (python -m MODULE)')
  parser.add_argument('--grace', type=float, default=120.0,
                      help='seconds the others get to stop by themselves after one failed')
  args = parser.parse_args(own)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be at least 1')
  args.rest = rest
  return args


def launch(args: argparse.Namespace) -> int:
  address = f'127.0.0.1:{free_port()}'
  env = child_env(args.devices_per_process)
  procs, pumps = [], []
  for i in range(args.num_processes):
    cmd = [sys.executable, '-m', args.module, *args.rest, f'--coordinator_address={address}',
           f'--num_processes={args.num_processes}', f'--process_id={i}']
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors='replace', start_new_session=True)
    procs.append(p)
    print(f'[launch] p{i} pid {p.pid}', file=sys.stderr, flush=True)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, out, f'[p{i}] '), daemon=True)
      t.start()
      pumps.append(t)

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)

  first_failure: tuple[int, int] | None = None   # (process, exit code)
  deadline = None
  while any(p.poll() is None for p in procs):
    for i, p in enumerate(procs):
      if first_failure is None and p.poll() not in (None, 0):
        first_failure = (i, _code(p.returncode))
        deadline = time.monotonic() + args.grace
    if deadline is not None and time.monotonic() > deadline:
      for i, p in enumerate(procs):
        if p.poll() is None:
          print(f'[launch] p{i} still running {args.grace:g} s after p{first_failure[0]} failed; '
                'killing it', file=sys.stderr, flush=True)
          p.kill()
      break
    time.sleep(0.05)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if first_failure is None:
    failed = [(i, _code(p.returncode)) for i, p in enumerate(procs) if p.returncode]
    first_failure = failed[0] if failed else None
  if first_failure is None:
    return 0
  codes = ', '.join(f'p{i} {_code(p.returncode)}' for i, p in enumerate(procs))
  print(f'[launch] exit codes: {codes}', file=sys.stderr, flush=True)
  return first_failure[1]


def main(argv: list[str]) -> int:
  return launch(parse_args(argv))


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
