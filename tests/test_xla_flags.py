"""The project's process-wide XLA options (resnet_jax/xla_flags.py)."""

import os
import subprocess
import sys

from resnet_jax import xla_flags
from tests.conftest import REPO

YNN = 'xla_cpu_experimental_ynn_fusion_type'


def test_defaults_are_appended_unless_the_user_set_the_option():
  added = xla_flags.with_defaults('--xla_force_host_platform_device_count=4', (0, 10, 2))
  assert added.split() == ['--xla_force_host_platform_device_count=4',
                           f'--{YNN}=-individual_convolution']
  # The user's own value wins, whatever it is (even empty: YNNPACK off altogether).
  for own in (f'--{YNN}=', f'--{YNN}=-individual_dot', f'{YNN}=-individual_dot'):
    assert xla_flags.with_defaults(own, (0, 10, 2)) == own
  # A jaxlib that may not know the option (XLA aborts on unknown options) gets nothing.
  assert xla_flags.with_defaults('', (0, 9, 9)) == ''
  assert xla_flags.with_defaults('', ()) == ''
  assert xla_flags._version('0.10.2') == (0, 10, 2)
  assert xla_flags._version('0.11.0rc1') == (0, 11, 0)


def test_apply_writes_the_environment_and_can_be_switched_off():
  env = {'XLA_FLAGS': '--foo=1'}
  assert xla_flags.apply(env) == env['XLA_FLAGS']
  assert env['XLA_FLAGS'].startswith('--foo=1 ')
  assert xla_flags.apply(env) == env['XLA_FLAGS']  # Idempotent.
  assert env['XLA_FLAGS'].count(YNN) == 1
  off = {'XLA_FLAGS': '--foo=1', xla_flags.ENV_OFF: 'off'}
  xla_flags.apply(off)
  assert off['XLA_FLAGS'] == '--foo=1'


# Compiles a filter gradient at a size where jaxlib 0.10's XLA:CPU hands the convolution to
# YNNPACK by default; prints how many YNNPACK fusions hold a convolution.
_PROBE = r'''
import re
import resnet_jax
import jax, jax.numpy as jnp
from jax import lax
x = jnp.ones((32, 16, 16, 32)); w = jnp.ones((3, 3, 32, 32))
f = jax.jit(jax.grad(lambda w: lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()))
text = f.lower(w).compile().as_text()
calls = re.findall(r'calls=%([\w.\-]+), backend_config=\{"fusion_config":\{"kind":"__ynn_fusion"', text)
bodies = [re.search(r'^%' + re.escape(c) + r' .*?\n\}', text, re.M | re.S).group(0) for c in calls]
print(sum('convolution(' in b for b in bodies), text.count('convolution('))
'''


def _ynn_convolutions(xla_flags_value):
  env = dict(os.environ, XLA_FLAGS=xla_flags_value, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop(xla_flags.ENV_OFF, None)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True).stdout.split()
  return int(out[0]), int(out[1])


def test_import_resnet_jax_takes_cpu_convolutions_away_from_ynnpack():
  in_ynn, total = _ynn_convolutions('')
  assert total >= 1 and in_ynn == 0
  # The check can fail: with the user's own setting (which wins) YNNPACK keeps the convolution.
  in_ynn, _ = _ynn_convolutions(f'--{YNN}=-individual_dot')
  assert in_ynn >= 1
