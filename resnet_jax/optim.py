"""Learning-rate schedules, and the optimizer partitioned by one parameter spec.

`ParamSpec` is the single source of truth for fine-tuning decisions. It is
compiled once from the config and the parameter tree and feeds:
  * the optax partition (frozen leaves get `set_to_zero`: no state, no movement,
    no weight decay; other leaves are grouped by learning-rate multiplier);
  * the BatchNorm running-average switch (`frozen_bn`);
  * the stop-gradient boundary (`stop_gradient_after`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from resnet_jax import presets
from resnet_jax.errors import UserError
from resnet_jax.models import TOP_LEVEL_ORDER

FROZEN = 'frozen'
SCHEDULES = ('constant', 'cosine', 'linear', 'piecewise')
OPTIMIZERS = ('sgd', 'adamw', 'lars', 'lamb')


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined parameter path, e.g. 'stage1/block0/conv1/kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def flat_paths(tree: Any) -> dict[str, Any]:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- schedules


def check_schedule(config: Any) -> None:
  """The schedule fields that can be wrong before the run's length is known."""
  sc = config.schedule
  base = float(config.optimizer.learning_rate)
  if base <= 0:
    raise UserError(f'config.optimizer.learning_rate: must be positive, got {base}')
  warmup = int(sc.get('warmup_steps', 0))
  if warmup < 0:
    raise UserError(f'config.schedule.warmup_steps: must be >= 0, got {warmup}')
  if sc.name not in SCHEDULES:
    raise UserError(f'config.schedule.name: unknown schedule {sc.name!r}; choose one of '
                    f'{", ".join(SCHEDULES)}')
  if sc.name == 'piecewise':
    boundaries = tuple(float(b) for b in sc.get('boundaries', ()))
    if any(not 0 < b < 1 for b in boundaries):
      raise UserError('config.schedule.boundaries: fractions of training in (0, 1), '
                      f'got {boundaries}')


def _piecewise_scales(boundaries: tuple[float, ...], factor: float,
                      total_steps: int) -> dict[int, float]:
  """{step: scale} with the factors of boundaries that land on one step multiplied.

  optax's piecewise_constant_schedule takes a dict, so two boundaries on one
  step (rounding, or both inside the warmup before this fix) would keep one factor.
  """
  scales: dict[int, float] = {}
  for b in boundaries:
    step = int(round(b * total_steps))
    scales[step] = scales.get(step, 1.0) * factor
  return scales


