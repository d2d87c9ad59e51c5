"""Convolutions as patches @ kernel on CPU where XLA's convolution has a cliff (conv_lowering.py)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import conv_lowering, models
from tests.conftest import tiny_config

NHWC = ('NHWC', 'HWIO', 'NHWC')
# The product's rule (tests elsewhere may pin XLA's convolution).
PRODUCT_MAX_PIXELS = conv_lowering.DEFAULT_PATCHES_MAX_OUTPUT_PIXELS


def _xla(x, w, stride, pad):
  return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=NHWC)


def _patches(x, w, stride, pad):
  return conv_lowering.conv_as_patches(x, w, (stride, stride), ((pad, pad), (pad, pad)))


@pytest.mark.parametrize('shape,kernel,stride,pad', [
    ((2, 2, 2, 8), 3, 1, 1),    # ResNet-50 at 64px, stage 4: the cliff.
    ((2, 4, 4, 8), 3, 2, 1),    # The strided block into it.
    ((2, 1, 1, 8), 3, 1, 1),    # 32px inputs: 1x1 maps.
    ((3, 5, 7, 4), 3, 2, 1),    # Odd, non-square sizes.
    ((2, 9, 9, 3), 7, 2, 3),    # A stem-like 7x7.
])
def test_patches_equal_xla_convolution_and_its_gradients(shape, kernel, stride, pad):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 6)).astype(np.float32))
  dy = None
  outs = {}
  for name, f in (('xla', _xla), ('patches', _patches)):
    y, vjp = jax.vjp(lambda x, w, f=f: f(x, w, stride, pad), x, w)
    if dy is None:
      dy = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    outs[name] = (y,) + vjp(dy)
  for a, b in zip(outs['xla'], outs['patches']):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)


def test_the_rule_takes_only_tiny_cpu_outputs(monkeypatch):
  monkeypatch.setattr(conv_lowering, 'PATCHES_MAX_OUTPUT_PIXELS', PRODUCT_MAX_PIXELS)
  def uses(h, stride=1, kernel=3, platform='cpu', dn=NHWC, pad=1):
    x = jax.ShapeDtypeStruct((8, h, h, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, 16, 16), jnp.float32)
    return conv_lowering.use_patches(x, w, (stride, stride), ((pad, pad), (pad, pad)), dn,
                                     platform=platform)
  assert uses(2) and uses(1) and uses(4, stride=2)   # 2x2 and 1x1 outputs.
  assert not uses(4) and not uses(8) and not uses(32)  # 16 pixels and more: XLA's own.
  assert not uses(2, kernel=1, pad=0)                  # 1x1 kernels are matmuls already.
  assert not uses(2, platform='gpu') and not uses(2, platform='tpu')
  assert not uses(2, dn=('NCHW', 'OIHW', 'NCHW'))


def _conv_count(jaxpr):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'conv_general_dilated'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _conv_count(sub)
  return n


def test_model_uses_patches_at_tiny_maps_and_matches_xla(monkeypatch):
  """A ResNet-18 on 16px images ends in 2x2 maps: its stage-4 3x3 convolutions become matmuls,
  and the logits match XLA's convolutions everywhere to float rounding."""
  monkeypatch.setattr(conv_lowering, 'PATCHES_MAX_OUTPUT_PIXELS', PRODUCT_MAX_PIXELS)
  m = tiny_config().model
  m.name, m.stem, m.width_multiplier = 'resnet18', 'cifar', 0.125
  model = models.create_model(m, 5)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  ours = jax.make_jaxpr(apply)(variables, x).jaxpr
  total = sum(1 for p in jax.tree_util.tree_leaves_with_path(variables['params'])
              if p[1].ndim == 4)
  stage4_3x3 = sum(1 for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
                   if 'stage4' in jax.tree_util.keystr(path) and leaf.shape[:2] == (3, 3))
  assert stage4_3x3 == 4
  assert _conv_count(ours) == total - stage4_3x3

  original = conv_lowering.PATCHES_MAX_OUTPUT_PIXELS
  try:
    conv_lowering.PATCHES_MAX_OUTPUT_PIXELS = 0  # XLA's convolution everywhere.
    xla_apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731  (a fresh trace)
    assert _conv_count(jax.make_jaxpr(xla_apply)(variables, x).jaxpr) == total
    reference = jax.jit(xla_apply)(variables, x)
  finally:
    conv_lowering.PATCHES_MAX_OUTPUT_PIXELS = original
  np.testing.assert_allclose(np.asarray(jax.jit(apply)(variables, x)), np.asarray(reference),
                             rtol=1e-5, atol=1e-5)
