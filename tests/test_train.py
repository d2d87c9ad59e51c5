"""End-to-end training runs: TFDS (mocked) and image folders, eval mode, resume."""

import copy
import json
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from resnet_jax import checkpointing, loop, models, resume, train
from resnet_jax.errors import UserError
from tests.conftest import digest, tiny_config


def _params(workdir, step=None):
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  state, _ = ckpt.restore(step if step is not None else ckpt.steps()[-1])
  return state


def _count_train_steps(monkeypatch, after=None):
  """Wraps the compiled train step: counts its calls and runs `after(n)` after call n."""
  calls = []
  original = train.Setup.steps

  def steps(self):
    train_step, eval_step = original(self)

    def counted(state, batch):
      out = train_step(state, batch)
      calls.append(1)
      if after is not None:
        after(len(calls))
      return out

    return counted, eval_step

  monkeypatch.setattr(train.Setup, 'steps', steps)
  return calls


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


# Every training feature at once: frozen stage, the weight average, mixup and CutMix with the
# BCE loss, RandAugment and erasing, stochastic depth, remat and LAMB.
EVERY_FEATURE = {'ema.decay': 0.9, 'mixup.alpha': 0.2, 'cutmix.alpha': 1.0,
                 'loss': 'sigmoid_bce', 'dataset.randaugment': '2,9',
                 'dataset.random_erasing': 0.5, 'model.drop_path_rate': 0.2,
                 'model.remat': 'blocks', 'optimizer.name': 'lamb',
                 'optimizer.learning_rate': 0.01, 'finetune.freeze_stages': 1}


def test_interrupted_run_resumes_to_bit_identical_parameters(folder_config, tmp_path, monkeypatch):
  """SIGTERM at step 3 saves a checkpoint; with every feature on, the rerun ends where an
  uninterrupted run ends (parameters, statistics, optimizer state and the weight average),
  and the frozen stem and stage1 (parameters, BatchNorm statistics, their average) are
  still their initial values, bit for bit."""
  for key, value in EVERY_FEATURE.items():
    group, _, leaf = key.rpartition('.')
    (folder_config[group] if group else folder_config)[leaf] = value
  folder_config.num_train_steps = 6
  folder_config.checkpoint_every_steps = 0
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(folder_config, straight)

  resumed = str(tmp_path / 'resumed')
  with monkeypatch.context() as m:
    _count_train_steps(m, after=lambda n: n == 3 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(train.Preempted) as info:
      train.train_and_evaluate(folder_config, resumed)
  assert info.value.step == 3
  assert checkpointing.Checkpointer(resumed, read_only=True).steps() == [3]
  results = train.train_and_evaluate(folder_config, resumed)
  assert results['step'] == 6
  a, b = _params(straight), _params(resumed)
  assert int(a['step']) == int(b['step']) == 6
  for part in ('params', 'batch_stats', 'opt_state', 'ema'):
    _assert_trees_equal(a[part], b[part])

  fresh = train.Setup(folder_config, 3, 30, 8).fresh_variables
  for part in ('params', 'batch_stats'):
    for name in ('stem', 'stage1'):
      _assert_trees_equal(a[part][name], fresh[part][name])
      _assert_trees_equal(a['ema'][part][name], fresh[part][name])
    moved = [not np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(a[part]['stage2']), jax.tree.leaves(fresh[part]['stage2']))]
    assert all(moved), part


def _no_reports(workdir):
  return not any(os.path.exists(os.path.join(workdir, f)) for f in
                 ('eval_results.json', 'confusion_matrix.png', 'training_curves.png'))