def make_schedule(config: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then constant, cosine, linear or piecewise decay.

  Cosine and linear decay over the steps after the warmup. Piecewise
  boundaries are fractions of the whole run counted from step 0, and every
  boundary multiplies the learning rate by `decay_factor` at its step, wherever
  it falls: the piecewise value is the warmup ramp times base times
  decay_factor ** (boundaries passed). So with 1000 steps, 700 of warmup and
  boundaries 0.3/0.6/0.9, the ramp is scaled by 0.1 from step 300 and 0.01 from
  600, the rate is 0.01x at 700 and 0.001x from 900. (Deferring the inside-warmup
  boundaries to the warmup's end would ramp to the full rate the schedule had
  already decayed from, then drop 100x in one step.)

  A warmup longer than the run is clipped to the run, with a warning.
  """
  check_schedule(config)
  sc = config.schedule
  base = float(config.optimizer.learning_rate)
  warmup = int(sc.get('warmup_steps', 0))
  if warmup > total_steps:
    logging.warning('config.schedule.warmup_steps: %d is longer than the run (%d steps); '
                    'warming up over all %d steps instead, so the peak learning rate %g is '
                    'never reached', warmup, total_steps, total_steps, base)
    warmup = total_steps
  decay_steps = max(total_steps - warmup, 1)
  name = sc.name
  end = base * float(sc.get('end_factor', 0.0))
  if name == 'piecewise':
    boundaries = tuple(float(b) for b in sc.get('boundaries', ()))
    steps = optax.piecewise_constant_schedule(
        base, _piecewise_scales(boundaries, float(sc.get('decay_factor', 0.1)), total_steps))
    if warmup == 0:
      return steps
    ramp = optax.linear_schedule(0.0, 1.0, warmup)
    return lambda step: ramp(step) * steps(step)
  if name == 'constant':
    main = optax.constant_schedule(base)
  elif name == 'cosine':
    main = optax.cosine_decay_schedule(base, decay_steps, alpha=end / base)
  else:  # linear
    main = optax.linear_schedule(base, end, decay_steps)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


# --------------------------------------------------------------------------- param spec


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Per-parameter decisions, keyed by '/'-joined path."""
  labels: Mapping[str, str]          # FROZEN or 'lr_x<multiplier>'
  multipliers: Mapping[str, float]   # label -> learning-rate multiplier
  decay: Mapping[str, bool]          # path -> gets weight decay

  def frozen_paths(self) -> list[str]:
    return [p for p, l in self.labels.items() if l == FROZEN]

  @property
  def frozen_bn(self) -> frozenset[str]:
    """BatchNorm modules whose scale and bias are both frozen."""
    mods: dict[str, list[bool]] = {}
    for p, l in self.labels.items():
      mod, leaf = p.rsplit('/', 1)
      if leaf in ('scale', 'bias') and mod.rsplit('/', 1)[-1].startswith(('bn', 'proj_bn')):
        mods.setdefault(mod, []).append(l == FROZEN)
    return frozenset(m for m, flags in mods.items() if all(flags))

  @property
  def stop_gradient_after(self) -> str | None:
    """The last top-level module of the longest fully frozen prefix, if any."""
    last = None
    for top in TOP_LEVEL_ORDER:
      leaves = [l for p, l in self.labels.items() if p.split('/', 1)[0] == top]
      if not leaves:
        continue
      if all(l == FROZEN for l in leaves):
        last = top
      else:
        break
    return last

  def label_tree(self, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: self.labels[path_str(p)], params)

  def decay_tree(self, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: self.decay[path_str(p)], params)

  def summary(self, params: Any) -> dict[str, int]:
    sizes = {p: int(x.size) for p, x in flat_paths(params).items()}
    frozen = sum(sizes[p] for p in self.frozen_paths())
    return {'total': sum(sizes.values()), 'frozen': frozen,
            'trainable': sum(sizes.values()) - frozen,
            'frozen_tensors': len(self.frozen_paths()), 'tensors': len(sizes)}


def freeze_regex(finetune: Any) -> str:
  """Combines `finetune.freeze` and `finetune.freeze_stages` into one regex ('' = none)."""
  parts = []
  if finetune.get('freeze', ''):
    parts.append(f'(?:{finetune.freeze})')
  n = int(finetune.get('freeze_stages', 0))
  if n < 0:
    raise UserError(f'config.finetune.freeze_stages: must be >= 0, got {n}')
  if n > 0:
    parts.append('^(?:' + '|'.join(['stem'] + [f'stage{i}' for i in range(1, n + 1)]) + ')/')
  return '|'.join(parts)


def _compile(field: str, pattern: str) -> re.Pattern[str]:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise UserError(f'{field}: invalid regular expression {pattern!r}: {e}') from None


def build_param_spec(config: Any, params: Any) -> ParamSpec:
  """Compiles the config's fine-tuning rules over the actual parameter paths.

  Every pattern must match at least one parameter, so a typo never silently
  trains what the user meant to freeze. `finetune.preset` (see `presets`)
  freezes its own set on top of the regex's: the union of both.
  """
  ft = config.get('finetune', {})
  paths = list(flat_paths(params))
  preset_frozen = presets.frozen_by_preset(presets.check_preset(config), paths) if ft else set()
  freeze = freeze_regex(ft) if ft else ''
  freeze_re = _compile('config.finetune.freeze', freeze) if freeze else None
  if freeze_re is not None and not any(freeze_re.search(p) for p in paths):
    raise UserError(f'config.finetune.freeze: regex {freeze!r} matches no parameter '
                    f'(paths look like {paths[0]!r})')
  head_mult = float(ft.get('head_lr_multiplier', 1.0)) if ft else 1.0
  stage_mults: list[tuple[re.Pattern[str], float]] = []
  for item in (ft.get('lr_multipliers', ()) if ft else ()):
    # Accept 'regex=mult' strings so the field can be overridden from the command line.
    pattern, _, mult = str(item).rpartition('=')
    try:
      value = float(mult)
    except ValueError:
      raise UserError(f'config.finetune.lr_multipliers: expected "regex=float", got {item!r}') from None
    rx = _compile('config.finetune.lr_multipliers', pattern)
    if not any(rx.search(p) for p in paths):
      raise UserError(f'config.finetune.lr_multipliers: regex {pattern!r} matches no parameter')
    stage_mults.append((rx, value))
  decay_rx = _compile('config.optimizer.weight_decay_regex',
                      config.optimizer.get('weight_decay_regex', r'(^|/)kernel$'))

  labels: dict[str, str] = {}
  multipliers: dict[str, float] = {}
  decay: dict[str, bool] = {}
  for p in paths:
    if p in preset_frozen or (freeze_re is not None and freeze_re.search(p)):
      labels[p] = FROZEN
      decay[p] = False
      continue
    mult = 1.0
    for rx, value in stage_mults:  # first match wins, like big_vision's rules.
      if rx.search(p):
        mult = value
        break
    if p.startswith('head/'):
      mult *= head_mult
    label = f'lr_x{mult:g}'
    labels[p] = label
    multipliers[label] = mult
    decay[p] = bool(decay_rx.search(p))
  if all(l == FROZEN for l in labels.values()):
    raise UserError('config.finetune.freeze: every parameter is frozen; nothing would train')
  return ParamSpec(labels=labels, multipliers=multipliers, decay=decay)


# --------------------------------------------------------------------------- optimizer


def check_optimizer(config: Any) -> None:
  """The optimizer fields that can be wrong before any parameter exists."""
  oc = config.optimizer
  if oc.name not in OPTIMIZERS:
    raise UserError(f'config.optimizer.name: unknown optimizer {oc.name!r}; choose one of '
                    f'{", ".join(OPTIMIZERS)}')
  if float(oc.get('weight_decay', 0.0)) < 0:
    raise UserError(f'config.optimizer.weight_decay: must be >= 0, got {oc.weight_decay}')


def trust_ratio_tree(config: Any, params: Any) -> Any:
  """LARS/LAMB: True where the layer-wise trust ratio applies (kernels by default).

  The reference recipes (You et al. 2017 and 2019, MLPerf ResNet-50, timm) leave
  BatchNorm parameters and biases out of it, as they leave them out of weight decay.
  """
  rx = _compile('config.optimizer.trust_ratio_regex',
                config.optimizer.get('trust_ratio_regex', r'(^|/)kernel$'))
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(rx.search(path_str(p))), params)


