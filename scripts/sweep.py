"""Hyperparameter sweeps over config fields, one workdir per trial, resumable.

  # A grid: every combination, trial by trial.
  python scripts/sweep.py --config=configs/cifar10.py --workdir=/tmp/sweep \\
      --grid=optimizer.learning_rate=0.05,0.1 --grid=optimizer.weight_decay=1e-4,5e-4 \\
      --config.num_train_steps=300
  # A search: Optuna TPE, pruning on the evaluation history (set eval_every_steps).
  python scripts/sweep.py --config=configs/cifar10.py --workdir=/tmp/sweep --trials=8 \\
      --search=optimizer.learning_rate=0.01:0.5:log --search=optimizer.weight_decay=1e-5:1e-3:log \\
      --config.num_train_steps=300 --config.eval_every_steps=100

Each trial is ROOT/trial_<k>_<field=value...>, trained by `python -m
resnet_jax.main` (its log in ROOT/logs/). Rerunning the same command skips
finished trials and resumes unfinished ones. ROOT/results.csv, results.md and
results.png hold one row (point) per trial. `--storage` names an Optuna RDB
URL shared by several machines (see README); the default is ROOT/optuna.db.
Exit status: 0 if every trial finished, 1 if any failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax import sweep  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog='sweep.py', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='Experiment config file (as for main).')
  parser.add_argument('--workdir', required=True, help='ROOT: one workdir per trial inside.')
  parser.add_argument('--grid', action='append', default=[], help='FIELD=v1,v2,...')
  parser.add_argument('--search', action='append', default=[], help='FIELD=low:high[:log]')
  parser.add_argument('--trials', type=int, default=0, help='Search: finished trials wanted.')
  parser.add_argument('--objective', default='accuracy', choices=['accuracy', 'robust_accuracy'])
  parser.add_argument('--storage', default='', help='Optuna storage URL (default ROOT/optuna.db).')
  parser.add_argument('--study_name', default='sweep')
  parser.add_argument('--seed', type=int, default=0, help='The TPE sampler seed.')
  parser.add_argument('--in_process', action='store_true',
                      help='Train in this process (no per-trial start-up, no pruning).')
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith('--config.') or '=' not in item:
      raise UserError(f'unexpected argument {item!r} (overrides look like --config.x=y)')
    overrides.append(item)
  if bool(args.grid) == bool(args.search):
    raise UserError('give either --grid=FIELD=v1,v2 (a grid) or --search=FIELD=low:high with '
                    '--trials=N (a search)')
  if args.search and args.trials < 1:
    raise UserError('--trials: a search needs --trials=N with N >= 1')
  swept = [s.partition('=')[0].removeprefix('config.') for s in args.grid + args.search]
  for field in swept:
    if any(o.startswith(f'--config.{field}=') for o in overrides):
      raise UserError(f'--config.{field}: also swept; give it as --grid or --search only')
  return args, overrides


def main(argv: list[str], runner=None) -> int:
  args, overrides = parse_args(argv)
  grid = sweep.parse_grid(args.grid)
  ranges = sweep.parse_search(args.search)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  if runner is None:
    runner = (sweep.InProcessRunner() if args.in_process
              else sweep.SubprocessRunner(os.path.join(root, 'logs')))
  job = sweep.Sweep(root, args.config, overrides, runner, args.objective)
  if grid:
    records = sweep.run_grid(job, grid)
    fields, log_fields = [f for f, _ in grid], []
  else:
    records = sweep.run_search(job, ranges, args.trials, args.storage, args.study_name, args.seed)
    fields, log_fields = [r.field for r in ranges], [r.field for r in ranges if r.log]
  paths = sweep.write_results(root, records, fields, args.objective, log_fields)
  print(f'{len(job.ran)} trial(s) run now, {len(records)} in all; '
        f'results in {paths["md"]} and {paths["png"]}')
  with open(paths['md']) as f:
    print(f.read())
  return 1 if any(r['state'] == 'failed' for r in records) else 0


def run() -> None:
  try:
    sys.exit(main(sys.argv[1:]))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  run()
