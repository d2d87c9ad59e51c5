"""jit over 1 and 4 devices and pmap over 3 and 4 give the same training result;
gradient accumulation keeps the data parallelism; pmap's device list and inputs."""

import dataclasses
import os
import re
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import conv_lowering, models, optim, parallel, train
from resnet_jax.errors import UserError
from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason='needs 4 (virtual) devices')


@pytest.fixture(autouse=True)
def resnet8(monkeypatch):
  """ResNet-8, one block per stage, for these tests only: what they check holds per block
  (BatchNorm, projections, frozen stages), and it compiles in a fraction of ResNet-20's time."""
  monkeypatch.setitem(models.ARCHS, 'resnet8',
                      dataclasses.replace(models.ARCHS['resnet20'], stage_sizes=(1, 1, 1)))


def _config(**overrides):
  return tiny_config(**{'model.name': 'resnet8', **overrides})


def _setup(mode, devices, accum=1, frozen_bn=None, pretrained_stats=False, exact=False,
           **overrides):
  """(par, model, tx, schedule, initial host state) for the tiny model.

  `pretrained_stats`: BatchNorm statistics like a trained network's, not the exact
  0 and 1 of a fresh one (any mean of identical 0s or 1s is exact).
  """
  c = _config(**{'optimizer.weight_decay': 1e-3, 'grad_accum_steps': accum, **overrides})
  par = parallel.Parallel(mode, devices, exact=exact)
  plain = models.create_model(c.model, 10)
  variables = models.init_variables(plain, jax.random.key(0), 8)
  if pretrained_stats:
    rng = np.random.default_rng(1)
    variables['batch_stats'] = jax.tree.map(
        lambda x: (x + rng.uniform(0.1, 2.0, x.shape)).astype(np.float32),
        variables['batch_stats'])
  spec = optim.build_param_spec(c, variables['params'])
  frozen_bn = spec.frozen_bn if frozen_bn is None else frozen_bn
  model = models.create_model(c.model, 10, bn_axis_name=par.bn_axis_name, frozen_bn=frozen_bn,
                              exact_bn=exact)
  schedule = optim.make_schedule(c, 10)
  tx = optim.make_optimizer(c, spec, variables['params'], schedule)
  state = {'step': jnp.asarray(0, jnp.int32), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': tx.init(variables['params'])}
  return par, model, tx, schedule, state


def _batches(steps, batch_size):
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(batch_size, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, batch_size).astype(np.int32)} for _ in range(steps)]


def _run(mode, devices, steps=3, accum=1, frozen_bn=None, batch_size=16,
         pretrained_stats=False, exact=False, **overrides):
  par, model, tx, schedule, state = _setup(mode, devices, accum, frozen_bn, pretrained_stats,
                                           exact, **overrides)
  step = par.compile(train.make_train_step(model, tx, schedule, 10, grad_accum_steps=accum,
                                           exact_reductions=exact))
  state = par.put_state(state)
  losses = []
  for batch in _batches(steps, batch_size):
    state, metrics = step(state, par.put_batch(batch))
    losses.append(float(par.get_metrics(metrics)['loss']))
  return par.get_state(state), losses


