"""Schedules, the weight-decay mask, and the parameter spec's partition."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models, optim
from resnet_jax.errors import UserError
from tests.conftest import tiny_config


def _sched(name, **kw):
  c = tiny_config(**{'schedule.name': name, 'optimizer.learning_rate': 1.0, **kw})
  return optim.make_schedule(c, 110)


def test_warmup_then_cosine():
  s = _sched('cosine', **{'schedule.warmup_steps': 10})
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)


def test_constant_and_linear():
  c = _sched('constant', **{'schedule.warmup_steps': 10})
  np.testing.assert_allclose([c(5), c(10), c(109)], [0.5, 1.0, 1.0], atol=1e-6)
  lin = _sched('linear', **{'schedule.warmup_steps': 10, 'schedule.end_factor': 0.1})
  np.testing.assert_allclose([lin(10), lin(60), lin(110)], [1.0, 0.55, 0.1], atol=1e-6)


def test_piecewise_decays_at_fractions_of_the_run():
  s = _sched('piecewise', **{'schedule.warmup_steps': 5, 'schedule.boundaries': (0.5, 0.75),
                             'schedule.decay_factor': 0.1})
  # Boundaries at steps 55 and 82 of 110 (fractions of the whole run, warmup included).
  np.testing.assert_allclose([s(54), s(55), s(81), s(83)], [1.0, 0.1, 0.1, 0.01], atol=1e-6)


def test_piecewise_boundaries_inside_the_warmup_compound():
  # 1000 steps, 700 of warmup, boundaries at steps 300, 600 and 900: each one
  # multiplies the rate by 0.1 at its step, inside the warmup ramp or after it.
  c = tiny_config(**{'schedule.name': 'piecewise', 'optimizer.learning_rate': 1.0,
                     'schedule.warmup_steps': 700, 'schedule.boundaries': (0.3, 0.6, 0.9),
                     'schedule.decay_factor': 0.1})
  s = optim.make_schedule(c, 1000)
  steps = [0, 299, 300, 599, 600, 699, 700, 899, 900, 999]
  expected = [0.0, 299 / 700, 300 / 700 * 0.1, 599 / 700 * 0.1, 600 / 700 * 0.01,
              699 / 700 * 0.01, 0.01, 0.01, 0.001, 0.001]
  np.testing.assert_allclose([float(s(t)) for t in steps], expected, rtol=1e-5, atol=1e-9)


def test_piecewise_boundaries_on_one_step_compound():
  s = _sched('piecewise', **{'schedule.boundaries': (0.5, 0.5), 'schedule.decay_factor': 0.5})
  np.testing.assert_allclose([s(54), s(55), s(109)], [1.0, 0.25, 0.25], atol=1e-7)


def test_warmup_longer_than_the_run_warns_with_both_numbers(caplog):
  c = tiny_config(**{'schedule.name': 'cosine', 'optimizer.learning_rate': 1.0,
                     'schedule.warmup_steps': 70})
  with caplog.at_level(logging.WARNING):
    s = optim.make_schedule(c, 50)
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(messages) == 1 and 'warmup_steps: 70' in messages[0], messages
  assert '(50 steps)' in messages[0]
  np.testing.assert_allclose([s(25), s(49)], [0.5, 0.98], atol=1e-6)  # Clipped to 50 steps.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    optim.make_schedule(c, 70)                 # As long as the run: nothing to say.
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_unknown_schedule_and_bad_boundaries():
  with pytest.raises(UserError, match='unknown schedule'):
    _sched('step')
  with pytest.raises(UserError, match='boundaries'):
    _sched('piecewise', **{'schedule.boundaries': (30.0,)})


def test_total_steps_steps_win_over_epochs():
  c = tiny_config(num_train_steps=7, num_epochs=3.0, batch_size=10)
  assert optim.total_steps_from_config(c, 100) == 7
  c.num_train_steps = -1
  assert optim.total_steps_from_config(c, 100) == 30


def _params():
  m = models.create_model(tiny_config().model, 10)
  return jax.jit(lambda r: models.init_variables(m, r, 8))(jax.random.key(0))['params']


def test_weight_decay_mask_skips_batchnorm_and_biases():
  params = _params()
  spec = optim.build_param_spec(tiny_config(), params)
  for path, decays in spec.decay.items():
    assert decays == path.endswith('/kernel'), path
  assert spec.decay['head/kernel'] and not spec.decay['head/bias']
  assert not spec.decay['stem/bn/scale']


def test_weight_decay_is_applied_only_where_masked():
  """With zero gradients, SGD moves exactly the decayed leaves, by lr * wd * w."""
  params = _params()
  c = tiny_config(**{'optimizer.momentum': 0.0, 'optimizer.nesterov': False,
                     'optimizer.weight_decay': 0.1})
  spec = optim.build_param_spec(c, params)
  tx = optim.make_optimizer(c, spec, params, optax.constant_schedule(0.5))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for path, u in optim.flat_paths(updates).items():
    w = optim.flat_paths(params)[path]
    expected = -0.5 * 0.1 * w if spec.decay[path] else jnp.zeros_like(w)
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-7, err_msg=path)


def test_spec_freeze_regex_bn_and_stop_gradient_agree():
  params = _params()
  c = tiny_config(**{'finetune.freeze': '^(stem|stage1)/'})
  spec = optim.build_param_spec(c, params)
  frozen = set(spec.frozen_paths())
  assert frozen == {p for p in optim.flat_paths(params) if p.startswith(('stem/', 'stage1/'))}
  assert spec.frozen_bn == {m.rsplit('/', 1)[0] for m in frozen if m.endswith('/scale')}
  assert 'stem/bn' in spec.frozen_bn and 'stage1/block2/bn2' in spec.frozen_bn
  assert spec.stop_gradient_after == 'stage1'
  # freeze_stages=1 is the same set.
  c2 = tiny_config(**{'finetune.freeze_stages': 1})
  assert set(optim.build_param_spec(c2, params).frozen_paths()) == frozen
  # A non-prefix freeze (only stage2) has no stop-gradient boundary.
  c3 = tiny_config(**{'finetune.freeze': '^stage2/'})
  assert optim.build_param_spec(c3, params).stop_gradient_after is None


def test_frozen_leaves_have_no_optimizer_state_and_no_updates():
  params = _params()
  c = tiny_config(**{'finetune.freeze': '^(stem|stage1)/', 'optimizer.weight_decay': 0.1})
  spec = optim.build_param_spec(c, params)
  tx = optim.make_optimizer(c, spec, params, optax.constant_schedule(0.1))
  state = tx.init(params)
  trainable = sum(x.size for p, x in optim.flat_paths(params).items()
                  if spec.labels[p] != optim.FROZEN)
  # Momentum buffers exist only for trainable leaves.
  state_sizes = sum(x.size for x in jax.tree.leaves(state) if getattr(x, 'ndim', 0) > 0)
  assert state_sizes == trainable
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, state, params)
  for p, u in optim.flat_paths(updates).items():
    assert bool(jnp.all(u == 0)) == (spec.labels[p] == optim.FROZEN), p


def test_head_lr_multiplier_scales_head_updates():
  params = _params()
  c = tiny_config(**{'finetune.head_lr_multiplier': 10.0, 'optimizer.weight_decay': 0.0,
                     'optimizer.momentum': 0.0, 'optimizer.nesterov': False})
  spec = optim.build_param_spec(c, params)
  tx = optim.make_optimizer(c, spec, params, optax.constant_schedule(0.01))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  flat = optim.flat_paths(updates)
  np.testing.assert_allclose(flat['head/kernel'], -0.1)
  np.testing.assert_allclose(flat['stage1/block0/conv1/kernel'], -0.01)


def test_regex_that_matches_nothing_is_an_error():
  params = _params()
  with pytest.raises(UserError, match='matches no parameter'):
    optim.build_param_spec(tiny_config(**{'finetune.freeze': '^stage9/'}), params)
  with pytest.raises(UserError, match='invalid regular expression'):
    optim.build_param_spec(tiny_config(**{'finetune.freeze': '(['}), params)
  with pytest.raises(UserError, match='every parameter is frozen'):
    optim.build_param_spec(tiny_config(**{'finetune.freeze': '.'}), params)


def test_adamw_decays_only_masked_leaves():
  params = _params()
  c = tiny_config(**{'optimizer.name': 'adamw', 'optimizer.weight_decay': 0.5})
  spec = optim.build_param_spec(c, params)
  tx = optim.make_optimizer(c, spec, params, optax.constant_schedule(0.1))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat = optim.flat_paths(updates)
  np.testing.assert_allclose(flat['head/kernel'], -0.1 * 0.5 * optim.flat_paths(params)['head/kernel'], rtol=1e-5)
  assert np.all(np.asarray(flat['head/bias']) == 0)


def test_label_smoothing_cross_entropy():
  logits = jnp.zeros((1, 4))
  np.testing.assert_allclose(optim.cross_entropy(logits, jnp.array([1]), 4), np.log(4), rtol=1e-6)
  # By hand: smoothed targets are (1 - eps) * one_hot + eps / K, here 0.925 for the
  # label and 0.025 for the others, and the loss is -sum(t * log_softmax(z)).
  z = np.array([10.0, 2.0, 0.0, -1.0])
  log_softmax = z - np.log(np.exp(z).sum())
  for label in (0, 2):
    targets = np.full(4, 0.1 / 4)
    targets[label] += 0.9
    expected = -(targets * log_softmax).sum()
    got = optim.cross_entropy(jnp.asarray(z[None]), jnp.array([label]), 4, 0.1)
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


# Freezing only the BatchNorm layers: frozen parameters that are not a prefix, so their
# gradients are not zero and must be kept out of clipping and the reported norm.
_BN_ONLY = {'finetune.freeze': r'(^|/)(proj_)?bn\d*/', 'optimizer.grad_clip_norm': 0.5,
            'optimizer.momentum': 0.0, 'optimizer.nesterov': False,
            'optimizer.weight_decay': 0.0, 'schedule.name': 'constant',
            'schedule.warmup_steps': 0}


def test_clipping_counts_only_trainable_gradients():
  params = _params()
  c = tiny_config(**_BN_ONLY)
  spec = optim.build_param_spec(c, params)
  assert 'stem/bn/scale' in spec.frozen_paths() and spec.stop_gradient_after is None
  tx = optim.make_optimizer(c, spec, params, optax.constant_schedule(1.0))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  trainable = sum(x.size for p, x in optim.flat_paths(params).items()
                  if spec.labels[p] != optim.FROZEN)
  for p, u in optim.flat_paths(updates).items():
    expected = 0.0 if spec.labels[p] == optim.FROZEN else -0.5 / np.sqrt(trainable)
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=p)


def test_train_step_clips_and_reports_the_norm_of_trainable_gradients():
  """One step of the product's own step (train.Setup, jit on 4 devices) against a hand
  computation over the trainable gradients only."""
  from resnet_jax import train  # pylint: disable=import-outside-toplevel
  c = tiny_config(**_BN_ONLY)
  setup = train.Setup(c, 10, 100, 8)
  state = setup.make_state(setup.fresh_variables)
  train_step, _ = setup.steps()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32)}

  def loss_fn(params):
    logits, _ = setup.model.apply({'params': params, 'batch_stats': state['batch_stats']},
                                  batch['image'], train=True, mutable=['batch_stats'])
    return optim.cross_entropy(logits, batch['label'], 10).mean()

  grads = optim.flat_paths(jax.jit(jax.grad(loss_fn))(state['params']))
  frozen = set(setup.spec.frozen_paths())
  assert any(np.abs(grads[p]).max() > 0 for p in frozen)  # Frozen, yet with gradients.
  norm = np.sqrt(sum(np.sum(np.square(g)) for p, g in grads.items() if p not in frozen))
  assert norm > 0.5   # So the clipping acts.
  new, metrics = train_step(setup.par.put_state(state), setup.par.put_batch(batch))
  np.testing.assert_allclose(float(setup.par.get_metrics(metrics)['grad_norm']), norm,
                             rtol=1e-4)
  before = optim.flat_paths(state['params'])
  after = optim.flat_paths(setup.par.get_state(new)['params'])
  lr = float(c.optimizer.learning_rate)
  for p, g in grads.items():
    expected = before[p] if p in frozen else before[p] - lr * g * 0.5 / norm
    np.testing.assert_allclose(after[p], expected, rtol=1e-4, atol=1e-6, err_msg=p)
