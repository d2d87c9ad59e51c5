"""Continuing from a workdir: what a checkpoint must match, and the state a run starts from.

Every checkpoint's meta records the run's settings (`run_fields`). Before a
checkpoint is restored they are compared with the config of the run at hand:
  * the model's shape (name, stem, width) and the classes must match for
    training, evaluation and prediction alike, or nothing sensible can follow;
  * a training run that continues must also keep everything that fixes the
    data order and the learning-rate schedule (seed, batch size, run length,
    optimizer, schedule, accumulation, splits), unless
    `config.allow_resume_changes` says the change is meant.
A mismatch is one UserError line naming each field with both values. Workdirs
written before `run` was recorded are compared with their `config.json`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from resnet_jax import checkpointing
from resnet_jax.errors import UserError

MODEL_FIELDS = ('model.name', 'model.stem', 'model.width_multiplier')
# 'group.*' stands for every field of the group.
RESUME_FIELDS = ('seed', 'batch_size', 'num_train_steps', 'num_epochs', 'grad_accum_steps',
                 'optimizer.*', 'schedule.*', 'dataset.name', 'dataset.train_split',
                 'dataset.eval_split', 'dataset.classes', 'finetune.freeze',
                 'finetune.freeze_stages', 'finetune.preset', 'finetune.head_lr_multiplier',
                 'finetune.lr_multipliers',
                 # The training attack; adversarial.eval_* may change (they only score).
                 'adversarial.train', 'adversarial.epsilon', 'adversarial.step_size',
                 'adversarial.steps', 'adversarial.clean_fraction',
                 # What the weight average holds (ema.rank_by may change).
                 'ema.decay', 'ema.warmup',
                 # What the step trains on and against.
                 'loss', 'mixup.*', 'cutmix.*', 'dataset.randaugment', 'dataset.random_erasing',
                 'model.dropout_rate', 'model.drop_path_rate',
                 # tf.data and Grain give different pixels for the same (seed, step).
                 'dataset.loader')
# Changing these changes the optimizer state's layout (its partition or its transforms).
OPTIMIZER_LAYOUT_PREFIXES = ('config.optimizer.', 'config.finetune.')


def run_fields(config: Any, num_train: int | None = None) -> dict[str, Any]:
  """{'model.name': ..., 'optimizer.learning_rate': ...} as JSON values, from a config or its JSON.

  `num_train`, the training split's size, fixes the data order and (with
  `num_epochs`) the run's length as much as any config field does.
  """
  tree = config.to_dict() if hasattr(config, 'to_dict') else config
  flat: dict[str, Any] = {} if num_train is None else {'data.num_train': int(num_train)}
  for field in MODEL_FIELDS + RESUME_FIELDS:
    if field.endswith('.*'):
      group = field[:-2]
      for key, value in (tree.get(group) or {}).items():
        flat[f'{group}.{key}'] = value
      continue
    node = tree
    for part in field.split('.'):
      node = node.get(part) if isinstance(node, dict) else None
    flat[field] = node
  return json.loads(json.dumps(flat, default=str))  # Tuples become lists, as on disk.


# Fields added after checkpoints were first written: an older checkpoint (no record, or
# None from an older config.json) was trained with their defaults (configs/default.py).
ADDED_FIELDS = ('ema.*', 'loss', 'mixup.*', 'cutmix.*', 'dataset.randaugment',
                'dataset.random_erasing', 'model.dropout_rate', 'model.drop_path_rate',
                'dataset.loader')


def _field_defaults() -> dict[str, Any]:
  from configs import default  # pylint: disable=import-outside-toplevel
  reference = run_fields(default.get_config())
  return {k: v for k, v in reference.items()
          if any(k == f or (f.endswith('.*') and k.startswith(f[:-1])) for f in ADDED_FIELDS)}


def _with_defaults(fields: dict[str, Any]) -> dict[str, Any]:
  """Missing or None values of later-added fields read as their defaults (only when the
  record exists at all: an empty record means nothing is known to compare)."""
  if not fields:
    return fields
  out = dict(fields)
  for key, value in _field_defaults().items():
    if out.get(key) is None:
      out[key] = value
  return out


def saved_fields(meta: dict[str, Any], workdir: str) -> dict[str, Any]:
  """The settings a checkpoint was written with (empty when nothing records them)."""
  if isinstance(meta.get('run'), dict):
    return meta['run']
  path = os.path.join(workdir, 'config.json')
  if os.path.isfile(path):
    with open(path) as f:
      return run_fields(json.load(f))
  return {}


def _where(step: int, workdir: str) -> str:
  return f'the checkpoint at step {step} in {workdir}'


def check_model(config: Any, meta: dict[str, Any], step: int, workdir: str, hint: str) -> None:
  """The config builds the network the checkpoint holds."""
  saved, mine = saved_fields(meta, workdir), run_fields(config)
  for field in MODEL_FIELDS:
    if field in saved and saved[field] != mine[field]:
      raise UserError(f'config.{field}: {mine[field]!r} differs from {saved[field]!r} of '
                      f'{_where(step, workdir)}; {hint}')


def check_classes(class_names: list[str], meta: dict[str, Any], step: int, workdir: str,
                  hint: str) -> None:
  saved = list(meta.get('class_names') or [])
  if saved and saved != list(class_names):
    short = lambda names: ', '.join(names[:5]) + (', ...' if len(names) > 5 else '')
    raise UserError(f'config.dataset.classes: the data has {len(class_names)} classes '
                    f'({short(list(class_names))}) but {_where(step, workdir)} was trained on '
                    f'{len(saved)} ({short(saved)}); {hint}')


def resume_changes(config: Any, meta: dict[str, Any], workdir: str,
                   num_train: int | None = None) -> list[str]:
  """'config.<field> (checkpoint A, now B)' for each setting that differs from the checkpoint's."""
  saved, mine = _with_defaults(saved_fields(meta, workdir)), _with_defaults(
      run_fields(config, num_train))
  fields = [f for f in mine if f not in MODEL_FIELDS and f in saved]
  fields += [f for f in saved if f not in MODEL_FIELDS and f not in mine]  # Removed since.
  steps_win = all(isinstance(d.get('num_train_steps'), int) and d['num_train_steps'] > 0
                  for d in (saved, mine))
  changes = []
  for field in fields:
    if field == 'num_epochs' and steps_win:
      continue  # num_train_steps decides the length in both runs.
    if field == 'ema.warmup' and not saved.get('ema.decay') and not mine.get('ema.decay'):
      continue  # No weight average on either side.
    if field in ('mixup.prob', 'mixup.switch_prob') and not any(
        d.get(a) for d in (saved, mine) for a in ('mixup.alpha', 'cutmix.alpha')):
      continue  # No mixing on either side.
    if saved.get(field) != mine.get(field):
      name = 'the training split size' if field == 'data.num_train' else f'config.{field}'
      changes.append(f'{name} (checkpoint {saved.get(field)!r}, now {mine.get(field)!r})')
  return changes


