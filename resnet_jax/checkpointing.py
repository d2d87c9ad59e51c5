"""Orbax checkpoints: save, resume, pick best or newest, and strict partial loading.

Layout: `<workdir>/checkpoints/<step>/{state,meta,metrics}`. `state` holds
params, batch_stats, opt_state and step; `meta` (JSON) holds the class names,
the eval results of that step and the run's settings (`run`, see resume.py);
`metrics` (Orbax's, evaluated steps only) is what the best checkpoint is ranked
by. The input position is not stored: data is a function of (seed, step), so
the step alone restores it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from resnet_jax.errors import UserError
from resnet_jax.optim import flat_paths, path_str


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


BEST_METRIC = 'accuracy'  # Higher is better.


class _NoMetricsNotice(logging.Filter):
  """Drops Orbax's warning for saves without metrics: periodic saves carry none by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_NoMetricsNotice())


class Checkpointer:
  """A CheckpointManager keeping the newest `keep` checkpoints and the best by accuracy.

  `best_fn` makes Orbax write each evaluated step's metrics next to it, so
  `best_step()` ranks by accuracy and the ranking survives restarts. Steps saved
  without metrics (periodic and signal saves) never count as best and are kept
  only while they are among the newest `keep`. `run_meta` is merged into the
  meta of every save (the run's settings, which a later run compares against).
  """

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False,
               run_meta: dict[str, Any] | None = None):
    # 'rank' is what the run ranks by (config.ema.rank_by: raw or EMA accuracy); older
    # checkpoints have only 'accuracy'.
    best = lambda m: m.get('rank', m[BEST_METRIC])
    # Both policies together: BestN alone can drop the newest checkpoint.
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(1, keep)),
        pp.BestN(get_metric_fn=best, reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=best, best_mode='max',
        create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        cleanup_tmp_directories=not read_only)
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self.run_meta = dict(run_meta or {})
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._written: set[int] = set()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The evaluated step with the highest accuracy; None when no step was evaluated."""
    return self.manager.best_step()

  def save(self, step: int, state: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Saves `state` at `step`, refusing to write non-finite parameters.

    A step this object already wrote (an evaluation and a signal at the same
    step) is written once. A step on disk that this run did not write is an
    error, never a silent skip: a skip would claim a save that did not happen.
    """
    finite = jax.tree.reduce(lambda a, b: a & b, jax.tree.map(
        lambda x: np.isfinite(np.asarray(x)).all(), (state['params'], state['batch_stats'])))
    if not finite:
      raise FloatingPointError(f'non-finite parameters at step {step}; checkpoint not written')
    if step in self._written:
      return
    if step in self.manager.all_steps():
      raise UserError(f'workdir {self.workdir}: checkpoint step {step} is already on disk but '
                      'was not written by this run (another run on this workdir?); nothing saved')
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**self.run_meta, **meta})),
        metrics=metrics, force=True)
    self._written.add(step)

  def read_meta(self, step: int) -> dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def restore(self, step: int, abstract_state: Any | None = None) -> tuple[Any, dict[str, Any]]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def _restore_order(self, which: str) -> list[int]:
    newest_first = self.steps()[::-1]
    if which != 'best':
      return newest_first
    best = self.best_step()
    if best is None:
      if newest_first:
        logging.warning('No checkpoint in %s was evaluated, so none is best; using the newest.',
                        self.directory)
      return newest_first
    return [best] + [s for s in newest_first if s != best]

  def restore_newest_valid(self, abstract_state: Any | None = None, which: str = 'latest',
                           check_meta: Callable[[int, dict[str, Any]], None] | None = None
                           ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the best or newest readable checkpoint, skipping broken ones with a warning.

    `check_meta(step, meta)` runs before the state is read; the UserError it
    raises for a checkpoint that does not fit the config is not taken for a
    broken checkpoint (that would hide the real cause behind a fallback).
    """
    for step in self._restore_order(which):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._warn_unreadable(step, e)
        continue
      if check_meta is not None:
        check_meta(step, meta)
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except
        self._warn_unreadable(step, e)
    return None

  def _warn_unreadable(self, step: int, e: Exception) -> None:
    logging.warning('Checkpoint at step %d in %s is unreadable (%s: %s); trying the one '
                    'before it.', step, self.directory, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else '')

  def set_aside_steps_after(self, step: int) -> list[int]:
    """Moves the checkpoints newer than `step` to `<workdir>/unreadable_checkpoints/`.

    Called after a fallback restore: those steps could not be read, and the
    retrained steps must be saved where they were. Moved, not deleted, so a
    transient read failure costs no data.
    """
    newer = [s for s in self.steps() if s > step]
    if not newer:
      return []
    aside = os.path.join(self.workdir, 'unreadable_checkpoints')
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for s in newer:
        target, n = os.path.join(aside, str(s)), 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f'{s}.{n}'), n + 1
        os.replace(os.path.join(self.directory, str(s)), target)
    ocp.multihost.sync_global_processes('resnet_jax:set_aside_unreadable_checkpoints')
    self.manager.reload()
    self._written -= set(newer)
    logging.warning('Unreadable checkpoint steps %s moved to %s; training resumes from step %d '
                    'and saves them again.', newer, aside, step)
    return newer

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def find_checkpoint_root(path: str) -> tuple[str, int | None]:
  """Accepts a workdir, its `checkpoints/` folder, or one `checkpoints/<step>` folder."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return path, None
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(os.path.dirname(path)), int(base)
  if base == 'checkpoints' and os.path.isdir(path):
    return os.path.dirname(path), None
  raise UserError(f'config.finetune.init_from: {path} is neither a workdir with checkpoints '
                  'nor a checkpoint directory')


def load_variables(path: str) -> dict[str, Any]:
  """Reads params and batch_stats (only) from one of this project's checkpoints."""
  workdir, step = find_checkpoint_root(path)
  with Checkpointer(workdir, read_only=True) as ckpt:
    if step is None:
      steps = ckpt.steps()
      if not steps:
        raise UserError(f'config.finetune.init_from: no checkpoint in {workdir}')
      step = steps[-1]
    try:
      state, _ = ckpt.restore(step)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'config.finetune.init_from: cannot read checkpoint {step} in '
                      f'{workdir}: {type(e).__name__}') from None
  return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}


