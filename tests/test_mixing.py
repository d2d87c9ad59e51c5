"""mixup / CutMix (resnet_jax/mixing.py): targets, boxes, partners, keys, losses, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import mixing, train
from resnet_jax.errors import UserError

MIXUP = {'mixup_alpha': 0.4, 'cutmix_alpha': 0.0, 'prob': 1.0, 'switch_prob': 0.5}
CUTMIX = {'mixup_alpha': 0.0, 'cutmix_alpha': 1.0, 'prob': 1.0, 'switch_prob': 0.5}


def _batch(n=8, size=6, classes=10):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(n, size, size, 3)).astype(np.float32))
  labels = jnp.asarray(np.arange(n) % classes, jnp.int32)  # Every partner has another label.
  return images, labels


def _lam(targets, labels):
  """lam read back from the targets (no smoothing, partners with other labels)."""
  return np.asarray(targets)[np.arange(len(labels)), np.asarray(labels)]


def test_mixup_blends_images_and_targets_with_one_lam_and_mirrored_partners_per_shard():
  images, labels = _batch()
  mixed, targets, dominant = mixing.mix(jax.random.key(1), images, labels, 10, 0.0, MIXUP,
                                        num_shards=4)
  lam = _lam(targets, labels)
  assert np.allclose(lam, lam[0]) and 0 < lam[0] < 1   # One lam per batch.
  partner = [1, 0, 3, 2, 5, 4, 7, 6]                   # Shards of two: mirrored within each.
  x = np.asarray(images)
  np.testing.assert_allclose(mixed, lam[0] * x + (1 - lam[0]) * x[partner], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets)[np.arange(8), np.asarray(labels)[partner]],
                             1 - lam[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
  expected = np.where(lam[0] >= 0.5, np.asarray(labels), np.asarray(labels)[partner])
  np.testing.assert_array_equal(dominant, expected)   # Accuracy counts the dominant label.


def test_cutmix_pastes_one_box_of_the_partner_whose_area_is_one_minus_lam():
  images, labels = _batch(n=4, size=16)
  for seed in range(5):
    mixed, targets, _ = mixing.mix(jax.random.key(seed), images, labels, 10, 0.0, CUTMIX)
    lam = _lam(targets, labels)[0]
    changed = np.any(np.asarray(mixed) != np.asarray(images), axis=-1)   # (B, H, W)
    partner = [3, 2, 1, 0]
    assert (changed == changed[0]).all()   # The same box for the whole batch.
    assert changed[0].mean() == pytest.approx(1 - lam, abs=1e-6)
    rows, cols = np.nonzero(changed[0])
    if rows.size:   # A rectangle, filled with the partner's pixels.
      assert changed[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      np.testing.assert_array_equal(np.asarray(mixed)[:, changed[0]],
                                    np.asarray(images)[partner][:, changed[0]])


def test_label_smoothing_applies_to_each_label_before_mixing():
  images, labels = _batch()
  _, targets, _ = mixing.mix(jax.random.key(1), images, labels, 10, 0.1, MIXUP, num_shards=4)
  _, plain, _ = mixing.mix(jax.random.key(1), images, labels, 10, 0.0, MIXUP, num_shards=4)
  lam = _lam(plain, labels)[0]
  partner = np.asarray(labels)[[1, 0, 3, 2, 5, 4, 7, 6]]
  smooth = lambda y: np.eye(10)[y] * 0.9 + 0.01
  np.testing.assert_allclose(targets, lam * smooth(np.asarray(labels)) + (1 - lam) * smooth(
      partner), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


def test_pmap_devices_mix_their_shards_as_jit_mixes_the_global_batch():
  images, labels = _batch()
  key = jax.random.key(3)
  cfg = {**MIXUP, 'cutmix_alpha': 1.0}
  whole = mixing.mix(key, images, labels, 10, 0.0, cfg, num_shards=4)
  per_device = jax.pmap(lambda x, y: mixing.mix(key, x, y, 10, 0.0, cfg, num_shards=1),
                        devices=jax.devices()[:4])(images.reshape(4, 2, 6, 6, 3),
                                                   labels.reshape(4, 2))
  for a, b in zip(whole, per_device):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).reshape(np.shape(a)))


def test_the_mix_is_a_function_of_its_key():
  images, labels = _batch()
  cfg = {**MIXUP, 'cutmix_alpha': 1.0}
  a = mixing.mix(jax.random.key(5), images, labels, 10, 0.0, cfg)
  b = mixing.mix(jax.random.key(5), images, labels, 10, 0.0, cfg)
  c = mixing.mix(jax.random.key(6), images, labels, 10, 0.0, cfg)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))
  # prob 0: nothing is mixed.
  off = mixing.mix(jax.random.key(5), images, labels, 10, 0.0, {**cfg, 'prob': 0.0})
  np.testing.assert_array_equal(off[0], images)
  np.testing.assert_array_equal(off[1], np.eye(10)[np.asarray(labels)])


def test_binary_cross_entropy_is_the_mean_over_classes():
  logits = jnp.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
  targets = jnp.asarray([[0.7, 0.3, 0.0], [0.1, 0.8, 0.1]])
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  by_hand = -(np.asarray(targets) * np.log(p) + (1 - np.asarray(targets)) * np.log(1 - p))
  np.testing.assert_allclose(mixing.loss(logits, targets, 'sigmoid_bce'), by_hand.mean(-1),
                             rtol=1e-5)
  np.testing.assert_allclose(mixing.loss(logits, targets),
                             optax.softmax_cross_entropy(logits, targets), rtol=1e-6)


@pytest.mark.parametrize('field, value, message', [
    ('mixup.alpha', -1.0, r'^config\.mixup\.alpha: must be >= 0'),
    ('mixup.prob', 1.5, r'^config\.mixup\.prob: a probability'),
    ('loss', 'hinge', r"^config\.loss: unknown loss 'hinge'"),
    ('adversarial.train', 'fgsm', r'^config\.mixup: mixup/CutMix with adversarial\.train'),
])
def test_bad_mixing_fields_are_one_line(field, value, message):
  from tests.conftest import tiny_config
  with pytest.raises(UserError, match=message):
    train.validate_config(tiny_config(**{'cutmix.alpha': 1.0, field: value}))
