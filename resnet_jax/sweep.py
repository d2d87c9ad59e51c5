"""Hyperparameter sweeps: a grid, or an Optuna (TPE) search with pruning, one workdir per trial.

Trials run one after another. By default each is a subprocess of
`python -m resnet_jax.main` (`SubprocessRunner`): the command line's own
parsing and checks apply to every trial's settings, a trial that fails or
leaks memory cannot take the sweep with it, and pruning can stop a trial the
way preemption does (SIGTERM: the trial saves a checkpoint and exits). The
cost is a second or two of start-up per trial. `InProcessRunner` trains in
this process (no start-up, no pruning): the tests use it.

Resuming. Each trial's workdir is ROOT/trial_<k>_<field=value...>, and a
finished trial's record (state, values, final accuracy) is its `trial.json`,
written next to the run's files after the run ends. A rerun of the same command skips the
trials with a trial.json that says complete (or pruned) and reruns the rest,
which resume from their own checkpoints. A search keeps its Optuna study in
ROOT/optuna.db (SQLite) or any `--storage` URL; trials of a killed sweep that
the study still holds as RUNNING (this host, process gone) are enqueued again
with their workdir, so they resume too.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from resnet_jax.errors import UserError

RESULT_FILE = 'trial.json'
FINISHED = ('complete', 'pruned')
# (step, accuracy) -> True to stop the trial now.
OnEval = Callable[[int, float], bool]


# --------------------------------------------------------------------------- parsing


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  """['optimizer.learning_rate=0.1,0.05', ...] -> [('optimizer.learning_rate', ['0.1', '0.05'])]."""
  out = []
  for spec in specs:
    field, sep, values = spec.partition('=')
    items = [v.strip() for v in values.split(',') if v.strip()]
    if not sep or not field or not items:
      raise UserError(f'--grid: expected FIELD=v1,v2,..., got {spec!r}')
    out.append((field.strip().removeprefix('config.'), items))
  return out


@dataclasses.dataclass(frozen=True)
class Range:
  field: str
  low: float
  high: float
  log: bool
  integer: bool


def parse_search(specs: Sequence[str]) -> list[Range]:
  """['optimizer.learning_rate=0.01:0.3:log'] -> [Range(...)]; int bounds give an int range."""
  out = []
  for spec in specs:
    field, sep, rest = spec.partition('=')
    parts = rest.split(':')
    if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != 'log'):
      raise UserError(f'--search: expected FIELD=low:high[:log], got {spec!r}')
    try:
      low, high = float(parts[0]), float(parts[1])
    except ValueError:
      raise UserError(f'--search: bounds of {field} are not numbers: {rest!r}') from None
    log = len(parts) == 3
    if not low < high or (log and low <= 0):
      raise UserError(f'--search: {field} needs low < high (and low > 0 for log), got {rest!r}')
    integer = all(re.fullmatch(r'-?\d+', p) for p in parts[:2])
    out.append(Range(field.strip().removeprefix('config.'), low, high, log, integer))
  return out


def trial_dirname(index: int, values: dict[str, str]) -> str:
  """trial_<k>_<field=value>_...; characters a path cannot hold become '-'."""
  parts = [f'{field}={value}' for field, value in values.items()]
  return re.sub(r'[^A-Za-z0-9_.=+-]', '-', '_'.join([f'trial_{index}'] + parts))


def format_value(value: float, integer: bool) -> str:
  return str(int(value)) if integer else f'{value:.6g}'


# --------------------------------------------------------------------------- runners


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def eval_history(workdir: str) -> list[tuple[int, float]]:
  """(step, accuracy) of the evaluations in the workdir's history.jsonl, newest per step."""
  path = os.path.join(workdir, 'history.jsonl')
  found: dict[int, float] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:  # A line being written.
          continue
        if record.get('kind') == 'eval' and record.get('accuracy') is not None:
          found[int(record['step'])] = float(record['accuracy'])
  return sorted(found.items())


