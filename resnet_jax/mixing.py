"""mixup and CutMix on the device, inside the train step, and the losses on soft targets.

mixup (Zhang et al. 2018) blends two images and their labels with weight lam ~
Beta(alpha, alpha); CutMix (Yun et al. 2019) pastes a box of the partner image
whose area is 1 - lam and weights the labels by the areas. As in timm's
`Mixup` (the "batch" mode the ResNet-strikes-back recipes use): one lam and one
choice per batch, CutMix instead of mixup with probability `switch_prob` when
both are on, nothing at all with probability 1 - `prob`, and lam corrected to
the box's real area after clipping it to the image.

Partners: each example is paired with the mirrored example of its own device
shard (example i of a shard of n with example n-1-i), so no image crosses
devices and jit and pmap pair the same examples. The draw is keyed by (seed,
step) only, the same on every device, so a resumed run mixes as an
uninterrupted one did.

Targets are soft: lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y')),
smoothing each label first (timm's `mixup_target`), so they sum to one.
Training accuracy counts the dominant label (y when lam >= 1/2). Evaluation
never mixes. Hand-written because neither optax nor flax offers batch mixing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax.errors import UserError

LOSSES = ('softmax_xent', 'sigmoid_bce')


def settings(config: ml_collections.ConfigDict) -> dict[str, float]:
  m, c = config.get('mixup', {}), config.get('cutmix', {})
  return {'mixup_alpha': float(m.get('alpha', 0.0)), 'cutmix_alpha': float(c.get('alpha', 0.0)),
          'prob': float(m.get('prob', 1.0)), 'switch_prob': float(m.get('switch_prob', 0.5))}


def enabled(config: ml_collections.ConfigDict) -> bool:
  s = settings(config)
  return (s['mixup_alpha'] > 0 or s['cutmix_alpha'] > 0) and s['prob'] > 0


def check_config(config: ml_collections.ConfigDict) -> None:
  s = settings(config)
  for field, key in (('mixup.alpha', 'mixup_alpha'), ('cutmix.alpha', 'cutmix_alpha')):
    if s[key] < 0:
      raise UserError(f'config.{field}: must be >= 0 (0 = off), got {s[key]}')
  for field, key in (('mixup.prob', 'prob'), ('mixup.switch_prob', 'switch_prob')):
    if not 0.0 <= s[key] <= 1.0:
      raise UserError(f'config.{field}: a probability in [0, 1], got {s[key]}')
  loss = config.get('loss', 'softmax_xent')
  if loss not in LOSSES:
    raise UserError(f'config.loss: unknown loss {loss!r}; choose one of {", ".join(LOSSES)}')
  if enabled(config) and config.get('adversarial', {}).get('train', 'none') != 'none':
    raise UserError('config.mixup: mixup/CutMix with adversarial.train is not supported (the '
                    'attack needs one label per image); switch one of them off')


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def loss(logits: jax.Array, targets: jax.Array, kind: str = 'softmax_xent') -> jax.Array:
  """Per-example loss against soft targets (B, C).

  sigmoid_bce: binary cross-entropy of every class against its target, averaged
  over the classes, as timm's `BinaryCrossEntropy` (which the ResNet-strikes-back
  recipes train with) averages over all elements of the batch.
  """
  logits = logits.astype(jnp.float32)
  if kind == 'sigmoid_bce':
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)
  return optax.softmax_cross_entropy(logits, targets)


def _partners(x: jax.Array, num_shards: int) -> jax.Array:
  """The mirrored example of each example's own shard (the batch is num_shards contiguous shards)."""
  shaped = x.reshape((num_shards, x.shape[0] // num_shards) + x.shape[1:])
  return jnp.flip(shaped, axis=1).reshape(x.shape)


def box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """CutMix's box (timm's rand_bbox): a (H, W) bool mask and lam corrected to its area.

  A box of side ratio sqrt(1 - lam) centred uniformly at random, clipped to the image.
  """
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
  corrected = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / float(height * width)
  return mask, corrected


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
        smoothing: float, cfg: dict[str, float], num_shards: int = 1
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mixed images, soft targets, dominant labels) for one batch; `cfg` from `settings`.

  `num_shards`: how many device shards the batch holds (plain jit: the device
  count; inside pmap or shard_map: 1, each device mixes its own).
  """
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  lam_mix = (jax.random.beta(k_mix, cfg['mixup_alpha'], cfg['mixup_alpha'])
             if cfg['mixup_alpha'] > 0 else jnp.float32(1.0))
  lam_cut = (jax.random.beta(k_cut, cfg['cutmix_alpha'], cfg['cutmix_alpha'])
             if cfg['cutmix_alpha'] > 0 else jnp.float32(1.0))
  if cfg['mixup_alpha'] > 0 and cfg['cutmix_alpha'] > 0:
    use_cutmix = jax.random.uniform(k_switch) < cfg['switch_prob']
  else:
    use_cutmix = jnp.asarray(cfg['cutmix_alpha'] > 0)
  apply = jax.random.uniform(k_apply) < cfg['prob']
  partner_images, partner_labels = _partners(images, num_shards), _partners(labels, num_shards)
  mask, lam_box = box(k_box, lam_cut, images.shape[1], images.shape[2])
  cut = jnp.where(mask[None, :, :, None], partner_images, images)
  blended = lam_mix * images.astype(jnp.float32) + (1.0 - lam_mix) * partner_images.astype(
      jnp.float32)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
  mixed = jnp.where(apply, jnp.where(use_cutmix, cut, blended.astype(images.dtype)), images)
  targets = (lam * soft_targets(labels, num_classes, smoothing) +
             (1.0 - lam) * soft_targets(partner_labels, num_classes, smoothing))
  dominant = jnp.where(lam >= 0.5, labels, partner_labels)
  return mixed, targets, dominant
