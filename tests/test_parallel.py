"""jit over 1 and 4 devices and pmap over 4 give the same training result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models, optim, parallel, train
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason='needs 4 (virtual) devices')


def _run(mode, devices, steps=3, accum=1, frozen_bn=frozenset()):
  c = tiny_config(**{'optimizer.weight_decay': 1e-3, 'grad_accum_steps': accum})
  par = parallel.Parallel(mode, devices)
  model = models.create_model(c.model, 10, bn_axis_name=par.bn_axis_name, frozen_bn=frozen_bn)
  plain = models.create_model(c.model, 10)
  variables = models.init_variables(plain, jax.random.key(0), 8)
  spec = optim.build_param_spec(c, variables['params'])
  schedule = optim.make_schedule(c, 10)
  tx = optim.make_optimizer(c, spec, variables['params'], schedule)
  state = {'step': jnp.asarray(0, jnp.int32), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': tx.init(variables['params'])}
  step = par.compile(train.make_train_step(model, tx, schedule, 10, grad_accum_steps=accum))
  state = par.put_state(state)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = {'image': rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 10, 16).astype(np.int32)}
    state, metrics = step(state, par.put_batch(batch))
    losses.append(float(par.get_metrics(metrics)['loss']))
  return par.get_state(state), losses


def _close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_jit_on_four_devices_and_pmap_match_one_device():
  one, l1 = _run('jit', jax.devices()[:1])
  four, l4 = _run('jit', jax.devices()[:4])
  pm, lp = _run('pmap', jax.devices()[:4])
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  np.testing.assert_allclose(l1, lp, rtol=1e-5)
  for other in (four, pm):
    _close(one['params'], other['params'])
    _close(one['batch_stats'], other['batch_stats'])
  # The state really moved, so the comparison is not between two initial states.
  assert l1[0] != l1[-1]


def test_sharded_batch_lives_on_all_devices():
  par = parallel.Parallel('jit', jax.devices()[:4])
  batch = par.put_batch({'x': np.arange(8, dtype=np.float32)})
  assert len(batch['x'].sharding.device_set) == 4
  assert batch['x'].addressable_shards[0].data.shape == (2,)


def test_gradient_accumulation_gives_the_large_batch_update():
  """With BatchNorm on running averages (so no batch dependence), 4 micro-batches of 4
  give the same update as one batch of 16."""
  shapes = jax.eval_shape(lambda: models.init_variables(
      models.create_model(tiny_config().model, 10), jax.random.key(0), 8))
  all_bn = frozenset(optim.path_str(p).rsplit('/', 1)[0] for p, _ in
                     jax.tree_util.tree_flatten_with_path(shapes['batch_stats'])[0])
  big, lb = _run('jit', jax.devices()[:1], frozen_bn=all_bn)
  acc, la = _run('jit', jax.devices()[:1], accum=4, frozen_bn=all_bn)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  _close(big['params'], acc['params'], rtol=1e-5, atol=1e-6)
  assert lb[0] != lb[-1]
