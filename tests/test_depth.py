"""Stochastic depth (model.drop_path_rate) and rematerialisation (model.remat)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.errors import UserError
from tests.conftest import tiny_config as _tiny_config


@pytest.fixture(autouse=True)
def resnet8(monkeypatch):
  """ResNet-8, one block per stage (three blocks, one rate each, two projections), for
  these tests only: what they check holds per block, and it compiles in a fraction of
  ResNet-20's time."""
  monkeypatch.setitem(models.ARCHS, 'resnet8',
                      dataclasses.replace(models.ARCHS['resnet20'], stage_sizes=(1, 1, 1)))


def tiny_config(**overrides):
  return _tiny_config(**{'model.name': 'resnet8', **overrides})


def test_rates_rise_linearly_from_zero_at_the_first_block_to_the_rate_at_the_last():
  rates = models.drop_path_rates((3, 3, 3), 0.2)
  np.testing.assert_allclose(rates, [0.2 * i / 8 for i in range(9)])
  assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
  assert models.drop_path_rates((2, 2, 2, 2), 0.0) == [0.0] * 8


class _Branch(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, y, train):
    return models.drop_path(self, y, self.rate, train)


def test_drop_path_drops_whole_examples_and_scales_the_kept_ones():
  y = jnp.ones((4000, 2, 2, 3))
  out = np.asarray(_Branch(0.25).apply({}, y, True, rngs={'dropout': jax.random.key(0)}))
  per_example = out.reshape(4000, -1)
  assert (per_example == per_example[:, :1]).all()          # One decision per example.
  assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
  assert (per_example[:, 0] == 0).mean() == pytest.approx(0.25, abs=0.03)
  assert per_example.mean() == pytest.approx(1.0, abs=0.05)  # The expectation is kept.
  np.testing.assert_array_equal(_Branch(0.25).apply({}, y, False), y)   # Identity in eval.


def test_a_model_with_stochastic_depth_is_the_plain_model_in_evaluation():
  plain = models.create_model(tiny_config().model, 10)
  deep = models.create_model(tiny_config(**{'model.drop_path_rate': 0.5}).model, 10)
  variables = models.init_variables(plain, jax.random.key(0), 8)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  np.testing.assert_array_equal(plain.apply(variables, x), deep.apply(variables, x))
  trained = lambda m: m.apply(variables, x, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(2)})[0]
  assert not np.array_equal(trained(plain), trained(deep))   # Training mode drops branches.


def test_remat_keeps_the_parameter_paths_and_the_gradients_and_saves_memory():
  """Compiled as training compiles it (`models.compiler_options`), the remat step keeps
  fewer temporaries and gives the same gradients to float32 rounding: the recomputed
  forward pass is fused on its own and may sum in another order. (Without the option
  XLA:CPU merged the recomputation away: bit-identical gradients, no memory saved.)"""
  config = tiny_config(**{'model.drop_path_rate': 0.2})
  plain = models.create_model(config.model, 10)
  config.model.remat = 'blocks'
  remat = models.create_model(config.model, 10)
  options = models.compiler_options(config.model, 'cpu')
  assert options is not None and models.compiler_options(config.model, 'gpu') is None
  size = 16
  variables = models.init_variables(plain, jax.random.key(0), size)
  assert (jax.tree.structure(models.init_variables(remat, jax.random.key(0), size)) ==
          jax.tree.structure(variables))
  x = jax.random.normal(jax.random.key(1), (8, size, size, 3))

  def compiled(model, options):
    def loss(p):
      out, _ = model.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(3)})
      return jnp.mean(out ** 2)
    return jax.jit(jax.grad(loss), compiler_options=options).lower(
        variables['params']).compile()

  step, step_remat = compiled(plain, None), compiled(remat, options)
  for a, b in zip(jax.tree.leaves(step(variables['params'])),
                  jax.tree.leaves(step_remat(variables['params']))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(step_remat) < 0.8 * temp(step), (temp(step_remat), temp(step))


@pytest.mark.parametrize('field, value, message', [
    ('model.drop_path_rate', 1.0, r'^config\.model\.drop_path_rate: must be in \[0, 1\)'),
    ('model.remat', 'all', r"^config\.model\.remat: choose 'none' or 'blocks'"),
])
def test_bad_depth_fields_are_one_line(field, value, message):
  with pytest.raises(UserError, match=message):
    models.create_model(tiny_config(**{field: value}).model, 10)
