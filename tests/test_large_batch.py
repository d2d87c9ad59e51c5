"""LARS and LAMB inside the partitioned optimizer: the papers' first step, by hand."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import optim, train
from resnet_jax.errors import UserError
from tests.conftest import tiny_config

LR, WD = 0.5, 0.01


def _tree():
  rng = np.random.default_rng(0)
  leaf = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  params = {'stem': {'conv': {'kernel': leaf(3, 3, 3, 4)}, 'bn': {'scale': leaf(4), 'bias': leaf(4)}},
            'stage1': {'conv': {'kernel': leaf(3, 3, 4, 4)}},
            'head': {'kernel': leaf(4, 10), 'bias': leaf(10)}}
  grads = {'stem': {'conv': {'kernel': leaf(3, 3, 3, 4)}, 'bn': {'scale': leaf(4), 'bias': leaf(4)}},
           'stage1': {'conv': {'kernel': leaf(3, 3, 4, 4)}},
           'head': {'kernel': leaf(4, 10), 'bias': leaf(10)}}
  return params, grads


def _first_update(name, **fields):
  config = tiny_config(**{'optimizer.name': name, 'optimizer.learning_rate': LR,
                          'optimizer.weight_decay': WD, 'optimizer.nesterov': False,
                          'finetune.freeze': '^stage1/', **fields})
  params, grads = _tree()
  spec = optim.build_param_spec(config, params)
  tx = optim.make_optimizer(config, spec, params, optax.constant_schedule(LR))
  updates, _ = tx.update(grads, tx.init(params), params)
  return params, grads, updates


def _norm(x):
  return float(np.linalg.norm(np.asarray(x)))


def test_lars_first_step_is_the_trust_ratio_times_the_decayed_gradient_for_kernels_only():
  params, grads, updates = _first_update('lars', **{'optimizer.trust_coefficient': 0.01})
  for path in (('stem', 'conv', 'kernel'), ('head', 'kernel')):
    w, g, u = (t[path[0]][path[1]][path[2]] if len(path) == 3 else t[path[0]][path[1]]
               for t in (params, grads, updates))
    decayed = np.asarray(g) + WD * np.asarray(w)
    trust = 0.01 * _norm(w) / _norm(decayed)
    np.testing.assert_allclose(u, -LR * trust * decayed, rtol=2e-5)
  # BatchNorm and biases: no decay, no trust ratio: plain momentum SGD's first step.
  for u, g in ((updates['stem']['bn']['scale'], grads['stem']['bn']['scale']),
               (updates['head']['bias'], grads['head']['bias'])):
    np.testing.assert_allclose(u, -LR * np.asarray(g), rtol=1e-6)
  np.testing.assert_array_equal(updates['stage1']['conv']['kernel'], 0.0)   # Frozen.


def test_lamb_first_step_is_the_trust_ratio_times_the_adam_direction_for_kernels_only():
  eps = 1e-6
  params, grads, updates = _first_update('lamb', **{'optimizer.eps': eps})
  adam = lambda g: np.asarray(g) / (np.abs(np.asarray(g)) + eps)   # m_hat / (sqrt(v_hat) + eps)
  w, g = params['head']['kernel'], grads['head']['kernel']
  direction = adam(g) + WD * np.asarray(w)
  np.testing.assert_allclose(updates['head']['kernel'],
                             -LR * _norm(w) / _norm(direction) * direction, rtol=2e-5)
  np.testing.assert_allclose(updates['head']['bias'], -LR * adam(grads['head']['bias']),
                             rtol=1e-5)
  np.testing.assert_array_equal(updates['stage1']['conv']['kernel'], 0.0)   # Frozen.


def test_unknown_optimizer_and_bad_trust_regex_are_one_line():
  with pytest.raises(UserError, match=r"^config\.optimizer\.name: unknown optimizer 'lion'"):
    train.validate_config(tiny_config(**{'optimizer.name': 'lion'}))
  params, _ = _tree()
  config = tiny_config(**{'optimizer.name': 'lars', 'optimizer.trust_ratio_regex': '(('})
  with pytest.raises(UserError, match=r'^config\.optimizer\.trust_ratio_regex: invalid'):
    optim.make_optimizer(config, optim.build_param_spec(config, params), params,
                         optax.constant_schedule(LR))