def _close(a, b, rtol=2e-5, atol=2e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _all_bn():
  shapes = jax.eval_shape(lambda: models.init_variables(
      models.create_model(_config().model, 10), jax.random.key(0), 8))
  return frozenset(optim.path_str(p).rsplit('/', 1)[0] for p, _ in
                   jax.tree_util.tree_flatten_with_path(shapes['batch_stats'])[0])


def test_jit_on_four_devices_and_pmap_match_one_device():
  """Also with exact (device-ordered) reductions, under jit (shard_map over the mesh) and
  pmap: the same mathematics, so within rounding of one device. (The two modes compile
  their per-device programs differently, so they differ in last bits; one mode on 2
  processes x 2 devices equals itself on 1 x 4 bit for bit: test_distributed.py.)"""
  one, l1 = _run('jit', jax.devices()[:1])
  four, l4 = _run('jit', jax.devices()[:4])
  pm, lp = _run('pmap', jax.devices()[:4])
  jx, ljx = _run('jit', jax.devices()[:4], exact=True)
  px, lpx = _run('pmap', jax.devices()[:4], exact=True)
  for other_losses in (l4, lp, ljx, lpx):
    np.testing.assert_allclose(l1, other_losses, rtol=1e-5)
  for other in (four, pm, jx, px):
    _close(one['params'], other['params'])
    _close(one['batch_stats'], other['batch_stats'])
  # The state really moved, so the comparison is not between two initial states.
  assert l1[0] != l1[-1]


def test_sharded_batch_lives_on_all_devices():
  par = parallel.Parallel('jit', jax.devices()[:4])
  batch = par.put_batch({'x': np.arange(8, dtype=np.float32)})
  assert len(batch['x'].sharding.device_set) == 4
  assert batch['x'].addressable_shards[0].data.shape == (2,)


def test_pmap_put_batch_puts_one_slice_on_each_device():
  """So prefetch_to_device has the next batch on the devices while a step runs."""
  par = parallel.Parallel('pmap', jax.devices()[:4])
  batch = par.put_batch({'x': np.arange(8, dtype=np.float32)})
  assert isinstance(batch['x'], jax.Array)
  assert batch['x'].sharding.device_set == set(jax.devices()[:4])
  shards = sorted(batch['x'].addressable_shards, key=lambda s: s.index[0].start)
  assert [s.device for s in shards] == jax.devices()[:4]
  np.testing.assert_array_equal(np.asarray(shards[1].data), [[2.0, 3.0]])


def test_gradient_accumulation_gives_the_large_batch_update_on_one_and_four_devices():
  """With BatchNorm on running averages (so no batch dependence), 4 micro-batches of 4
  give the same update as one batch of 16, under jit on 1 and 4 devices and pmap on 4."""
  all_bn = _all_bn()
  big, lb = _run('jit', jax.devices()[:1], frozen_bn=all_bn)
  assert lb[0] != lb[-1]
  for mode, devices in (('jit', jax.devices()[:1]), ('jit', jax.devices()[:4]),
                        ('pmap', jax.devices()[:4])):
    acc, la = _run(mode, devices, accum=4, frozen_bn=all_bn)
    np.testing.assert_allclose(lb, la, rtol=1e-5, err_msg=f'{mode} on {len(devices)}')
    _close(big['params'], acc['params'], rtol=1e-5, atol=1e-6)


def _hand_accumulated_step(model, tx, state, batch, k):
  """One update from the mean gradient over micro-batches x[i::k], on one device, with
  BatchNorm in training mode normalising each micro-batch by its own statistics."""
  def loss_fn(params, batch_stats, images, labels):
    logits, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    return optim.cross_entropy(logits, labels, 10).mean(), mutated['batch_stats']

  grads, losses, batch_stats = [], [], state['batch_stats']
  for i in range(k):
    (loss, batch_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], batch_stats, batch['image'][i::k], batch['label'][i::k])
    grads.append(g)
    losses.append(loss)
  mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
  updates, _ = tx.update(mean, state['opt_state'], state['params'])
  return optax.apply_updates(state['params'], updates), batch_stats, sum(losses) / k


def test_accumulation_with_batchnorm_in_training_mode_uses_strided_micro_batches():
  """The documented semantics: micro-batch i is examples i, i+k, ... of the global batch,
  and BatchNorm normalises each with its statistics over all devices."""
  k, batch = 2, _batches(1, 16)[0]
  par, model, tx, _, state = _setup('jit', jax.devices()[:1], **{'schedule.warmup_steps': 0})
  params, batch_stats, loss = jax.jit(
      lambda s, b: _hand_accumulated_step(model, tx, s, b, k))(state, batch)
  for mode, devices in (('jit', jax.devices()[:4]), ('pmap', jax.devices()[:4])):
    par, model, tx, schedule, state = _setup(mode, devices, accum=k,
                                             **{'schedule.warmup_steps': 0})
    step = par.compile(train.make_train_step(model, tx, schedule, 10, grad_accum_steps=k))
    new, metrics = step(par.put_state(state), par.put_batch(batch))
    new = par.get_state(new)
    where = f'{mode} on {len(devices)}'
    np.testing.assert_allclose(float(par.get_metrics(metrics)['loss']), float(loss), rtol=1e-5,
                               err_msg=where)
    _close(new['params'], params, rtol=1e-4, atol=1e-6)
    _close(new['batch_stats'], batch_stats, rtol=1e-4, atol=1e-6)
  # The update moved the parameters, so the comparison is not of two initial states.
  assert not np.allclose(params['head']['kernel'], state['params']['head']['kernel'])