class SubprocessRunner:
  """Runs `python -m resnet_jax.main` for a trial; watches history.jsonl for pruning."""

  def __init__(self, log_dir: str, poll_seconds: float = 2.0):
    self.log_dir = log_dir
    self.poll_seconds = poll_seconds

  def __call__(self, config: str, overrides: list[str], workdir: str,
               on_eval: OnEval | None = None) -> tuple[str, str]:
    """('complete' | 'pruned' | 'failed', the last lines of the trial's output)."""
    os.makedirs(self.log_dir, exist_ok=True)
    log_path = os.path.join(self.log_dir, os.path.basename(workdir) + '.log')
    cmd = [sys.executable, '-m', 'resnet_jax.main', f'--config={config}', f'--workdir={workdir}',
           *overrides]
    with open(log_path, 'a') as log:
      log.write('$ ' + ' '.join(cmd) + '\n')
      log.flush()
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
      pruned, seen = False, 0
      while proc.poll() is None:
        time.sleep(self.poll_seconds)
        history = eval_history(workdir)
        for step, acc in history[seen:]:
          if on_eval is not None and not pruned and on_eval(step, acc):
            pruned = True
            proc.send_signal(signal.SIGTERM)  # Saves a checkpoint and stops.
        seen = len(history)
      code = proc.wait()
    with open(log_path) as f:
      tail = ''.join(f.readlines()[-5:])
    if pruned:
      return 'pruned', tail
    return ('complete' if code == 0 else 'failed'), tail


