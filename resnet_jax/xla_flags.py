"""XLA options the project sets for the whole process, before JAX starts a backend.

XLA reads `XLA_FLAGS` once, when JAX first initialises a backend, so the options
go into the environment at `import resnet_jax` (this module has no JAX import).
A user's own setting of the same option always wins, and so does setting
`RESNET_JAX_XLA_DEFAULTS=off`.

**Convolutions on XLA:CPU go to Eigen, not YNNPACK.** jaxlib 0.10 hands CPU
convolutions to YNNPACK by default. On the 2-core AVX-512 development machine a
ResNet-18 (CIFAR stem, 32px, batch 128) 64->64 3x3 convolution measured, per
call: forward 93 ms with YNNPACK against 47 ms with Eigen, input gradient 102
against 46, filter gradient 341 against 80 (PyTorch's oneDNN: 34, 32, 27).
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` takes only the
convolutions away from YNNPACK; its reductions and elementwise fusions stay
(switching YNNPACK off altogether left BatchNorm's reductions to a reduce-window
loop that cost 1.7 s a step). The whole ResNet-18 train step went from 0.42 to
about 0.7 of PyTorch's speed (docs/benchmarks.md). Eigen is XLA:CPU's
long-standing convolution; GPU and TPU compilers ignore `xla_cpu_*` options.

An option XLA does not know aborts the process at start-up, so the option is
only added for jaxlib versions known to have it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys

ENV_OFF = 'RESNET_JAX_XLA_DEFAULTS'
# (option name, value, first jaxlib version known to accept it)
DEFAULTS = (
    ('xla_cpu_experimental_ynn_fusion_type', '-individual_convolution', (0, 10)),
)


def _version(text: str) -> tuple[int, ...]:
  parts = []
  for piece in text.split('.')[:3]:
    digits = re.match(r'\d*', piece).group(0)  # '0rc1' -> 0
    if not digits:
      break
    parts.append(int(digits))
  return tuple(parts)


def jaxlib_version() -> tuple[int, ...]:
  try:
    return _version(importlib.metadata.version('jaxlib'))
  except importlib.metadata.PackageNotFoundError:
    return ()


def with_defaults(xla_flags: str, version: tuple[int, ...]) -> str:
  """`xla_flags` with each project default appended unless the user set that option."""
  given = {f.lstrip('-').split('=', 1)[0] for f in xla_flags.split()}
  added = [f'--{name}={value}' for name, value, since in DEFAULTS
           if name not in given and version >= since]
  return ' '.join([xla_flags.strip()] + added).strip()


def _backend_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except  (private API; unknown means assume not)
    return False


def apply(environ: dict | None = None) -> str:
  """Puts the defaults into XLA_FLAGS (the process's environment unless given); returns it."""
  env = os.environ if environ is None else environ
  current = env.get('XLA_FLAGS', '')
  if env.get(ENV_OFF, '').strip().lower() in ('0', 'off', 'false', 'no'):
    return current
  wanted = with_defaults(current, jaxlib_version())
  if wanted != current:
    if environ is None and _backend_started():
      logging.warning('XLA_FLAGS set after JAX started its backend; the project defaults '
                      '(%s) take effect in the next process only', wanted)
    env['XLA_FLAGS'] = wanted
  return wanted
