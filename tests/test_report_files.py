"""The workdir's report files: eval_results.json, history.jsonl and the PNGs."""

import json
import math
import os

import numpy as np
import pytest

from resnet_jax import reporting


def _strict(text):
  """json.loads that refuses the NaN / Infinity tokens, as strict JSON parsers do."""
  def refuse(token):
    raise ValueError(f'non-standard JSON token {token}')
  return json.loads(text, parse_constant=refuse)


def _res(accuracy, confusion, loss=0.5):
  return {'accuracy': accuracy, 'top5_accuracy': 1.0, 'loss': loss,
          'num_examples': int(np.sum(confusion)), 'confusion': np.asarray(confusion)}


@pytest.fixture
def reporter(tmp_path):
  rep = reporting.Reporter(str(tmp_path), ['cat', 'dog', 'frog'], total_steps=4)
  yield rep
  rep.close()


def test_pngs_are_refreshed_at_every_evaluation(reporter, tmp_path):
  pngs = [tmp_path / 'confusion_matrix.png', tmp_path / 'training_curves.png']
  reporter.train_metrics(1, {'loss': 1.0, 'accuracy': 0.3, 'learning_rate': 0.1})
  reporter.eval_results(2, _res(0.4, np.diag([1, 1, 0]) + 1), final=False)
  first = [p.read_bytes() for p in pngs]
  assert all(b.startswith(b'\x89PNG\r\n\x1a\n') for b in first)
  reporter.train_metrics(3, {'loss': 0.5, 'accuracy': 0.6, 'learning_rate': 0.1})
  reporter.eval_results(4, _res(0.8, np.diag([3, 3, 2])), final=False)
  second = [p.read_bytes() for p in pngs]
  assert all(a != b for a, b in zip(first, second))   # Both redrawn with the new numbers.
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_top5_accuracy_is_always_in_eval_results(reporter, tmp_path):
  results = reporter.eval_results(2, _res(0.4, np.eye(3, dtype=int)), final=False)
  saved = json.loads((tmp_path / 'eval_results.json').read_text())
  assert results['top5_accuracy'] == saved['top5_accuracy'] == 1.0    # 3 classes: all in top 5.


def test_history_and_eval_results_are_strict_json_and_read_back(reporter, tmp_path):
  reporter.train_metrics(1, {'loss': 0.7, 'accuracy': 0.5, 'learning_rate': 0.1})
  reporter.train_metrics(2, {'loss': float('nan'), 'accuracy': float('inf'),
                             'learning_rate': float('-inf')})
  reporter.eval_results(2, _res(0.0, np.eye(3, dtype=int), loss=float('nan')), final=False)
  lines = (tmp_path / 'history.jsonl').read_text().splitlines()
  records = [_strict(line) for line in lines]
  assert records[1] == {'kind': 'train', 'step': 2, 'loss': None, 'accuracy': None,
                        'learning_rate': None}
  assert _strict((tmp_path / 'eval_results.json').read_text())['loss'] is None
  history = reporter.read_history()
  assert [(h['kind'], h['step']) for h in history] == [('train', 1), ('eval', 2), ('train', 2)]
  assert history[0]['loss'] == 0.7
  assert math.isnan(history[2]['loss']) and math.isnan(history[1]['loss'])