# --------------------------------------------------------------------------- partial loading


@dataclasses.dataclass
class LoadReport:
  """How a loaded tree lines up with the model's tree, name by name."""
  matched: list[str]
  missing: list[str]         # in the model, not in the file
  unexpected: list[str]      # in the file, not in the model
  shape_mismatch: list[str]  # 'path: file (a, b) vs model (c, d)'
  skipped: list[str]         # matched by dont_load: keep fresh initialisation

  def errors(self) -> list[str]:
    return ([f'missing {p}' for p in self.missing] +
            [f'unexpected {p}' for p in self.unexpected] +
            [f'shape {p}' for p in self.shape_mismatch])

  def summary(self) -> str:
    return (f'{len(self.matched)} matched, {len(self.skipped)} kept fresh by dont_load, '
            f'{len(self.missing)} missing, {len(self.unexpected)} unexpected, '
            f'{len(self.shape_mismatch)} shape-mismatched')


def _flat_variables(tree: dict[str, Any]) -> dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} -> {'params/stem/conv/kernel': leaf, ...}."""
  return {f'{c}/{p}': v for c in ('params', 'batch_stats')
          for p, v in flat_paths(tree.get(c, {})).items()}


def compare_trees(loaded: dict[str, Any], target: dict[str, Any], dont_load: str) -> LoadReport:
  """Compares {'params','batch_stats'} trees by '/'-joined path ('params/stem/conv/kernel')."""
  try:
    skip = re.compile(dont_load) if dont_load else None
  except re.error as e:
    raise UserError(f'config.finetune.dont_load: invalid regex {dont_load!r}: {e}') from None
  lf, tf = _flat_variables(loaded), _flat_variables(target)
  strip = lambda p: p.split('/', 1)[1]  # dont_load is written over parameter paths.
  rep = LoadReport([], [], [], [], [])
  for p in sorted(set(lf) | set(tf)):
    if skip is not None and skip.search(strip(p)):
      rep.skipped.append(p)
    elif p not in lf:
      rep.missing.append(p)
    elif p not in tf:
      rep.unexpected.append(p)
    elif tuple(np.shape(lf[p])) != tuple(np.shape(tf[p])):
      rep.shape_mismatch.append(f'{p}: file {tuple(np.shape(lf[p]))} vs model {tuple(np.shape(tf[p]))}')
    else:
      rep.matched.append(p)
  return rep


def merge_loaded(loaded: dict[str, Any], target: dict[str, Any], report: LoadReport) -> dict[str, Any]:
  """Target tree with every matched leaf replaced by the loaded value (dtype of the target)."""
  lf = _flat_variables(loaded)
  matched = set(report.matched)
  out = {}
  for c in ('params', 'batch_stats'):
    out[c] = jax.tree_util.tree_map_with_path(
        lambda path, x, c=c: np.asarray(lf[f'{c}/{path_str(path)}'], dtype=x.dtype)
        if f'{c}/{path_str(path)}' in matched else x, target.get(c, {}))
  return out