def _base_optimizer(config: Any, lr: optax.Schedule, decay_mask: Any,
                    trust_mask: Any = True) -> optax.GradientTransformation:
  check_optimizer(config)
  oc = config.optimizer
  wd = float(oc.get('weight_decay', 0.0))
  if oc.name == 'lars':
    # optax.lars: decay added to the gradient, then the trust ratio
    # trust_coefficient * |w| / |g + wd w|, then momentum, all masked per leaf.
    return optax.lars(lr, weight_decay=wd, weight_decay_mask=decay_mask,
                      trust_coefficient=float(oc.get('trust_coefficient', 0.001)),
                      eps=0.0, trust_ratio_mask=trust_mask,
                      momentum=float(oc.get('momentum', 0.9)),
                      nesterov=bool(oc.get('nesterov', False)))
  if oc.name == 'lamb':
    # optax.lamb's steps, with the trust ratio masked like LARS's (optax.lamb applies it
    # to every leaf, BatchNorm and biases included).
    return optax.chain(
        optax.scale_by_adam(b1=float(oc.get('b1', 0.9)), b2=float(oc.get('b2', 0.999)),
                            eps=float(oc.get('eps', 1e-6))),
        optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
        optax.masked(optax.scale_by_trust_ratio(), trust_mask),
        optax.scale_by_learning_rate(lr))
  if oc.name == 'sgd':
    momentum = float(oc.get('momentum', 0.9))
    # Coupled L2 (added to the gradient before momentum), as torch.optim.SGD does.
    return optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
        optax.sgd(lr, momentum=momentum or None, nesterov=bool(oc.get('nesterov', False))))
  return optax.adamw(lr, b1=float(oc.get('b1', 0.9)), b2=float(oc.get('b2', 0.999)),
                     eps=float(oc.get('eps', 1e-8)), weight_decay=wd, mask=decay_mask)


