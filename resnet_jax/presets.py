"""Parameter-efficient fine-tuning presets, expanded into the one freeze regex of `ParamSpec`.

A preset names which parameters train; everything else is frozen through the
same path as `finetune.freeze` (optax `set_to_zero`, frozen BatchNorm where a
layer's scale and bias are both frozen, and the stop-gradient boundary after
the longest frozen prefix). The head always trains: a new task needs it.

  full          everything trains (the default).
  linear_probe  only the head. Every BatchNorm is frozen (running averages kept),
                and the stop-gradient boundary sits before the head.
  bn_only       BatchNorm scale and bias, and the head. Their BatchNorm layers are
                not frozen, so their running statistics keep updating on the new
                data (the usual "BN adaptation"); every conv kernel is frozen.
  bias_only     every bias, and the head (BitFit). ResNet convolutions have no
                bias, so this is the BatchNorm biases plus the head; a BatchNorm
                whose bias trains counts as trained, so its running statistics
                update too, while its scale stays fixed.
  last_stage    the last stage (stage3 of the CIFAR ResNets, stage4 of the
                ImageNet ones) and the head; stem and earlier stages are frozen
                with frozen BatchNorm and a stop-gradient boundary.

An explicit `finetune.freeze` (or `freeze_stages`) combines with a preset as
a union: a parameter is frozen when the preset or the regex freezes it. (So
`preset=last_stage` with `freeze='/bn\\d/'` also fixes the last stage's
BatchNorm.) The user's regex may freeze the head; a preset never does.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from resnet_jax.errors import UserError

PRESETS = ('full', 'linear_probe', 'bn_only', 'bias_only', 'last_stage')


def check_preset(config: Any) -> str:
  """The config's preset name, checked."""
  ft = config.get('finetune') or {}
  name = ft.get('preset', 'full') or 'full'
  if name not in PRESETS:
    raise UserError(f'config.finetune.preset: unknown preset {name!r}; choose one of '
                    f'{", ".join(PRESETS)}')
  return name


def _is_batchnorm(path: str) -> bool:
  module = path.rsplit('/', 1)[0].rsplit('/', 1)[-1]
  return module.startswith(('bn', 'proj_bn'))


def last_stage(paths: Iterable[str]) -> str:
  stages = sorted({p.split('/', 1)[0] for p in paths if re.match(r'stage\d+/', p)},
                  key=lambda s: int(s[len('stage'):]))
  if not stages:
    raise UserError('config.finetune.preset: last_stage needs a model with stages')
  return stages[-1]


def frozen_by_preset(name: str, paths: Iterable[str]) -> set[str]:
  """The parameter paths that preset `name` freezes (never the head's)."""
  paths = list(paths)
  if name == 'full':
    return set()
  body = [p for p in paths if not p.startswith('head/')]
  if name == 'linear_probe':
    return set(body)
  if name == 'bn_only':
    return {p for p in body if not _is_batchnorm(p)}
  if name == 'bias_only':
    return {p for p in body if not p.endswith('/bias')}
  if name == 'last_stage':
    keep = last_stage(paths) + '/'
    return {p for p in body if not p.startswith(keep)}
  raise UserError(f'config.finetune.preset: unknown preset {name!r}; choose one of '
                  f'{", ".join(PRESETS)}')


__all__ = ['PRESETS', 'check_preset', 'frozen_by_preset', 'last_stage']
