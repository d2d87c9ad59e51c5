"""Resume and evaluation across changed settings: what restores, what is refused, and why."""

import os

import jax
import numpy as np
import pytest

from resnet_jax import checkpointing, resume, train
from resnet_jax.errors import UserError
from tests.conftest import write_image_folder


@pytest.fixture
def trained(folder_config, tmp_path):
  workdir = str(tmp_path / 'wd')
  folder_config.num_train_steps = 2
  train.train_and_evaluate(folder_config, workdir)
  return folder_config, workdir


def _saved(workdir, step=2):
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.restore(step)[0]


def test_eval_restores_a_checkpoint_of_another_optimizer_layout(trained):
  """Eval reads only the model's variables: clipping (another optimizer state) still loads."""
  config, workdir = trained
  config.optimizer.grad_clip_norm = 1.0
  results = train.evaluate_checkpoint(config, workdir, 'latest')
  assert results['step'] == 2 and results['num_examples'] == 15


def test_allowed_optimizer_change_keeps_parameters_and_restarts_the_optimizer(trained, caplog,
                                                                            monkeypatch):
  config, workdir = trained
  before = _saved(workdir)
  config.optimizer.name = 'adamw'
  config.num_train_steps = 3
  with pytest.raises(UserError, match=r'config\.optimizer\.name \(checkpoint .sgd., now .adamw.\)'):
    train.train_and_evaluate(config, workdir)
  config.allow_resume_changes = True
  started = []
  original = resume.restore_or_init
  monkeypatch.setattr(resume, 'restore_or_init',
                      lambda *a, **k: started.append(original(*a, **k)) or started[-1])
  train.train_and_evaluate(config, workdir)
  step, state = started[0]
  assert step == 2 and int(state['step']) == 2
  for key in ('params', 'batch_stats'):
    for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(state[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any('optimizer state starts afresh' in r.getMessage() for r in caplog.records)
  assert 3 in checkpointing.Checkpointer(workdir, read_only=True).steps()


def test_a_changed_training_split_size_is_refused(trained, tmp_path):
  config, workdir = trained
  # One more image per class: the data order and epochs change with the split's size.
  more = write_image_folder(str(tmp_path / 'more'), splits=(('train', 11), ('test', 5)))
  config.dataset.data_dir = more
  with pytest.raises(UserError, match=r'the training split size \(checkpoint 30, now 33\)'):
    train.train_and_evaluate(config, workdir)


def test_checkpoints_that_change_while_starting_are_refused(trained, monkeypatch):
  """Another run saving between this run's read of the checkpoints and its lock."""
  config, workdir = trained
  original = resume.restore_or_init

  def and_another_run_saves(*args, **kwargs):
    result = original(*args, **kwargs)
    os.makedirs(os.path.join(workdir, 'checkpoints', '99'))
    return result

  monkeypatch.setattr(resume, 'restore_or_init', and_another_run_saves)
  with pytest.raises(UserError, match='checkpoints changed while this run was starting'):
    train.train_and_evaluate(config, workdir)
