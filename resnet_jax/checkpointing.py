"""Orbax checkpoints: save, resume, pick best or newest, and strict partial loading.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. `state` holds params,
batch_stats, opt_state and step; `meta` (JSON) holds the class names and the
eval metrics of that step. The input position is not stored: data is a function
of (seed, step), so the step alone restores it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from resnet_jax.errors import UserError
from resnet_jax.optim import flat_paths, path_str


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """A CheckpointManager keeping the newest `keep` checkpoints and the best by accuracy."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    # Both policies together: BestN alone with max_to_keep can drop the newest one.
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(1, keep)),
        pp.BestN(get_metric_fn=lambda m: m['accuracy'], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        cleanup_tmp_directories=not read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Saves `state` at `step`, refusing to write non-finite parameters."""
    finite = jax.tree.reduce(lambda a, b: a & b, jax.tree.map(
        lambda x: np.isfinite(np.asarray(x)).all(), (state['params'], state['batch_stats'])))
    if not finite:
      raise FloatingPointError(f'non-finite parameters at step {step}; checkpoint not written')
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any | None = None) -> tuple[Any, dict[str, Any]]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def restore_newest_valid(self, abstract_state: Any | None = None, which: str = 'latest'
                           ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the best or newest readable checkpoint, skipping broken ones with a warning."""
    steps = self.steps()
    if which == 'best':
      best = self.best_step()
      steps = ([best] if best is not None else []) + [s for s in steps if s != best][::-1]
    else:
      steps = steps[::-1]
    for step in steps:
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d in %s is unreadable (%s: %s); trying the one '
                        'before it.', step, self.directory, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else '')
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  ckpt = Checkpointer(workdir, read_only=True)
  if step is None:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f'config.finetune.init_from: no checkpoint in {workdir}')
    step = steps[-1]
  try:
    state, _ = ckpt.restore(step)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'config.finetune.init_from: cannot read checkpoint {step} in {workdir}: '
                    f'{type(e).__name__}') from None
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

