"""L-inf adversarial examples (FGSM, PGD) for training and for robust evaluation.

Units. `epsilon` and `step_size` are given in pixel units of [0, 255] (8 means
8/255) and converted per channel through the dataset normalisation: the
network sees (p/255 - mean) / std, so a pixel step e is e / (255 std_c) in
channel c. Every adversarial image stays in the valid pixel range, clipped to
[(0 - mean) / std, (1 - mean) / std] after every step.

Attacks. PGD (Madry et al. 2018) starts at a uniformly random point of the
epsilon ball and takes `steps` signed-gradient ascent steps of `step_size`,
each projected back onto the ball and the pixel range. FGSM here is the
one-step PGD with a random start ("fast adversarial training", Wong et al.
2020, who use step size 1.25 epsilon): without the random start, one-step
training overfits to its own attack ("catastrophic overfitting").

BatchNorm. The training attack runs the model in train mode (batch statistics)
and throws away the statistics it computes, so (a) the examples are
adversarial for the very function the loss is then minimised on, as in Madry
et al.'s and Wong et al.'s code, whose models stay in train mode while
attacking, and (b) the running averages see each step's (adversarial) batch
once, not once per attack iteration as they would in PyTorch code that
attacks in train mode. Frozen BatchNorm layers (`frozen_bn`) normalise with
their running averages in the attack too, exactly as in the step. Robust
evaluation attacks the eval-mode model (running averages), the model that is
scored.

Frozen layers. The attack model must not carry the stop-gradient boundary of
a frozen prefix (`stop_gradient_after`): that boundary cuts the gradient to
the input, and every attack would be a no-op. `Setup` builds it without.

Randomness. The random start is drawn from a key folded from (seed, step) by
the train step, so a resumed run makes the same examples; evaluation uses a
key from the seed alone, so the same checkpoint scores the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError

KINDS = ('none', 'fgsm', 'pgd')


@dataclasses.dataclass(frozen=True)
class Attack:
  """An L-inf attack in pixel units; `keep_best` returns each example's strongest iterate."""
  epsilon: float                    # pixels of [0, 255]
  step_size: float                  # pixels of [0, 255]
  steps: int
  mean: tuple[float, ...]           # the dataset normalisation, fractions of 255
  std: tuple[float, ...]
  random_start: bool = True
  keep_best: bool = False

  def _scale(self, pixels: float) -> jax.Array:
    return pixels / (255.0 * jnp.asarray(self.std, jnp.float32))

  def bounds(self) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (0.0 - mean) / std, (1.0 - mean) / std

  def __call__(self, loss_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
               rng: jax.Array) -> jax.Array:
    """Adversarial `images`; `loss_fn(images)` gives per-example losses (N,).

    The result carries no gradient to anything `loss_fn` closes over.
    """
    images = jax.lax.stop_gradient(images.astype(jnp.float32))
    if self.epsilon == 0 or self.steps == 0:
      return images
    eps, alpha = self._scale(self.epsilon), self._scale(self.step_size)
    lo, hi = self.bounds()

    def project(x):
      return jnp.clip(jnp.clip(x, images - eps, images + eps), lo, hi)

    x = images
    if self.random_start:
      x = project(images + jax.random.uniform(rng, images.shape, jnp.float32, -1.0, 1.0) * eps)
    def total(z):
      losses = loss_fn(z)
      return jnp.sum(losses), losses

    def losses_and_grad(z):  # The gradient of the sum is each example's own gradient.
      (_, losses), g = jax.value_and_grad(total, has_aux=True)(z)
      return losses, g

    def step(carry, _):
      x, best_x, best_loss = carry
      losses, g = losses_and_grad(x)
      if self.keep_best:
        better = losses > best_loss
        best_x = jnp.where(better[:, None, None, None], x, best_x)
        best_loss = jnp.where(better, losses, best_loss)
      x = project(x + alpha * jnp.sign(g))
      return (x, best_x, best_loss), None

    init = (x, x, jnp.full(images.shape[:1], -jnp.inf, jnp.float32))
    (x, best_x, best_loss), _ = jax.lax.scan(step, init, None, length=int(self.steps))
    if self.keep_best:
      last = jax.lax.stop_gradient(loss_fn(x))
      x = jnp.where((last >= best_loss)[:, None, None, None], x, best_x)
    return jax.lax.stop_gradient(x)