def load_config_file(path: str) -> Any:
  """get_config() of a config file (`path[:arg]`), as main resolves it."""
  from resnet_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  file_part, _, arg = main_lib.resolve_config_path(path).partition(':')
  spec = importlib.util.spec_from_file_location('sweep_config', file_part)
  if spec is None or not os.path.isfile(file_part):
    raise UserError(f'--config: no config file {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def set_field(config: Any, field: str, text: str) -> None:
  """config.<field> = text, converted to the field's type (as --config.<field>=text would)."""
  node = config
  *parents, leaf = field.split('.')
  try:
    for p in parents:
      node = node[p]
    old = node[leaf]
  except (KeyError, AttributeError):
    raise UserError(f'config.{field}: unknown field') from None
  try:
    if isinstance(old, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      value: Any = text.lower() in ('true', '1')
    elif isinstance(old, int):
      value = int(text)
    elif isinstance(old, float):
      value = float(text)
    elif isinstance(old, tuple):
      kind = type(old[0]) if old else str
      value = tuple(kind(v.strip()) for v in text.strip('()').split(',') if v.strip())
    else:
      value = text
  except ValueError:
    raise UserError(f'config.{field}: {text!r} is not a {type(old).__name__}') from None
  node[leaf] = value


class InProcessRunner:
  """Trains in this process: no start-up per trial and no pruning (the tests use it)."""

  def __call__(self, config: str, overrides: list[str], workdir: str,
               on_eval: OnEval | None = None) -> tuple[str, str]:
    from resnet_jax import train  # pylint: disable=import-outside-toplevel
    cfg = load_config_file(config)
    for item in overrides:
      field, _, text = item.removeprefix('--config.').partition('=')
      set_field(cfg, field, text)
    try:
      train.train_and_evaluate(cfg, workdir)
    except (UserError, FloatingPointError) as e:
      return 'failed', str(e)
    return 'complete', ''


# --------------------------------------------------------------------------- trials


@dataclasses.dataclass
class Sweep:
  root: str
  config: str
  overrides: list[str]                      # ['--config.x=y', ...] for every trial
  runner: Callable[..., tuple[str, str]]
  objective: str = 'accuracy'
  ran: list[str] = dataclasses.field(default_factory=list)  # workdirs run by this call

  def result(self, workdir: str) -> dict[str, Any] | None:
    return _read_json(os.path.join(workdir, RESULT_FILE))

  def run_trial(self, index: int, values: dict[str, str], workdir: str | None = None,
                on_eval: OnEval | None = None) -> dict[str, Any]:
    """Runs (or resumes) one trial unless its trial.json says it finished; returns that record."""
    workdir = workdir or os.path.join(self.root, trial_dirname(index, values))
    done = self.result(workdir)
    if done and done.get('state') in FINISHED:
      return done
    self.ran.append(workdir)
    overrides = self.overrides + [f'--config.{f}={v}' for f, v in values.items()]
    state, tail = self.runner(self.config, overrides, workdir, on_eval)
    results = _read_json(os.path.join(workdir, 'eval_results.json')) or {}
    history = eval_history(workdir)
    record = {'index': index, 'workdir': os.path.basename(workdir), 'state': state,
              'values': values, 'step': results.get('step'),
              'accuracy': results.get('accuracy'),
              'robust_accuracy': results.get('robust_accuracy'),
              'last_eval_accuracy': history[-1][1] if history else None}
    if state == 'failed':
      record['error'] = tail.strip().splitlines()[-1] if tail.strip() else 'failed'
    if os.path.isdir(workdir):
      tmp = os.path.join(workdir, RESULT_FILE + '.tmp')
      with open(tmp, 'w') as f:
        json.dump(record, f, indent=2)
      os.replace(tmp, os.path.join(workdir, RESULT_FILE))
    return record

  def value_of(self, record: dict[str, Any]) -> float | None:
    v = record.get(self.objective)
    return None if v is None else float(v)


def run_grid(sweep: Sweep, grid: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
  """Every combination, in a fixed order (so trial numbers survive a rerun)."""
  fields = [f for f, _ in grid]
  records = []
  for index, combo in enumerate(itertools.product(*[v for _, v in grid])):
    records.append(sweep.run_trial(index, dict(zip(fields, combo))))
  return records


def run_search(sweep: Sweep, ranges: list[Range], trials: int, storage: str = '',
               study_name: str = 'sweep', seed: int = 0) -> list[dict[str, Any]]:
  """Optuna TPE until the study holds `trials` finished (complete or pruned) trials.

  Pruning: the median rule over the trials' evaluation histories (set
  config.eval_every_steps so there are several), reported step by step as the
  trial writes them; a pruned trial is stopped with SIGTERM (subprocess runs).
  """
  import optuna  # pylint: disable=import-outside-toplevel
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = storage or f'sqlite:///{os.path.join(os.path.abspath(sweep.root), "optuna.db")}'
  study = optuna.create_study(
      study_name=study_name, storage=storage, direction='maximize', load_if_exists=True,
      sampler=optuna.samplers.TPESampler(seed=seed),
      pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
  _requeue_stale(study)
  states = optuna.trial.TrialState

  def finished() -> int:
    return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))

  def objective(trial: Any) -> float:
    values = {}
    for r in ranges:
      if r.integer:
        v = trial.suggest_int(r.field, int(r.low), int(r.high), log=r.log)
      else:
        v = trial.suggest_float(r.field, r.low, r.high, log=r.log)
      values[r.field] = format_value(v, r.integer)
    workdir = trial.user_attrs.get('workdir') or os.path.join(
        sweep.root, trial_dirname(trial.number, values))
    trial.set_user_attr('workdir', workdir)
    trial.set_user_attr('worker', f'{socket.gethostname()}:{os.getpid()}')

    def on_eval(step: int, acc: float) -> bool:
      trial.report(acc, step)
      return trial.should_prune()

    record = sweep.run_trial(trial.number, values, workdir, on_eval)
    if record['state'] == 'pruned':
      raise optuna.TrialPruned()
    value = sweep.value_of(record)
    if record['state'] != 'complete' or value is None:
      raise RuntimeError(f'trial {trial.number} failed: {record.get("error", "no result")}')
    return value

  while finished() < trials:
    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
  return [r for r in (sweep.result(os.path.join(sweep.root, d)) for d in _trial_dirs(sweep.root))
          if r]


def _requeue_stale(study: Any) -> None:
  """RUNNING trials of a dead process on this host: failed, and enqueued again with their workdir."""
  import optuna  # pylint: disable=import-outside-toplevel
  host = socket.gethostname()
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    worker = str(t.user_attrs.get('worker', ''))
    name, _, pid = worker.rpartition(':')
    if name != host or not pid.isdigit() or _alive(int(pid)):
      continue  # Another machine's, or still running: leave it alone.
    study._storage.set_trial_state_values(  # pylint: disable=protected-access
        t._trial_id, optuna.trial.TrialState.FAIL)  # pylint: disable=protected-access
    study.enqueue_trial(t.params, user_attrs={'workdir': t.user_attrs.get('workdir')})


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _trial_dirs(root: str) -> list[str]:
  dirs = [d for d in os.listdir(root) if d.startswith('trial_') and
          os.path.isdir(os.path.join(root, d))]
  return sorted(dirs, key=lambda d: int(d.split('_')[1]) if d.split('_')[1].isdigit() else 0)


# --------------------------------------------------------------------------- results


def write_results(root: str, records: list[dict[str, Any]], fields: list[str],
                  objective: str = 'accuracy', log_fields: Sequence[str] = ()) -> dict[str, str]:
  """ROOT/results.csv, ROOT/results.md (best first) and ROOT/results.png."""
  records = sorted(records, key=lambda r: r['index'])
  columns = ['trial', 'workdir', 'state'] + fields + ['step', 'accuracy', 'robust_accuracy']
  rows = [{'trial': r['index'], 'workdir': r['workdir'], 'state': r['state'],
           **{f: r['values'].get(f, '') for f in fields}, 'step': r.get('step'),
           'accuracy': r.get('accuracy'), 'robust_accuracy': r.get('robust_accuracy')}
          for r in records]
  if all(r['robust_accuracy'] is None for r in rows):
    columns.remove('robust_accuracy')
  paths = {k: os.path.join(root, f'results.{k}') for k in ('csv', 'md', 'png')}
  with open(paths['csv'], 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)

  def cell(v: Any) -> str:
    return '' if v is None else f'{v:.4f}' if isinstance(v, float) else str(v)

  ranked = sorted(rows, key=lambda r: -(r.get(objective) or -math.inf))
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in ranked]
  with open(paths['md'], 'w') as f:
    f.write(f'Sweep of {len(rows)} trials, best {objective} first.\n\n' + '\n'.join(lines) + '\n')
  _plot(paths['png'], rows, fields, objective, set(log_fields))
  return paths


def _plot(path: str, rows: list[dict[str, Any]], fields: list[str], objective: str,
          log_fields: set[str]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, max(len(fields), 1), figsize=(4.5 * max(len(fields), 1), 3.6),
                           squeeze=False)
  for ax, field in zip(axes[0], fields):
    try:
      xs = [float(r[field]) for r in rows]
      numeric = True
    except (TypeError, ValueError):
      labels = sorted({str(r[field]) for r in rows})
      xs = [labels.index(str(r[field])) for r in rows]
      numeric = False
    for state, marker in (('complete', 'o'), ('pruned', 'x')):
      pts = [(x, r[objective]) for x, r in zip(xs, rows)
             if r['state'] == state and r.get(objective) is not None]
      if pts:
        ax.scatter(*zip(*pts), marker=marker, label=state)
    if numeric and (field in log_fields or (min(xs) > 0 and max(xs) / min(xs) >= 10)):
      ax.set_xscale('log')
    if not numeric:
      ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(field)
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
  axes[0][0].legend(loc='best', fontsize=8)
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=110)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)


__all__ = ['parse_grid', 'parse_search', 'Range', 'Sweep', 'SubprocessRunner', 'InProcessRunner',
           'run_grid', 'run_search', 'write_results', 'trial_dirname', 'eval_history',
           'set_field', 'load_config_file']