def test_non_finite_loss_stops_within_one_step(folder_config, tmp_path, monkeypatch):
  """lr 1e30: step 1 is finite, step 2's loss is not; the run stops at step 3, not at a log step."""
  folder_config.optimizer.learning_rate = 1e30
  folder_config.schedule.warmup_steps = 0
  folder_config.num_train_steps = 20
  folder_config.log_every_steps = 10
  folder_config.checkpoint_every_steps = 0
  workdir = str(tmp_path / 'wd')
  calls = _count_train_steps(monkeypatch)
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(folder_config, workdir)
  assert len(calls) <= 3  # Step 2's loss is checked when step 3 is in flight.
  message = str(info.value)
  assert 'at step 2' in message and 'learning rate' in message and 'lower' in message, message
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == []
  assert _no_reports(workdir)


def test_no_report_or_checkpoint_of_a_non_finite_model(folder_config, tmp_path):
  """Evaluating after step 1 at lr 1e30: outputs are NaN; nothing of that model is written."""
  folder_config.optimizer.learning_rate = 1e30
  folder_config.schedule.warmup_steps = 0
  folder_config.eval_every_steps = 1
  folder_config.log_every_steps = 1
  workdir = str(tmp_path / 'wd')
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(folder_config, workdir)
  assert _no_reports(workdir)
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == []
  assert 'at step 1' in str(info.value)