# --------------------------------------------------------------------------- from the config


def check_config(config: Any) -> None:
  """The adversarial fields, checked before any data or device work."""
  adv = config.get('adversarial')
  if adv is None:
    return
  kind = adv.get('train', 'none')
  if kind not in KINDS:
    raise UserError(f'config.adversarial.train: unknown attack {kind!r}; choose one of '
                    f'{", ".join(KINDS)}')
  for field in ('epsilon', 'step_size', 'eval_step_size'):
    if float(adv.get(field, 0.0)) < 0:
      raise UserError(f'config.adversarial.{field}: must be >= 0 (pixels of 0..255), got '
                      f'{adv.get(field)}')
  for field in ('steps', 'eval_steps'):
    if int(adv.get(field, 0)) < 0:
      raise UserError(f'config.adversarial.{field}: must be >= 0, got {adv.get(field)}')
  if kind == 'pgd' and int(adv.get('steps', 0)) < 1:
    raise UserError('config.adversarial.steps: PGD training needs at least 1 step')
  if not 0.0 <= float(adv.get('clean_fraction', 0.0)) < 1.0:
    raise UserError(f'config.adversarial.clean_fraction: must be in [0, 1), got '
                    f'{adv.get("clean_fraction")}')


def train_attack(config: Any) -> Attack | None:
  """The training attack of the config, or None for standard training."""
  check_config(config)
  adv = config.get('adversarial')
  if adv is None or adv.get('train', 'none') == 'none':
    return None
  steps = 1 if adv.train == 'fgsm' else int(adv.steps)
  return Attack(float(adv.epsilon), float(adv.step_size), steps,
                tuple(config.dataset.mean), tuple(config.dataset.std))


def eval_attack(config: Any) -> Attack | None:
  """PGD-`eval_steps` for robust evaluation (each example's strongest iterate), or None."""
  check_config(config)
  adv = config.get('adversarial')
  if adv is None or int(adv.get('eval_steps', 0)) == 0:
    return None
  return Attack(float(adv.epsilon), float(adv.get('eval_step_size', adv.step_size)),
                int(adv.eval_steps), tuple(config.dataset.mean), tuple(config.dataset.std),
                keep_best=True)


def describe(config: Any) -> str:
  """One line for the start-up summary ('' when nothing adversarial happens)."""
  adv = config.get('adversarial')
  if adv is None:
    return ''
  parts = []
  if adv.get('train', 'none') != 'none':
    steps = 1 if adv.train == 'fgsm' else int(adv.steps)
    mix = float(adv.get('clean_fraction', 0.0))
    parts.append(f'training on {adv.train} examples (epsilon {float(adv.epsilon):g}/255, '
                 f'{steps} step{"s" * (steps != 1)} of {float(adv.step_size):g}/255'
                 + (f', {mix:.0%} of each batch clean' if mix else '') + ')')
  if int(adv.get('eval_steps', 0)):
    parts.append(f'robust accuracy under PGD-{int(adv.eval_steps)} (epsilon '
                 f'{float(adv.epsilon):g}/255, step {float(adv.get("eval_step_size", adv.step_size)):g}/255)')
  return '; '.join(parts)


def mix_clean(clean: jax.Array, adversarial: jax.Array, clean_fraction: float) -> jax.Array:
  """The first round(fraction * N) examples clean, the rest adversarial.

  N is the batch the step body sees: the global batch under jit, each device's
  shard under pmap (so the clean examples differ between the two, their number
  does not). The random starts differ too (pmap folds in the device index), so
  adversarial jit and pmap runs are equally valid but not bit-identical.
  """
  n_clean = int(round(clean_fraction * clean.shape[0]))
  if n_clean == 0:
    return adversarial
  keep = (jnp.arange(clean.shape[0]) < n_clean)[:, None, None, None]
  return jnp.where(keep, clean.astype(adversarial.dtype), adversarial)


__all__ = ['Attack', 'KINDS', 'check_config', 'train_attack', 'eval_attack', 'describe',
           'mix_clean']