def check_resume(config: Any, class_names: list[str], meta: dict[str, Any], step: int,
                 workdir: str, num_train: int | None = None) -> list[str]:
  """A training run may continue from this checkpoint (see the module docstring).

  Returns the changes the user allowed (`allow_resume_changes`), if any.
  """
  hint = 'use a new workdir'
  check_model(config, meta, step, workdir, hint)
  check_classes(class_names, meta, step, workdir, hint)
  changes = resume_changes(config, meta, workdir, num_train)
  if not changes:
    return []
  if config.get('allow_resume_changes', False):
    logging.warning('Resuming from step %d with changed settings (allow_resume_changes): %s',
                    step, '; '.join(changes))
    return changes
  raise UserError(f'{"; ".join(changes)}: differ from {_where(step, workdir)}, so resuming would '
                  'change the data order or the learning-rate schedule; rerun with the saved '
                  'values, use a new workdir, or pass --config.allow_resume_changes=True')


def steps_on_disk(workdir: str) -> list[int]:
  """Committed step folders, read without opening (or creating) anything."""
  directory = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def has_checkpoints(workdir: str) -> bool:
  return bool(steps_on_disk(workdir))


def restore_or_init(config: Any, workdir: str, setup: Any, class_names: list[str],
                    num_train: int | None = None) -> tuple[int, Any]:
  """The start step and the host state a training run starts from; writes nothing.

  A workdir with checkpoints continues from its newest readable one that fits
  the config (`check_resume`). `finetune.init_from` is read only for a fresh
  start, so a resume does not depend on that file still existing. An allowed
  change of the optimizer or of what is frozen changes the optimizer state's
  layout: then the parameters and statistics are restored and the optimizer
  state starts afresh, with a warning. The caller sets aside the unreadable
  newer steps (`Checkpointer.set_aside_steps_after`) once it holds the
  workdir, so their steps are retrained and saved again.
  """
  from resnet_jax import pretrained
  if not steps_on_disk(workdir):
    return 0, setup.make_state(pretrained.initial_variables(config, setup.fresh_variables))
  allowed: list[str] = []

  def check(step: int, meta: dict[str, Any]) -> None:
    allowed[:] = check_resume(config, class_names, meta, step, workdir, num_train)

  reader = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    abstract = jax.device_get(setup.make_state(setup.fresh_variables))
    newest = _newest_meta(reader)
    relayout = bool(config.get('allow_resume_changes', False)) and any(
        c.startswith(OPTIMIZER_LAYOUT_PREFIXES)
        for c in resume_changes(config, newest, workdir, num_train))
    abstract = _abstract_ema_as_saved(abstract, saved_fields(newest, workdir))
    restored = reader.restore_newest_valid(None if relayout else abstract, check_meta=check)
    if restored is None:
      raise UserError(f'workdir {workdir}: none of its checkpoints {reader.steps()} can be '
                      'restored into this model; refusing to start over there (use a new workdir)')
  finally:
    reader.close()
  step, state, _ = restored
  state = _fit_ema(config, state, step)
  if relayout or any(c.startswith(OPTIMIZER_LAYOUT_PREFIXES) for c in allowed):
    variables = _variables_that_fit(state, setup.fresh_variables, step, workdir)
    average = state.get('ema')
    state = setup.make_state(variables)
    state['step'] = np.asarray(step, np.int32)
    if average is not None and 'ema' in state:
      state['ema'] = average  # The weight average is not the optimizer's: it carries on.
    logging.warning('The optimizer or what is frozen changed (allow_resume_changes): parameters '
                    'and statistics of step %d are kept, the optimizer state starts afresh.', step)
  return step, state


