"""The jitted step bodies: training (with accumulation, mixing, EMA, attacks) and evaluation.

TensorFlow-free, like everything they call; `parallel.Parallel.compile` wraps
them in jit or pmap. `train.py` builds them for a run and re-exports them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import (adversarial, device_data, ema, mixing, models, optim, parallel,
                        reductions)
from resnet_jax.errors import UserError

State = dict[str, Any]  # {'step', 'params', 'batch_stats', 'opt_state'}


def make_train_step(model: models.ResNet, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, num_classes: int, label_smoothing: float = 0.0,
                    grad_accum_steps: int = 1, base_rng: jax.Array | None = None,
                    trainable: Any = None, attack: adversarial.Attack | None = None,
                    attack_model: models.ResNet | None = None,
                    clean_fraction: float = 0.0,
                    exact_reductions: bool = False, ema_decay: float = 0.0,
                    ema_warmup: bool = True, ema_moving: Any = None,
                    mix: dict[str, float] | None = None, num_shards: int = 1,
                    loss_kind: str = 'softmax_xent', pixel_norm: Any = None
                    ) -> Callable[..., tuple[State, dict[str, jax.Array]]]:
  """One step body for jit and pmap; only `axis_name` differs between them.

  With `grad_accum_steps` = k the batch is cut into k strided micro-batches
  (micro-batch i holds examples i, i+k, i+2k, ... of the batch) whose gradients
  are averaged before one update: the same update as the full batch, except
  that BatchNorm normalises each micro-batch with its own statistics and updates
  its running averages k times (as k small steps would). Strided, because then
  every device's contiguous shard of the batch splits locally: each device
  convolves B/(D*k) examples per micro-batch and no images move between devices,
  and the micro-batches are the same sets under jit and pmap on any device count.

  `trainable` (a tree of bools like the params, `optim.trainable_mask`) zeroes
  the gradients of frozen parameters, so `grad_norm` counts only what trains.

  With an `attack` (`adversarial.Attack`) each (micro-)batch is replaced by its
  adversarial examples, made by `attack_model` (the model without the
  stop-gradient boundary) in train mode from the step's parameters; see
  `adversarial` for why. The first `clean_fraction` of the batch stays clean.

  With `exact_reductions` the cross-device means (gradients, loss, accuracy)
  are `reductions.exact_pmean`: the same bits on any split of the devices
  into processes (the model's BatchNorm must then be `ExactBatchNorm`).

  With `ema_decay` > 0 the state carries `ema` (`ema.update` after the
  optimizer; `ema_moving` marks the leaves it averages, the rest are copied).

  `mix` (`mixing.settings`) mixes each batch (mixup/CutMix) before anything else,
  pairing examples within each of its `num_shards` device shards (the device
  count under plain jit, 1 per device under pmap); `loss_kind` is
  `mixing.loss`'s. Accuracy counts the dominant label.

  `pixel_norm` (`preprocess.pixel_norm`): uint8 batches are normalised first,
  on the device (`device_data.normalise`); float batches are taken as they are.
  """
  base_rng = jax.random.key(0) if base_rng is None else base_rng
  attack_model = model if attack_model is None else attack_model

  def adversarial_images(params, batch_stats, images, labels, rng):
    if attack is None:
      return images

    def losses(x):
      logits, _ = attack_model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                     train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      return optim.cross_entropy(logits, labels, num_classes)

    adv = attack(losses, images, jax.random.fold_in(rng, 1))
    return adversarial.mix_clean(images, adv, clean_fraction).astype(images.dtype)

  def loss_fn(params, batch_stats, images, targets, labels, rng):
    logits, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    loss = mixing.loss(logits, targets, loss_kind).mean()
    correct = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (mutated['batch_stats'], correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: State, batch: dict[str, jax.Array], axis_name: str | None = None):
    step_rng = jax.random.fold_in(base_rng, state['step'])
    rng = step_rng
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    images, labels = device_data.normalise(batch['image'], pixel_norm), batch['label']
    if mix is not None:  # One draw per step, the same on every device.
      images, targets, labels = mixing.mix(
          jax.random.fold_in(step_rng, 3), images, labels, num_classes, label_smoothing, mix,
          num_shards if axis_name is None else 1)
    else:
      targets = mixing.soft_targets(labels, num_classes, label_smoothing)
    if grad_accum_steps == 1:
      images = adversarial_images(state['params'], state['batch_stats'], images, labels, rng)
      (loss, (batch_stats, acc)), grads = grad_fn(state['params'], state['batch_stats'],
                                                  images, targets, labels, rng)
    else:
      k = grad_accum_steps

      def micro(x):  # (B, ...) -> (k, B/k, ...): micro-batch i is x[i::k].
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

      def body(carry, xs):
        bs, gsum, lsum, asum = carry
        micro_rng = jax.random.fold_in(rng, xs[2])
        x = adversarial_images(state['params'], bs, xs[0], xs[1], micro_rng)
        (l, (bs, a)), g = grad_fn(state['params'], bs, x, xs[3], xs[1], micro_rng)
        return (bs, jax.tree.map(jnp.add, gsum, g), lsum + l, asum + a), None

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      (batch_stats, gsum, lsum, asum), _ = jax.lax.scan(
          body, (state['batch_stats'], zeros, 0.0, 0.0),
          (micro(images), micro(labels), jnp.arange(k), micro(targets)))
      grads = jax.tree.map(lambda g: g / k, gsum)
      loss, acc = lsum / k, asum / k
    if trainable is not None:
      grads = optim.zero_frozen(grads, trainable)
    if axis_name is not None:
      # BatchNorm was given the same axis_name and already averaged its statistics;
      # averaging them again is not exact on 3 or 6 devices and would move frozen ones.
      grads = reductions.pmean(grads, axis_name, exact_reductions)
      loss, acc = reductions.pmean((loss, acc), axis_name, exact_reductions)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {'step': state['step'] + 1, 'params': params, 'batch_stats': batch_stats,
                 'opt_state': opt_state}
    if ema_decay > 0:
      new_state['ema'] = ema.update(state['ema'], {'params': params, 'batch_stats': batch_stats},
                                    state['step'], ema_decay, ema_warmup, ema_moving)
    metrics = {'loss': loss, 'accuracy': acc, 'learning_rate': schedule(state['step']),
               'grad_norm': optax.tree.norm(grads)}
    if 'stop' in batch:  # Several processes: the largest signal any of them received.
      stop = batch['stop']
      metrics['stop'] = jnp.max(jax.lax.pmax(stop, axis_name) if axis_name is not None
                                else stop)
    return new_state, metrics

  return train_step


def make_eval_step(model: models.ResNet, num_classes: int,
                   attack: adversarial.Attack | None = None,
                   attack_rng: jax.Array | None = None,
                   exact_reductions: bool = False,
                   pixel_norm: Any = None) -> Callable[..., dict[str, jax.Array]]:
  """Masked sums over a batch, including the confusion matrix (true class x predicted).

  uint8 batches are normalised first with `pixel_norm`, as in the train step.

  With an `attack`, also `robust_correct`: the examples still classified right
  after the attack on the eval-mode model, masked like the rest, so every
  example counts once.
  """
  attack_rng = jax.random.key(0) if attack_rng is None else attack_rng

  def eval_step(state: State, batch: dict[str, jax.Array], axis_name: str | None = None):
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    image = device_data.normalise(batch['image'], pixel_norm)
    logits = model.apply(variables, image, train=False)
    labels, mask = batch['label'], batch['mask']
    loss = optim.cross_entropy(logits, labels, num_classes)
    pred = jnp.argmax(logits, -1)
    k = min(5, num_classes)
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    confusion = jnp.einsum('n,ni,nj->ij', mask, jax.nn.one_hot(labels, num_classes),
                           jax.nn.one_hot(pred, num_classes))
    sums = {'loss': jnp.sum(loss * mask), 'correct': jnp.sum((pred == labels) * mask),
            'correct_top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask),
            'confusion': confusion}
    if attack is not None:
      rng = attack_rng if axis_name is None else jax.random.fold_in(
          attack_rng, jax.lax.axis_index(axis_name))
      adv = attack(lambda x: optim.cross_entropy(model.apply(variables, x, train=False), labels,
                                                 num_classes), image, rng)
      adv_pred = jnp.argmax(model.apply(variables, adv.astype(image.dtype),
                                        train=False), -1)
      sums['robust_correct'] = jnp.sum((adv_pred == labels) * mask)
    if axis_name is not None:  # Exact: the eval loss's float sum is topology-free too.
      sums = (reductions.exact_psum(sums, axis_name) if exact_reductions
              else jax.lax.psum(sums, axis_name))
    return sums

  return eval_step


def evaluate(par: parallel.Parallel, eval_step: Callable[..., Any], state: Any,
             batches: Any) -> dict[str, Any]:
  """Runs eval_step over all batches; returns totals with every example counted once.

  A state with an EMA (`ema`) is scored twice per batch, raw and averaged;
  the averaged model's figures come back as `ema_accuracy`, `ema_loss` and
  `ema_top5_accuracy`.
  """
  totals = None
  # The state's own tree shape with the averaged variables: one compiled eval step for both.
  averaged = {**state, **ema.variables(state)} if 'ema' in state else None
  for batch in batches:
    batch = par.put_batch(batch)
    sums = {'raw': eval_step(state, batch)}
    if averaged is not None:
      sums['ema'] = eval_step(averaged, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise UserError('config.dataset.eval_split: the eval split is empty')
  totals = par.get_metrics(totals)
  out = rates(totals['raw'])
  if 'ema' in totals:
    averaged_out = rates(totals['ema'])
    out.update({f'ema_{k}': averaged_out[k] for k in ('accuracy', 'loss', 'top5_accuracy')})
  return out


def rates(totals: dict[str, Any]) -> dict[str, Any]:
  n = float(totals['count'])
  out = {'num_examples': int(round(n)), 'loss': float(totals['loss']) / n,
         'accuracy': float(totals['correct']) / n,
         'top5_accuracy': float(totals['correct_top5']) / n,
         'confusion': np.asarray(totals['confusion']).round().astype(np.int64)}
  if 'robust_correct' in totals:
    out['robust_accuracy'] = float(totals['robust_correct']) / n
  return out
