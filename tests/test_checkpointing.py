"""Checkpointer: the best checkpoint by accuracy across restarts, and honest saves."""

import numpy as np
import pytest

from resnet_jax import checkpointing
from resnet_jax.errors import UserError


def _state(step):
  return {'step': np.int32(step), 'params': {'w': np.full((3,), float(step), np.float32)},
          'batch_stats': {'mean': np.zeros((3,), np.float32)}, 'opt_state': {}}


def test_best_checkpoint_survives_a_restart_and_later_saves(tmp_path):
  workdir = str(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir, keep=1)
  for step, accuracy in ((1, 0.9), (2, 0.1), (3, 0.2)):
    ckpt.save(step, _state(step), {}, metrics={'accuracy': accuracy})
  ckpt.close()
  assert checkpointing.Checkpointer(workdir, read_only=True).steps() == [1, 3]

  ckpt = checkpointing.Checkpointer(workdir, keep=1)  # A restart: metrics come from disk.
  assert ckpt.best_step() == 1
  ckpt.save(4, _state(4), {})  # A periodic save, without metrics: never the best.
  ckpt.close()

  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  assert ckpt.steps() == [1, 4]
  assert ckpt.best_step() == 1
  step, state, _ = ckpt.restore_newest_valid(which='best')
  assert step == 1 and float(state['params']['w'][0]) == 1.0
  assert ckpt.restore_newest_valid(which='latest')[0] == 4


def test_a_step_on_disk_that_this_run_did_not_write_is_not_silently_skipped(tmp_path):
  first = checkpointing.Checkpointer(str(tmp_path))
  first.save(3, _state(3), {})
  first.save(3, _state(3), {})  # The same run saving a step twice writes it once.
  first.close()
  again = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(UserError, match='step 3 is already on disk'):
    again.save(3, _state(3), {})
  again.close()


def test_run_meta_goes_into_every_save_and_unreadable_steps_are_set_aside(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3, run_meta={'run': {'seed': 7}})
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {'class_names': ['a']})
  assert ckpt.read_meta(2) == {'run': {'seed': 7}, 'class_names': ['a']}
  assert ckpt.set_aside_steps_after(1) == [2, 3]
  assert ckpt.steps() == [1]
  ckpt.save(2, _state(2), {})  # The retrained step is saved where the broken one was.
  ckpt.close()
  assert checkpointing.Checkpointer(str(tmp_path), read_only=True).steps() == [1, 2]
  assert sorted(p.name for p in (tmp_path / 'unreadable_checkpoints').iterdir()) == ['2', '3']