def _abstract_ema_as_saved(abstract: Any, saved: dict[str, Any]) -> Any:
  """The restore target with a weight average exactly when the checkpoint has one.

  (A change of ema.decay on resume is refused unless allowed; `_fit_ema` then
  starts or drops the average after the restore.)
  """
  from resnet_jax import ema  # pylint: disable=import-outside-toplevel
  saved_on = float(saved.get('ema.decay') or 0.0) > 0
  if saved_on and 'ema' not in abstract:
    return {**abstract, 'ema': ema.init(abstract)}
  if not saved_on and 'ema' in abstract:
    return {k: v for k, v in abstract.items() if k != 'ema'}
  return abstract


def _fit_ema(config: Any, state: Any, step: int) -> Any:
  """An allowed switch of the EMA (on or off) on resume: start it from the weights, or drop it."""
  from resnet_jax import ema  # pylint: disable=import-outside-toplevel
  if ema.enabled(config) and 'ema' not in state:
    logging.warning('The checkpoint at step %d has no weight average: config.ema starts it from '
                    'the weights of that step.', step)
    return {**state, 'ema': ema.init(state)}
  if not ema.enabled(config) and 'ema' in state:
    logging.warning('config.ema.decay is 0: the weight average of step %d is dropped.', step)
    return {k: v for k, v in state.items() if k != 'ema'}
  return state


def _newest_meta(reader: checkpointing.Checkpointer) -> dict[str, Any]:
  for step in reader.steps()[::-1]:
    try:
      return reader.read_meta(step)
    except Exception:  # pylint: disable=broad-except
      continue  # Unreadable: restore_newest_valid will say so.
  return {}


def _variables_that_fit(state: Any, fresh: dict[str, Any], step: int, workdir: str
                        ) -> dict[str, Any]:
  """{'params', 'batch_stats'} of a restored state, checked name by name against the model's."""
  variables = {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  report = checkpointing.compare_trees(variables, fresh, dont_load='')
  if report.errors():
    shown = '; '.join(report.errors()[:5])
    raise UserError(f'{_where(step, workdir)} does not fit this model ({report.summary()}): '
                    f'{shown}; use the config it was trained with')
  return checkpointing.merge_loaded(variables, fresh, report)


def restore_variables(config: Any, workdir: str, which: str, class_names: list[str] | None,
                      fresh: dict[str, Any] | None, flag: str, hint: str,
                      weights: str = 'raw') -> tuple[int, dict[str, Any], dict[str, Any]]:
  """(step, {'params', 'batch_stats'}, meta) of the best or newest readable checkpoint.

  For evaluation, prediction and export: only the model's variables are read
  (the trained ones, or with `weights='ema'` the weight average),
  so a checkpoint restores whatever optimizer it was trained with. The model's
  shape and classes are checked against the checkpoint's meta first, then the
  variables name by name against `fresh` (the model's own initial variables),
  when the caller has them.
  """
  directory = checkpointing.checkpoint_dir(workdir)
  if not steps_on_disk(workdir):
    raise UserError(f'{flag}: no checkpoint in {directory}')

  def check(step: int, meta: dict[str, Any]) -> None:
    check_model(config, meta, step, workdir, hint)
    if class_names is not None:
      check_classes(class_names, meta, step, workdir, hint)

  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    restored = ckpt.restore_newest_valid(None, which=which, check_meta=check)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'{flag}: no readable checkpoint in {directory}')
  step, state, meta = restored
  if weights == 'ema':  # The weight average (config.ema) instead of the trained weights.
    if 'ema' not in state:
      raise UserError(f'--weights=ema: {_where(step, workdir)} holds no weight average (it was '
                      'trained with config.ema.decay = 0); use --weights=raw')
    state = state['ema']
  elif weights != 'raw':
    raise UserError(f"--weights: choose raw or ema, got {weights!r}")
  if fresh is None:
    return step, {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}, meta
  return step, _variables_that_fit(state, fresh, step, workdir), meta


def writable(workdir: str) -> bool:
  """Whether reports may go into the workdir: writable, and not made read-only on purpose.

  A directory without any write bit counts as read-only even for root, whom
  the permission bits do not stop.
  """
  return os.access(workdir, os.W_OK) and bool(os.stat(workdir).st_mode & 0o222)