def test_zero_in_dataset_std_is_a_user_error(folder_config, tmp_path):
  folder_config.dataset.std = (0.25, 0.0, 0.25)
  with pytest.raises(UserError, match='config.dataset.std'):
    train.train_and_evaluate(folder_config, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd')


def test_failing_evaluation_keeps_the_training_of_its_step(folder_config, tmp_path, monkeypatch):
  """Eval at step 4 raises: step 4 is checkpointed anyway, without eval metrics."""
  folder_config.eval_every_steps = 2
  folder_config.checkpoint_every_steps = 0
  workdir = str(tmp_path / 'wd')
  original = train.Setup.evaluate

  def evaluate(self, eval_step, state, data):
    if int(jax.device_get(state['step'])) == 4:
      raise RuntimeError('eval exploded')
    return original(self, eval_step, state, data)

  monkeypatch.setattr(train.Setup, 'evaluate', evaluate)
  with pytest.raises(RuntimeError, match='eval exploded'):
    train.train_and_evaluate(folder_config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  assert ckpt.steps() == [2, 4]
  state, meta = ckpt.restore(4)
  assert int(state['step']) == 4 and 'eval' not in meta  # Saved without eval metrics.
  assert ckpt.restore(2)[1]['eval']['step'] == 2
  monkeypatch.setattr(train.Setup, 'evaluate', original)
  results = train.train_and_evaluate(folder_config, workdir)  # Resumes at 4: evaluates it.
  assert results['step'] == 4


def test_second_signal_unwinds_whatever_handler_was_there_before():
  """The second Ctrl-C raises KeyboardInterrupt (so the lock is released), even when the
  handler it replaced (main's start-up one) would have ended the process on the spot."""
  before = []
  old = signal.signal(signal.SIGINT, lambda *_: before.append(1))
  try:
    with loop.Preemption() as preempt:
      os.kill(os.getpid(), signal.SIGINT)
      assert preempt.signum == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # The handler runs between bytecodes.
          pass
  finally:
    signal.signal(signal.SIGINT, old)
  assert not before


def test_signal_before_the_first_step_stops_without_a_checkpoint(folder_config, tmp_path,
                                                                  monkeypatch):
  """Once the workdir is locked the loop's handler owns SIGINT: a Ctrl-C there is a clean stop."""
  workdir = str(tmp_path / 'wd')
  original = checkpointing.Checkpointer.__init__

  def init(self, *args, read_only=False, **kwargs):
    original(self, *args, read_only=read_only, **kwargs)
    if not read_only:  # The checkpointer that writes: created after the lock.
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(checkpointing.Checkpointer, '__init__', init)
  calls = _count_train_steps(monkeypatch)
  with pytest.raises(train.Preempted) as info:
    train.train_and_evaluate(folder_config, workdir)
  assert info.value.step == 0 and info.value.signum == signal.SIGINT and not calls
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == []
  assert not os.path.exists(os.path.join(workdir, 'run.lock'))


def test_corrupt_newest_checkpoint_falls_back_then_retrains_and_saves_it(folder_config, tmp_path,
                                                                         caplog):
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(folder_config, workdir)
  uninterrupted = _params(workdir, 4)
  state_dir = os.path.join(workdir, 'checkpoints', '4', 'state')
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  step, state, _ = ckpt.restore_newest_valid()
  assert step == 2 and int(state['step']) == 2

  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(folder_config, workdir)  # Retrains steps 3 and 4.
  assert results['step'] == 4
  retrained = _params(workdir, 4)
  assert int(retrained['step']) == 4
  _assert_trees_equal(uninterrupted, retrained)
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == [2, 4]
  assert any('[4]' in r.getMessage() and 'unreadable_checkpoints' in r.getMessage()
             for r in caplog.records)
  assert train.evaluate_checkpoint(folder_config, workdir, 'latest')['step'] == 4


def _finished_workdir_with_step_4_removed(config, workdir):
  """A run that stopped after its step-2 checkpoint, as a preempted one would have."""
  train.train_and_evaluate(config, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))


def test_resume_does_not_read_init_from_again(folder_config, tmp_path):
  pre = str(tmp_path / 'pre')  # A "pretrained" checkpoint: the model's own fresh weights.
  model = models.create_model(folder_config.model, 3)
  fresh = jax.device_get(jax.jit(lambda r: models.init_variables(model, r, 8))(jax.random.key(1)))
  saver = checkpointing.Checkpointer(pre)
  saver.save(0, {'step': np.int32(0), **fresh, 'opt_state': {}}, {})
  saver.close()
  folder_config.finetune.init_from = pre
  workdir = str(tmp_path / 'ft')
  _finished_workdir_with_step_4_removed(folder_config, workdir)
  shutil.rmtree(pre)  # The pretrained weights are gone; the workdir has all it needs.
  results = train.train_and_evaluate(folder_config, workdir)
  assert results['step'] == 4
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == [2, 4]


def test_resume_with_changed_run_settings_is_refused_unless_allowed(folder_config, tmp_path,
                                                                     caplog):
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(folder_config, workdir)  # 4 steps.
  before = digest(workdir)
  longer = copy.deepcopy(folder_config)
  longer.num_train_steps = 6  # The cosine schedule would jump back up at step 4.
  longer.seed = 3
  with pytest.raises(UserError) as info:
    train.train_and_evaluate(longer, workdir)
  message = str(info.value)
  assert '\n' not in message
  assert 'config.num_train_steps (checkpoint 4, now 6)' in message
  assert 'config.seed (checkpoint 0, now 3)' in message
  assert 'allow_resume_changes' in message
  assert digest(workdir) == before
  meta = checkpointing.Checkpointer(workdir, read_only=True).read_meta(4)
  for field, value in (('optimizer.learning_rate', 0.5), ('schedule.warmup_steps', 2),
                       ('batch_size', 4), ('grad_accum_steps', 2), ('num_epochs', 3.0),
                       ('dataset.train_split', 'train[:50%]'), ('dataset.classes', 'cat,dog'),
                       ('dataset.randaugment', '2,9'), ('dataset.random_erasing', 0.25),
                       ('model.drop_path_rate', 0.1), ('model.dropout_rate', 0.2),
                       ('mixup.alpha', 0.2), ('ema.decay', 0.9)):
    changed = copy.deepcopy(folder_config)
    changed.num_train_steps = -1 if field == 'num_epochs' else changed.num_train_steps
    node, path = changed, field.split('.')
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value
    assert any(c.startswith(f'config.{field} (') for c in resume.resume_changes(changed, meta,
                                                                                workdir)), field

  longer.allow_resume_changes = True
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(longer, workdir)
  assert results['step'] == 6
  assert any('allow_resume_changes' in r.getMessage() for r in caplog.records)