def make_optimizer(config: Any, spec: ParamSpec, params: Any,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax.partition over the spec's labels: frozen -> set_to_zero, others -> scaled lr."""
  decay_tree = spec.decay_tree(params)
  trust_tree = trust_ratio_tree(config, params)
  transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
  for label, mult in spec.multipliers.items():
    lr = schedule if mult == 1.0 else (lambda s, m=mult: schedule(s) * m)
    transforms[label] = _base_optimizer(config, lr, decay_tree, trust_tree)
  tx = optax.partition(transforms, spec.label_tree(params))
  clip = float(config.optimizer.get('grad_clip_norm', 0.0))
  if clip > 0:
    tx = optax.chain(_clip_trainable_by_global_norm(clip, trainable_mask(spec, params)), tx)
  return tx


def trainable_mask(spec: ParamSpec, params: Any) -> Any:
  """A tree like `params`: True where the parameter trains, False where frozen."""
  return jax.tree.map(lambda label: label != FROZEN, spec.label_tree(params))


def zero_frozen(grads: Any, trainable: Any) -> Any:
  """`grads` with the frozen leaves (False in `trainable`) set to zero."""
  return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)


def _clip_trainable_by_global_norm(max_norm: float,
                                   trainable: Any) -> optax.GradientTransformation:
  """clip_by_global_norm over the trainable gradients only.

  A frozen part that is not a prefix (BatchNorm-only freezing, say) still gets
  gradients; left in, they would count in the norm and clip tighter than asked.
  The state is clip_by_global_norm's own, so checkpoints keep their layout.
  """
  clip = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    return clip.update(zero_frozen(updates, trainable), state, params)

  return optax.GradientTransformation(clip.init, update)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in float32, with optional label smoothing."""
  from resnet_jax import mixing  # pylint: disable=import-outside-toplevel
  return mixing.loss(logits, mixing.soft_targets(labels, num_classes, label_smoothing))


def total_steps_from_config(config: Any, num_train_examples: int) -> int:
  """`num_train_steps` wins when > 0, else `num_epochs` over the training split."""
  if int(config.num_train_steps) > 0:
    return int(config.num_train_steps)
  epochs = float(config.get('num_epochs', 0))
  if epochs <= 0:
    raise UserError('config.num_train_steps / config.num_epochs: one of them must be > 0')
  return max(1, int(math.ceil(epochs * num_train_examples / int(config.batch_size))))


__all__ = ['ParamSpec', 'build_param_spec', 'check_optimizer', 'make_optimizer', 'make_schedule',
           'check_schedule', 'cross_entropy', 'total_steps_from_config', 'path_str', 'flat_paths', 'FROZEN',
           'trainable_mask', 'zero_frozen']
