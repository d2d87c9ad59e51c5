"""An exponential moving average (EMA) of the weights, evaluated beside the raw ones.

Polyak averaging of the parameters, as in the modern ResNet recipes (timm's
ModelEma, the TF/EfficientNet `ExponentialMovingAverage`): after every update

    ema <- d_t * ema + (1 - d_t) * weights

where `weights` are the parameters and the BatchNorm statistics (timm averages
the statistics too, so the averaged model normalises with averaged statistics).
With `ema.warmup` the decay ramps up as d_t = min(decay, (1 + t) / (10 + t)),
t the number of updates so far (TensorFlow's `num_updates`): early on the
average follows the weights instead of being dominated by the random
initialisation (at decay 0.999 the initial weights would still hold 30% of a
1200-step average).

Frozen parameters and frozen BatchNorm statistics are not averaged: they do
not move, and their average is kept equal to them bit for bit (d*x + (1-d)*x
is not always x in floating point).

The average lives in the train state as `state['ema'] = {'params',
'batch_stats'}` (checkpointed and resumed with it) and is updated inside the
jitted step, so it costs one fused multiply-add per weight and no transfer.
Plain optax has `optax.ema` for gradient transforms, which would average the
updates, not the weights, and not the BatchNorm statistics: hence this module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax.errors import UserError

RANK_BY = ('raw', 'ema')


def decay(config: ml_collections.ConfigDict) -> float:
  return float(config.get('ema', {}).get('decay', 0.0))


def enabled(config: ml_collections.ConfigDict) -> bool:
  return decay(config) > 0.0


def check_config(config: ml_collections.ConfigDict) -> None:
  e = config.get('ema', {})
  d = float(e.get('decay', 0.0))
  if not 0.0 <= d < 1.0:
    raise UserError(f'config.ema.decay: must be in [0, 1) (0 = no EMA), got {d}')
  rank = e.get('rank_by', 'raw')
  if rank not in RANK_BY:
    raise UserError(f"config.ema.rank_by: choose 'raw' or 'ema', got {rank!r}")
  if rank == 'ema' and d == 0.0:
    raise UserError("config.ema.rank_by: 'ema' needs config.ema.decay > 0")


def init(variables: dict[str, Any]) -> dict[str, Any]:
  """The average starts at the weights (copies, so donation of one never frees the other)."""
  return {'params': jax.tree.map(jnp.array, variables['params']),
          'batch_stats': jax.tree.map(jnp.array, variables.get('batch_stats', {}))}


def decay_at(count: jax.Array, decay_rate: float, warmup: bool) -> jax.Array:
  """d_t for the update made after `count` earlier updates."""
  d = jnp.asarray(decay_rate, jnp.float32)
  if warmup:
    t = jnp.asarray(count, jnp.float32)
    d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
  return d


def update(average: dict[str, Any], weights: dict[str, Any], count: jax.Array,
           decay_rate: float, warmup: bool, moving: dict[str, Any]) -> dict[str, Any]:
  """One EMA step; `moving` is a tree of bools like `weights` (False: frozen, copied)."""
  d = decay_at(count, decay_rate, warmup)

  def one(avg, w, moves):
    if not moves:
      return w
    return (d * avg.astype(jnp.float32) + (1.0 - d) * w.astype(jnp.float32)).astype(w.dtype)

  return jax.tree.map(one, average, weights, moving)


def moving_mask(trainable: Any, batch_stats: Any, frozen_bn: frozenset[str]) -> dict[str, Any]:
  """Which leaves the average follows: trainable parameters and unfrozen statistics."""
  from resnet_jax.optim import path_str  # pylint: disable=import-outside-toplevel

  def stat_moves(path, _):
    return path_str(path).rsplit('/', 1)[0] not in frozen_bn

  return {'params': trainable,
          'batch_stats': jax.tree_util.tree_map_with_path(stat_moves, batch_stats)}


def variables(state: Any) -> dict[str, Any]:
  """The averaged model's variables, in the shape the eval step reads a state."""
  return {'params': state['ema']['params'], 'batch_stats': state['ema']['batch_stats']}
