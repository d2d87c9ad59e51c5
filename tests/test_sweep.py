"""Sweeps: a real 2x2 grid on a generated folder, resuming, an Optuna search with pruning."""

import csv
import json
import os

import pytest

from resnet_jax import sweep
from resnet_jax.errors import UserError
from tests.conftest import REPO, import_script

CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from tests.conftest import tiny_config

def get_config():
  c = tiny_config(**{{'dataset.name': 'image_folder', 'dataset.data_dir': {data!r},
                     'dataset.eval_split': 'test', 'num_train_steps': 1,
                     'checkpoint_every_steps': 1, 'log_every_steps': 1}})
  return c
'''


class Counting:
  """A runner that records its calls and hands them to another runner."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __call__(self, config, overrides, workdir, on_eval=None):
    self.calls.append(os.path.basename(workdir))
    return self.inner(config, overrides, workdir, on_eval)


def test_grid_of_four_trials_then_a_rerun_runs_nothing_new(image_folder, tmp_path, capsys):
  config = tmp_path / 'tiny.py'
  config.write_text(CONFIG.format(repo=REPO, data=image_folder))
  root = str(tmp_path / 'sweep')
  script = import_script('sweep')
  # Host-side fields: the four trials compile the same programs (the compilation cache hits).
  argv = [f'--config={config}', f'--workdir={root}', '--grid=dataset.crop_padding=0,2',
          '--grid=dataset.flip=false,true', '--config.optimizer.weight_decay=0.0']
  runner = Counting(sweep.InProcessRunner())
  assert script.main(argv, runner=runner) == 0
  trials = sorted(d for d in os.listdir(root) if d.startswith('trial_'))
  assert trials == ['trial_0_dataset.crop_padding=0_dataset.flip=false',
                    'trial_1_dataset.crop_padding=0_dataset.flip=true',
                    'trial_2_dataset.crop_padding=2_dataset.flip=false',
                    'trial_3_dataset.crop_padding=2_dataset.flip=true']
  with open(os.path.join(root, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['state'] for r in rows] == ['complete'] * 4
  assert [(r['dataset.crop_padding'], r['dataset.flip']) for r in rows] == [
      ('0', 'false'), ('0', 'true'), ('2', 'false'), ('2', 'true')]
  assert all(0 <= float(r['accuracy']) <= 1 and r['step'] == '1' for r in rows)
  for d in trials:  # The swept values reached the trial's config.
    saved = json.load(open(os.path.join(root, d, 'config.json')))
    ds = saved['dataset']
    assert f"crop_padding={ds['crop_padding']}_dataset.flip={str(ds['flip']).lower()}" in d
    assert saved['optimizer']['weight_decay'] == 0.0
  assert os.path.getsize(os.path.join(root, 'results.png')) > 0
  assert '| trial |' in open(os.path.join(root, 'results.md')).read()
  assert len(runner.calls) == 4
  # A rerun: nothing trains again, the table is the same.
  before = open(os.path.join(root, 'results.csv')).read()
  assert script.main(argv, runner=runner) == 0
  assert len(runner.calls) == 4
  assert open(os.path.join(root, 'results.csv')).read() == before


def _fake_runner(accuracy_of, prune_after=None):
  """Writes the history and eval_results a run would; reports each eval to `on_eval`."""

  def run(config, overrides, workdir, on_eval=None):
    values = dict(o.removeprefix('--config.').split('=', 1) for o in overrides)
    acc = accuracy_of(float(values['optimizer.learning_rate']))
    os.makedirs(workdir, exist_ok=True)
    for step in (10, 20, 30):
      with open(os.path.join(workdir, 'history.jsonl'), 'a') as f:
        f.write(json.dumps({'kind': 'eval', 'step': step, 'accuracy': acc * step / 30}) + '\n')
      with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
        json.dump({'step': step, 'accuracy': acc * step / 30}, f)
      if on_eval is not None and on_eval(step, acc * step / 30):
        return 'pruned', ''
    return 'complete', ''

  return run


def test_search_records_prunes_and_resumes(tmp_path):
  pytest.importorskip('optuna')
  script = import_script('sweep')
  root = str(tmp_path / 'search')
  argv = ['--config=unused.py', f'--workdir={root}', '--trials=5',
          '--search=optimizer.learning_rate=0.001:1:log']
  # Accuracy peaks at lr 0.1; the median rule prunes the trials that trail it.
  runner = Counting(_fake_runner(lambda lr: 1.0 - abs(__import__('math').log10(lr) + 1) / 3))
  assert script.main(argv, runner=runner) == 0
  assert os.path.exists(os.path.join(root, 'optuna.db'))
  with open(os.path.join(root, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(runner.calls) == 5
  assert {r['state'] for r in rows} <= {'complete', 'pruned'}
  assert all(r['workdir'].startswith(f'trial_{r["trial"]}_optimizer.learning_rate=') for r in rows)
  calls = len(runner.calls)
  assert script.main(argv, runner=runner) == 0  # Rerun: the study already holds 5.
  assert len(runner.calls) == calls
  argv[2] = '--trials=6'  # One more: only that one runs.
  assert script.main(argv, runner=runner) == 0
  assert len(runner.calls) == calls + 1


def test_pruned_trial_is_recorded_as_pruned(tmp_path):
  pytest.importorskip('optuna')
  job = sweep.Sweep(str(tmp_path), 'unused.py', [], _fake_runner(lambda lr: 0.5))
  record = job.run_trial(0, {'optimizer.learning_rate': '0.1'}, on_eval=lambda s, a: s >= 20)
  assert record['state'] == 'pruned' and record['step'] == 20
  assert job.run_trial(0, {'optimizer.learning_rate': '0.1'}) == record  # Finished: skipped.


def test_bad_sweep_arguments_are_user_errors():
  script = import_script('sweep')
  for argv, words in [(['--grid=lr'], '--grid'), (['--search=a=1:x', '--trials=2'], '--search'),
                      (['--search=a=1:2'], '--trials'), ([], 'either'),
                      (['--grid=seed=0,1', '--config.seed=3'], 'also swept')]:
    with pytest.raises(UserError, match=words):
      script.main(['--config=c.py', '--workdir=/tmp/unused_sweep'] + argv)
