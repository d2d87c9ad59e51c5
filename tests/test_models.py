"""Model shapes, parameter counts, the residual path and the model options."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.errors import UserError


def _model(name, num_classes=10, **kw):
  return models.create_model(ml_collections.ConfigDict(dict(name=name, **kw)), num_classes)


@pytest.mark.parametrize('name,classes,size,expected', [
    ('resnet18', 1000, 224, 11_689_512),   # torchvision's published counts.
    ('resnet50', 1000, 224, 25_557_032),
    ('resnet34', 1000, 224, 21_797_672),
    ('resnet101', 1000, 224, 44_549_160),
])
def test_imagenet_parameter_counts(name, classes, size, expected):
  shapes = jax.eval_shape(lambda: models.init_variables(_model(name, classes),
                                                        jax.random.key(0), size))
  assert models.param_count(shapes['params']) == expected


@pytest.mark.parametrize('name,low,high', [('resnet20', 0.26e6, 0.28e6),
                                           ('resnet56', 0.84e6, 0.87e6),
                                           ('resnet110', 1.7e6, 1.75e6)])
def test_cifar_parameter_counts(name, low, high):
  shapes = jax.eval_shape(lambda: models.init_variables(_model(name), jax.random.key(0), 32))
  assert low <= models.param_count(shapes['params']) <= high


def test_parameter_paths_are_the_public_names():
  v = jax.eval_shape(lambda: models.init_variables(_model('resnet50'), jax.random.key(0), 64))
  p = v['params']
  assert set(p) == {'stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head'}
  assert set(p['stage1']['block0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                        'proj_conv', 'proj_bn'}
  assert 'proj_conv' not in p['stage1']['block1']
  # v1.5: the stride sits on the 3x3 conv; the 1x1 projection carries it too.
  assert p['stage2']['block0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert set(v['batch_stats']['stem']['bn']) == {'mean', 'var'}


def test_forward_shapes_features_and_stems():
  m = _model('resnet20', 7, width_multiplier=0.5)
  x = jnp.ones((2, 16, 16, 3))
  v = models.init_variables(m, jax.random.key(0), 16)
  logits, feats = m.apply(v, x, return_features=True)
  assert logits.shape == (2, 7) and feats.shape == (2, 32)
  assert v['params']['stem']['conv']['kernel'].shape == (3, 3, 3, 8)
  m18 = _model('resnet18', 5, stem='imagenet', width_multiplier=0.125)
  v18 = models.init_variables(m18, jax.random.key(0), 32)
  assert v18['params']['stem']['conv']['kernel'].shape == (7, 7, 3, 8)
  assert m18.apply(v18, jnp.ones((1, 32, 32, 3))).shape == (1, 5)


@pytest.mark.parametrize('block', [models.BasicBlock, models.BottleneckBlock])
def test_block_is_identity_plus_residual(block):
  """With the last BN scale at zero, the residual branch adds nothing: out = relu(x)."""
  features = 4
  channels = features * block.expansion
  b = block(features=features, strides=1, zero_init_residual=True)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, channels))
  v = b.init(jax.random.key(0), x, train=False)
  np.testing.assert_allclose(b.apply(v, x, train=False), jax.nn.relu(x), atol=1e-6)
  # With a non-zero scale the output is relu(x + F(x)) with F(x) != 0.
  last = 'bn2' if block is models.BasicBlock else 'bn3'
  params = jax.tree.map(lambda a: a, v['params'])
  params[last]['scale'] = jnp.ones_like(params[last]['scale'])
  out = b.apply({**v, 'params': params}, x, train=False)
  assert not np.allclose(out, jax.nn.relu(x), atol=1e-3)
  assert np.all(np.asarray(out) >= 0)


def test_projection_when_shape_changes():
  b = models.BasicBlock(features=8, strides=2)
  x = jnp.ones((1, 8, 8, 4))
  v = b.init(jax.random.key(0), x, train=False)
  assert 'proj_conv' in v['params'] and 'proj_bn' in v['params']
  assert b.apply(v, x, train=False).shape == (1, 4, 4, 8)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  m = _model('resnet20', 10, dtype='bfloat16', width_multiplier=0.25)
  v = models.init_variables(m, jax.random.key(0), 8)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  logits, (mutated) = m.apply(v, jnp.ones((2, 8, 8, 3)), train=True, mutable=['batch_stats'])
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mutated))
  hlo = jax.jit(lambda v, x: m.apply(v, x)).lower(v, jnp.ones((2, 8, 8, 3))).as_text()
  assert 'bf16' in hlo


def test_zero_init_residual_and_kaiming_init():
  m = _model('resnet56', 10, zero_init_residual=True)
  p = models.init_variables(m, jax.random.key(0), 32)['params']
  assert np.all(p['stage1']['block0']['bn2']['scale'] == 0)
  assert np.all(p['stage1']['block0']['bn1']['scale'] == 1)
  k = np.asarray(p['stage3']['block5']['conv1']['kernel'])  # fan_out = 3*3*64
  assert abs(k.std() - np.sqrt(2 / (9 * 64))) < 0.1 * np.sqrt(2 / (9 * 64))


def test_dropout_only_in_training():
  m = _model('resnet20', 10, dropout_rate=0.5, width_multiplier=0.25)
  v = models.init_variables(m, jax.random.key(0), 8)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  a = m.apply(v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})[0]
  b = m.apply(v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})[0]
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(m.apply(v, x), m.apply(v, x))


@pytest.mark.parametrize('field,value,message', [
    ('name', 'resnet19', 'unknown model'),
    ('stem', 'tiny', 'unknown stem'),
    ('dtype', 'float8', 'unknown dtype'),
    ('width_multiplier', 0.0, 'must be positive'),
])
def test_bad_model_settings_are_user_errors(field, value, message):
  cfg = dict(name='resnet20')
  cfg[field] = value
  with pytest.raises(UserError, match=message):
    models.create_model(ml_collections.ConfigDict(cfg), 10)
