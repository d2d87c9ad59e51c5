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

from resnet_jax import checkpointing
from resnet_jax.errors import UserError

MODEL_FIELDS = ('model.name', 'model.stem', 'model.width_multiplier')
# 'group.*' stands for every field of the group.
RESUME_FIELDS = ('seed', 'batch_size', 'num_train_steps', 'num_epochs', 'grad_accum_steps',
                 'optimizer.*', 'schedule.*', 'dataset.name', 'dataset.train_split',
                 'dataset.eval_split', 'dataset.classes',
                 # The training attack; adversarial.eval_* may change (they only score).
                 'adversarial.train', 'adversarial.epsilon', 'adversarial.step_size',
                 'adversarial.steps', 'adversarial.clean_fraction')


def run_fields(config: Any) -> dict[str, Any]:
  """{'model.name': ..., 'optimizer.learning_rate': ...} as JSON values, from a config or its JSON."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else config
  flat: dict[str, Any] = {}
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


def resume_changes(config: Any, meta: dict[str, Any], workdir: str) -> list[str]:
  """'config.<field> (checkpoint A, now B)' for each setting that differs from the checkpoint's."""
  saved, mine = saved_fields(meta, workdir), run_fields(config)
  fields = [f for f in mine if f not in MODEL_FIELDS and f in saved]
  fields += [f for f in saved if f not in MODEL_FIELDS and f not in mine]  # Removed since.
  steps_win = all(isinstance(d.get('num_train_steps'), int) and d['num_train_steps'] > 0
                  for d in (saved, mine))
  changes = []
  for field in fields:
    if field == 'num_epochs' and steps_win:
      continue  # num_train_steps decides the length in both runs.
    if saved.get(field) != mine.get(field):
      changes.append(f'config.{field} (checkpoint {saved.get(field)!r}, now {mine.get(field)!r})')
  return changes


def check_resume(config: Any, class_names: list[str], meta: dict[str, Any], step: int,
                 workdir: str) -> None:
  """A training run may continue from this checkpoint (see the module docstring)."""
  hint = 'use a new workdir'
  check_model(config, meta, step, workdir, hint)
  check_classes(class_names, meta, step, workdir, hint)
  changes = resume_changes(config, meta, workdir)
  if not changes:
    return
  if config.get('allow_resume_changes', False):
    logging.warning('Resuming from step %d with changed settings (allow_resume_changes): %s',
                    step, '; '.join(changes))
    return
  raise UserError(f'{"; ".join(changes)}: differ from {_where(step, workdir)}, so resuming would '
                  'change the data order or the learning-rate schedule; rerun with the saved '
                  'values, use a new workdir, or pass --config.allow_resume_changes=True')


def _steps_on_disk(workdir: str) -> list[int]:
  """Committed step folders, read without opening (or creating) anything."""
  directory = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def has_checkpoints(workdir: str) -> bool:
  return bool(_steps_on_disk(workdir))


def restore_or_init(config: Any, workdir: str, setup: Any, class_names: list[str]
                    ) -> tuple[int, Any]:
  """The start step and the host state a training run starts from; writes nothing.

  A workdir with checkpoints continues from its newest readable one that fits
  the config (`check_resume`). `finetune.init_from` is read only for a fresh
  start, so a resume does not depend on that file still existing. The caller
  sets aside the unreadable newer steps (`Checkpointer.set_aside_steps_after`)
  once it holds the workdir, so their steps are retrained and saved again.
  """
  from resnet_jax import pretrained
  if not _steps_on_disk(workdir):
    return 0, setup.make_state(pretrained.initial_variables(config, setup.fresh_variables))
  reader = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    abstract = jax.device_get(setup.make_state(setup.fresh_variables))
    restored = reader.restore_newest_valid(
        abstract, check_meta=lambda step, meta: check_resume(config, class_names, meta, step,
                                                             workdir))
    if restored is None:
      raise UserError(f'workdir {workdir}: none of its checkpoints {reader.steps()} can be '
                      'restored into this model; refusing to start over there (use a new workdir)')
  finally:
    reader.close()
  step, state, _ = restored
  return step, state


def restore_for_eval(config: Any, workdir: str, abstract_state: Any, class_names: list[str],
                     which: str) -> tuple[int, Any]:
  """(step, host state) of the best or newest readable checkpoint that fits the config."""
  hint = ('evaluate with the config it was trained with (leave out --config to use the '
          "workdir's config.json)")
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)

  def check(step: int, meta: dict[str, Any]) -> None:
    check_model(config, meta, step, workdir, hint)
    check_classes(class_names, meta, step, workdir, hint)

  try:
    restored = ckpt.restore_newest_valid(abstract_state, which=which, check_meta=check)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'--mode=eval: no readable checkpoint in {ckpt.directory}')
  return restored[0], restored[1]


def writable(workdir: str) -> bool:
  """Whether reports may go into the workdir: writable, and not made read-only on purpose.

  A directory without any write bit counts as read-only even for root, whom
  the permission bits do not stop.
  """
  return os.access(workdir, os.W_OK) and bool(os.stat(workdir).st_mode & 0o222)
