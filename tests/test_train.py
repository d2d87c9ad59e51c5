"""End-to-end training runs: TFDS (mocked) and image folders, eval mode, resume."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from resnet_jax import checkpointing, reporting, train
from tests.conftest import tiny_config


def _params(workdir, step=None):
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  state, _ = ckpt.restore(step if step is not None else ckpt.steps()[-1])
  return state


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_end_to_end_on_mock_tfds(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  c = tiny_config(**{'dataset.name': 'cifar10', 'dataset.data_dir': str(tmp_path / 'tfds')})
  os.makedirs(c.dataset.data_dir)
  workdir = str(tmp_path / 'wd')
  with tfds.testing.mock_data(num_examples=20):
    results = train.train_and_evaluate(c, workdir)
  assert results['step'] == 4 and results['num_examples'] == 20
  saved = json.load(open(os.path.join(workdir, 'eval_results.json')))
  for key in ('step', 'accuracy', 'top5_accuracy', 'loss', 'num_examples'):
    assert key in saved
  assert 0.0 <= saved['accuracy'] <= saved['top5_accuracy'] <= 1.0
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == [2, 4]
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'resnet20'
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_end_to_end_on_image_folder_then_eval_mode(folder_config, tmp_path):
  workdir = str(tmp_path / 'wd')
  results = train.train_and_evaluate(folder_config, workdir)
  assert results['num_examples'] == 15 and results['top5_accuracy'] == 1.0  # 3 classes.
  assert set(results['per_class']) == {'cat', 'dog', 'frog'}
  assert sum(r['support'] for r in results['per_class'].values()) == 15
  assert np.asarray(results['confusion_matrix']).sum() == 15
  for png in ('confusion_matrix.png', 'training_curves.png'):
    with open(os.path.join(workdir, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  os.remove(os.path.join(workdir, 'eval_results.json'))
  again = train.evaluate_checkpoint(folder_config, workdir, 'latest')
  assert again['step'] == 4 and again['accuracy'] == results['accuracy']
  assert json.load(open(os.path.join(workdir, 'eval_results.json')))['checkpoint'] == 'latest'


def test_rerun_of_a_finished_workdir_does_not_train_again(folder_config, tmp_path):
  workdir = str(tmp_path / 'wd')
  first = train.train_and_evaluate(folder_config, workdir)
  second = train.train_and_evaluate(folder_config, workdir)
  assert second['step'] == first['step'] == 4
  assert second['accuracy'] == first['accuracy']


def test_interrupted_run_resumes_to_bit_identical_parameters(folder_config, tmp_path, monkeypatch):
  """SIGTERM at step 3 saves a checkpoint; the rerun ends where an uninterrupted run ends."""
  folder_config.num_train_steps = 6
  folder_config.checkpoint_every_steps = 0
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(folder_config, straight)

  resumed = str(tmp_path / 'resumed')
  original_tick = reporting.Reporter.tick

  def tick_and_signal(self, step):
    original_tick(self, step)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(reporting.Reporter, 'tick', tick_and_signal)
  with pytest.raises(train.Preempted) as info:
    train.train_and_evaluate(folder_config, resumed)
  assert info.value.step == 3
  assert checkpointing.Checkpointer(resumed, read_only=True).steps() == [3]
  monkeypatch.setattr(reporting.Reporter, 'tick', original_tick)
  results = train.train_and_evaluate(folder_config, resumed)
  assert results['step'] == 6
  a, b = _params(straight), _params(resumed)
  assert int(a['step']) == int(b['step']) == 6
  _assert_trees_equal(a['params'], b['params'])
  _assert_trees_equal(a['batch_stats'], b['batch_stats'])
  _assert_trees_equal(a['opt_state'], b['opt_state'])


def test_non_finite_loss_stops_without_writing_a_checkpoint(folder_config, tmp_path):
  folder_config.optimizer.learning_rate = 1e30
  folder_config.schedule.warmup_steps = 0
  folder_config.log_every_steps = 1
  workdir = str(tmp_path / 'wd')
  with pytest.raises(FloatingPointError, match='non-finite'):
    train.train_and_evaluate(folder_config, workdir)
  for step in checkpointing.Checkpointer(workdir, read_only=True).steps():
    state = _params(workdir, step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(folder_config, tmp_path):
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(folder_config, workdir)
  state_dir = os.path.join(workdir, 'checkpoints', '4', 'state')
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  step, state, _ = ckpt.restore_newest_valid()
  assert step == 2 and int(state['step']) == 2
