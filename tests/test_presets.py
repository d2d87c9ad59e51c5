"""Fine-tuning presets: exactly the intended parameters and statistics move."""

import jax
import numpy as np
import pytest

from resnet_jax import console, optim, presets, train
from resnet_jax.errors import UserError
from tests.conftest import tiny_config


def _is_bn(path):
  return path.rsplit('/', 1)[0].rsplit('/', 1)[-1].startswith(('bn', 'proj_bn'))


# Which parameter paths should move, per preset (tiny ResNet-20: stem, stage1..3, head).
EXPECTED = {
    'full': lambda p: True,
    'linear_probe': lambda p: p.startswith('head/'),
    'bn_only': lambda p: p.startswith('head/') or _is_bn(p),
    'bias_only': lambda p: p.startswith('head/') or p.endswith('/bias'),
    'last_stage': lambda p: p.startswith(('head/', 'stage3/')),
}
# Which BatchNorm modules keep updating their running statistics.
STATS_MOVE = {
    'full': lambda m: True,
    'linear_probe': lambda m: False,
    'bn_only': lambda m: True,
    'bias_only': lambda m: True,
    'last_stage': lambda m: m.startswith('stage3/'),
}


@pytest.mark.parametrize('preset', presets.PRESETS)
def test_exactly_the_preset_parameters_and_statistics_move(preset):
  config = tiny_config(**{'finetune.preset': preset})
  setup = train.Setup(config, 3, 64, 8)
  state = setup.make_state(setup.fresh_variables)
  before = jax.device_get(state)
  step, _ = setup.steps()
  state = setup.par.put_state(state)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {'image': rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 3, 8)}
    state, _ = step(state, setup.par.put_batch(batch))
  after = jax.device_get(state)
  for path, old in optim.flat_paths(before['params']).items():
    new = optim.flat_paths(after['params'])[path]
    if EXPECTED[preset](path):
      assert not np.array_equal(old, new), f'{preset}: {path} should train'
    else:
      np.testing.assert_array_equal(old, new, err_msg=f'{preset}: {path} should stay')
  for path, old in optim.flat_paths(before['batch_stats']).items():
    new = optim.flat_paths(after['batch_stats'])[path]
    if STATS_MOVE[preset](path.rsplit('/', 1)[0]):
      assert not np.array_equal(old, new), f'{preset}: statistics {path} should update'
    else:
      np.testing.assert_array_equal(old, new, err_msg=f'{preset}: statistics {path} should stay')


def test_explicit_freeze_adds_to_a_preset():
  config = tiny_config(**{'finetune.preset': 'last_stage', 'finetune.freeze': '^stage3/block0/'})
  setup = train.Setup(config, 3, 64, 8)
  frozen = set(setup.spec.frozen_paths())
  paths = optim.flat_paths(setup.fresh_variables['params'])
  assert frozen == {p for p in paths if not p.startswith(('head/', 'stage3/'))
                    or p.startswith('stage3/block0/')}
  summary = setup.spec.summary(setup.fresh_variables['params'])
  assert summary['trainable'] == sum(paths[p].size for p in paths if p not in frozen)


def test_unknown_preset_is_a_user_error_and_the_summary_names_the_preset():
  with pytest.raises(UserError, match='config.finetune.preset'):
    train.validate_config(tiny_config(**{'finetune.preset': 'lora'}))

  class Info:
    num_train, num_eval, num_classes, image_size, class_names = 64, 8, 3, 8, ['a', 'b', 'c']
  config = tiny_config(**{'finetune.preset': 'bn_only', 'dataset.name': 'image_folder'})
  text = console.start_block(config, Info(), {'total': 10, 'trainable': 4, 'frozen': 6},
                             num_devices=1, platform='cpu', total_steps=4, workdir='/w',
                             start_step=0)
  assert 'trainable (finetune.preset bn_only)' in text