def test_accumulation_keeps_each_device_on_its_own_shard(monkeypatch):
  """In the compiled 4-device program, no images move between devices and every forward
  convolution sees B/(D*k) examples per micro-batch."""
  # Every convolution as XLA's own (on CPU, tiny maps would be patch matmuls, not counted).
  monkeypatch.setattr(conv_lowering, 'PATCHES_MAX_OUTPUT_PIXELS', 0)
  batch_size, d, k = 16, 4, 2   # As in the test above, so the compiled program is shared.
  par, model, tx, schedule, state = _setup('jit', jax.devices()[:d], accum=k,
                                           **{'schedule.warmup_steps': 0})
  step = par.compile(train.make_train_step(model, tx, schedule, 10, grad_accum_steps=k))
  hlo = step.lower(par.put_state(state),
                   par.put_batch(_batches(1, batch_size)[0])).compile().as_text()
  assert 'all-gather' not in hlo
  forward = re.findall(r'= f32\[(\d+),[\d,]*\]\{[\d,]*\} convolution\(.*op_name="'
                       r'[^"]*/jvp\(ResNet\)/[^"]*"', hlo)
  assert len(forward) == 9   # ResNet-8: the stem, 6 block and 2 projection convolutions.
  assert set(forward) == {str(batch_size // (d * k))}


@pytest.mark.parametrize('num_devices', [3, 4])
def test_frozen_batchnorm_statistics_stay_bit_identical_under_pmap(num_devices):
  """BatchNorm averages its statistics over the devices itself; averaging again in the
  step is inexact on 3 devices and moved the frozen statistics by an ulp per step."""
  freeze = {'finetune.freeze': '^(stem|stage1)/', 'schedule.warmup_steps': 0,
            'pretrained_stats': True}
  _, _, _, _, initial = _setup('pmap', jax.devices()[:num_devices], **freeze)
  final, _ = _run('pmap', jax.devices()[:num_devices], steps=3, batch_size=12, **freeze)
  moved = 0
  for tree in ('params', 'batch_stats'):
    before, after = optim.flat_paths(initial[tree]), optim.flat_paths(final[tree])
    for path, x in before.items():
      if path.startswith(('stem/', 'stage1/')):
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(x), err_msg=path)
      else:
        moved += not np.array_equal(np.asarray(after[path]), np.asarray(x))
  assert moved > 0   # The rest trained.


def test_pmap_gets_the_same_global_device_list_on_every_process(monkeypatch):
  """pmap's mesh must be identical everywhere; a per-process list of local devices
  made each process average over its own devices only."""
  seen = []
  monkeypatch.setattr(jax, 'pmap', lambda fn, **kw: seen.append(kw['devices']) or fn)
  for process in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    parallel.Parallel('pmap', jax.devices()[:4]).compile(lambda s, b, axis_name=None: s)
  assert seen[0] == seen[1] == tuple(jax.devices()[:4])


_TWO_PROCESS_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[3])
import jax
import numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'localhost:{sys.argv[2]}', num_processes=2, process_id=int(sys.argv[1]))
from resnet_jax import parallel

def step(state, batch, axis_name=None):
  total = jax.lax.psum(batch['x'].sum(), axis_name)
  return state + total, {'devices': jax.lax.psum(1, axis_name)}

par = parallel.Parallel('pmap')
state = par.put_state(np.float32(0))
local = np.arange(8, dtype=np.float32)[4 * jax.process_index():4 * (jax.process_index() + 1)]
state, metrics = par.compile(step)(state, par.put_batch({'x': local}))
print('RESULT', int(par.get_metrics(metrics)['devices']), float(par.get_state(state)))
"""


def test_pmap_over_two_processes_reduces_over_all_their_devices():
  """Two real processes with two CPU devices each: every collective spans all four."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_SCRIPT, str(i), str(port), REPO],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:   # One that failed leaves the other waiting for it.
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-3:] == ['RESULT', '4', '28.0']   # sum(range(8)) over 4 devices.


def test_pmap_device_order_groups_each_process_and_needs_equal_counts(monkeypatch):
  dev = lambda i, p: types.SimpleNamespace(id=i, process_index=p)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  order = parallel.pmap_device_order([dev(0, 0), dev(1, 1), dev(2, 0), dev(3, 1)])
  assert [d.id for d in order] == [0, 2, 1, 3]
  with pytest.raises(UserError, match='config.parallelism: .*same number of devices'):
    parallel.pmap_device_order([dev(0, 0), dev(1, 0), dev(2, 1)])
  with pytest.raises(UserError, match='config.parallelism'):
    parallel.pmap_device_order([dev(0, 0), dev(1, 0)])   # Process 1 holds none.
