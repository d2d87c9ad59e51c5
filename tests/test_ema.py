"""The weight average (config.ema): its arithmetic, frozen layers, reports, eval and resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpointing, ema, train
from resnet_jax.errors import UserError


def test_update_is_the_warmed_up_decay_times_the_average_plus_the_rest():
  avg = {'params': {'w': jnp.asarray([1.0, 2.0]), 'frozen': jnp.asarray([0.3])},
         'batch_stats': {'bn': {'mean': jnp.asarray([4.0])}}}
  new = {'params': {'w': jnp.asarray([3.0, 0.0]), 'frozen': jnp.asarray([0.3])},
         'batch_stats': {'bn': {'mean': jnp.asarray([0.0])}}}
  moving = {'params': {'w': True, 'frozen': False}, 'batch_stats': {'bn': {'mean': True}}}
  # After 0 updates the warmed-up decay is min(0.999, 1/10) = 0.1; after 90, min(0.9, 91/100).
  assert float(ema.decay_at(0, 0.999, True)) == pytest.approx(0.1)
  assert float(ema.decay_at(90, 0.9, True)) == pytest.approx(0.9)
  assert float(ema.decay_at(0, 0.999, False)) == pytest.approx(0.999)
  out = ema.update(avg, new, jnp.asarray(0), 0.999, True, moving)
  np.testing.assert_allclose(out['params']['w'], [0.1 * 1 + 0.9 * 3, 0.1 * 2], rtol=1e-6)
  np.testing.assert_allclose(out['batch_stats']['bn']['mean'], [0.4], rtol=1e-6)
  out = ema.update(avg, new, jnp.asarray(5), 0.5, False, moving)
  np.testing.assert_allclose(out['params']['w'], [2.0, 1.0], rtol=1e-6)
  # Frozen: the weight itself, bit for bit (0.999 * x + 0.001 * x need not be x).
  assert out['params']['frozen'] is new['params']['frozen']


@pytest.mark.parametrize('field, value, message', [
    ('ema.decay', 1.0, r'^config\.ema\.decay: must be in \[0, 1\)'),
    ('ema.decay', -0.1, r'^config\.ema\.decay: must be in \[0, 1\)'),
    ('ema.rank_by', 'best', r"^config\.ema\.rank_by: choose 'raw' or 'ema'"),
    ('ema.rank_by', 'ema', r"^config\.ema\.rank_by: 'ema' needs config\.ema\.decay > 0"),
])
def test_bad_ema_fields_are_one_line(field, value, message):
  from tests.conftest import tiny_config
  with pytest.raises(UserError, match=message):
    train.validate_config(tiny_config(**{field: value}))


def _state(workdir):
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.restore(ckpt.steps()[-1])[0]
  finally:
    ckpt.close()


def test_a_run_averages_what_trains_reports_both_and_eval_scores_the_average(folder_config,
                                                                               tmp_path):
  """Stem and stage1 frozen: their parameters and BatchNorm statistics have an average equal
  to them bit for bit; the rest is averaged (differs from the weights). Every evaluation
  reports raw and EMA accuracy; --weights=ema evaluates the average and gives the run's
  ema_loss; best-checkpoint ranking can use it."""
  folder_config.ema.decay = 0.9
  folder_config.ema.rank_by = 'ema'
  folder_config.finetune.freeze_stages = 1
  workdir = str(tmp_path / 'wd')
  results = train.train_and_evaluate(folder_config, workdir)
  assert {'accuracy', 'ema_accuracy', 'ema_loss', 'ema_top5_accuracy'} <= set(results)
  saved = json.load(open(os.path.join(workdir, 'eval_results.json')))
  assert saved['ema_accuracy'] == results['ema_accuracy']
  history = [json.loads(l) for l in open(os.path.join(workdir, 'history.jsonl'))]
  assert any(r['kind'] == 'eval' and 'ema_accuracy' in r for r in history)

  state = _state(workdir)
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  params, averaged = flat(state['params']), flat(state['ema']['params'])
  stats, averaged_stats = flat(state['batch_stats']), flat(state['ema']['batch_stats'])
  frozen = [k for k in params if k.startswith(("['stem']", "['stage1']"))]
  moving = [k for k in params if k not in frozen]
  assert frozen and moving
  for k in frozen:
    np.testing.assert_array_equal(params[k], averaged[k], err_msg=k)
  for k in [k for k in stats if k.startswith(("['stem']", "['stage1']"))]:
    np.testing.assert_array_equal(stats[k], averaged_stats[k], err_msg=k)
  assert all(not np.array_equal(params[k], averaged[k]) for k in moving)
  assert not np.array_equal(stats["['stage2']['block0']['bn1']['mean']"],
                            averaged_stats["['stage2']['block0']['bn1']['mean']"])

  report = str(tmp_path / 'report')
  scored = train.evaluate_checkpoint(folder_config, workdir, 'best', report, weights='ema')
  assert scored['weights'] == 'ema' and scored['step'] == results['step']
  assert scored['loss'] == pytest.approx(results['ema_loss'], rel=1e-6)
  assert scored['loss'] != pytest.approx(results['loss'], rel=1e-6)


def test_switching_the_average_on_at_resume_is_named_then_starts_from_the_weights(
    folder_config, tmp_path):
  workdir = str(tmp_path / 'wd')
  folder_config.num_train_steps = 2
  train.train_and_evaluate(folder_config, workdir)
  with pytest.raises(UserError, match=r'--weights=ema: the checkpoint at step 2 .* holds no '
                                      r'weight average'):
    train.evaluate_checkpoint(folder_config, workdir, weights='ema',
                              report_dir=str(tmp_path / 'r'))
  folder_config.ema.decay = 0.9
  folder_config.num_train_steps = 4
  with pytest.raises(UserError, match=r'config\.ema\.decay \(checkpoint 0\.0, now 0\.9\)'):
    train.train_and_evaluate(folder_config, workdir)
  folder_config.allow_resume_changes = True
  results = train.train_and_evaluate(folder_config, workdir)
  assert results['step'] == 4 and 'ema_accuracy' in results
  assert 'ema' in _state(workdir)


def test_checkpoints_from_before_the_new_fields_compare_as_trained_without_them(tmp_path):
  """A checkpoint's record without ema/mixup/loss fields (older versions), or with None
  (an older config.json), reads as no average, no mixing, softmax: resuming it with an
  EMA is a named change; resuming it as it was is none."""
  from resnet_jax import resume
  from tests.conftest import tiny_config
  old = resume.run_fields(tiny_config())
  for key in list(old):
    if key.startswith(('ema.', 'mixup.', 'cutmix.')) or key == 'loss':
      del old[key]
  assert resume.resume_changes(tiny_config(), {'run': old}, str(tmp_path)) == []
  with_none = {**old, 'ema.decay': None, 'ema.warmup': None, 'loss': None}
  assert resume.resume_changes(tiny_config(), {'run': with_none}, str(tmp_path)) == []
  changes = resume.resume_changes(tiny_config(**{'ema.decay': 0.9}), {'run': old}, str(tmp_path))
  assert changes == ['config.ema.decay (checkpoint 0.0, now 0.9)']


def test_the_best_checkpoint_follows_the_rank_metric_and_keeps_accuracy_truthful(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  state = {'params': {'w': np.zeros(2, np.float32)}, 'batch_stats': {}}
  for step, (raw, averaged) in enumerate([(0.9, 0.1), (0.2, 0.8), (0.5, 0.3)], 1):
    ckpt.save(step, state, {}, metrics={'accuracy': raw, 'ema_accuracy': averaged,
                                        'rank': averaged})
  ckpt.close()
  reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  assert reader.best_step() == 2
  reader.close()
