"""FGSM/PGD: the epsilon ball and the pixel range, strength, zero epsilon, frozen layers, reports."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import adversarial, models, optim, parallel, train
from resnet_jax.errors import UserError
from tests.conftest import tiny_config

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope='module')
def fixed():
  """A tiny model with some training in its weights, normalised images, labels."""
  config = tiny_config()
  model = models.create_model(config.model, 3)
  variables = jax.device_get(jax.jit(lambda r: models.init_variables(model, r, 8))(
      jax.random.key(3)))
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.float32)
  images = jnp.asarray((pixels / 255.0 - np.array(MEAN)) / np.array(STD), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 16))
  return model, variables, images, labels


def _losses(model, variables, labels):
  return lambda x: optim.cross_entropy(model.apply(variables, x, train=False), labels, 3)


def _attack(steps, eps=8.0, step=2.0, **kw):
  return adversarial.Attack(eps, step, steps, MEAN, STD, **kw)


@pytest.mark.parametrize('steps', [1, 5])
def test_perturbation_stays_in_the_epsilon_ball_and_the_pixel_range(fixed, steps):
  model, variables, images, labels = fixed
  adv = jax.jit(lambda x: _attack(steps, step=6.0)(_losses(model, variables, labels), x,
                                                   jax.random.key(0)))(images)
  std = np.array(STD)
  delta_pixels = np.abs(np.asarray(adv - images)) * std * 255.0
  assert delta_pixels.max() <= 8.0 + 1e-3
  assert delta_pixels.max() > 7.0  # It does move: signed steps reach the ball's edge.
  pixels = (np.asarray(adv) * std + np.array(MEAN)) * 255.0
  assert pixels.min() >= -1e-3 and pixels.max() <= 255.0 + 1e-3


def test_pgd_loss_is_at_least_fgsm_loss(fixed):
  model, variables, images, labels = fixed
  losses = _losses(model, variables, labels)
  key = jax.random.key(1)
  fgsm = jax.jit(lambda x: _attack(1)(losses, x, key))(images)
  pgd = jax.jit(lambda x: _attack(7, keep_best=True)(losses, x, key))(images)
  clean_l, fgsm_l, pgd_l = (np.asarray(jax.jit(losses)(x)) for x in (images, fgsm, pgd))
  assert np.all(pgd_l >= fgsm_l - 1e-5), (pgd_l, fgsm_l)
  assert pgd_l.mean() > fgsm_l.mean() > clean_l.mean()


def test_zero_epsilon_gives_the_clean_images_and_the_clean_result(fixed):
  model, variables, images, labels = fixed
  attack = _attack(3, eps=0.0)
  np.testing.assert_array_equal(
      np.asarray(attack(_losses(model, variables, labels), images, jax.random.key(0))),
      np.asarray(images))
  # In the eval step: robust == clean, counted over the masked examples only.
  step = train.make_eval_step(model, 3, attack)
  mask = jnp.asarray([1.0] * 12 + [0.0] * 4)
  sums = jax.jit(step)({'params': variables['params'], 'batch_stats': variables['batch_stats']},
                       {'image': images, 'label': labels, 'mask': mask})
  assert float(sums['robust_correct']) == float(sums['correct'])
  assert float(sums['count']) == 12


def test_attack_reaches_the_input_through_a_frozen_prefix():
  """A linear probe stops gradients before the head; the attack model must not."""
  config = tiny_config(**{'finetune.preset': 'linear_probe', 'adversarial.train': 'fgsm'})
  setup = train.Setup(config, 3, 64, 8)
  assert setup.spec.stop_gradient_after == 'stage3'
  pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3))
  images = jnp.asarray((pixels / 255.0 - np.array(MEAN)) / np.array(STD), jnp.float32)
  labels = jnp.arange(4) % 3
  attack = _attack(1, random_start=False)
  v = setup.fresh_variables

  def moved(model):
    def losses(x):
      logits, _ = model.apply(v, x, train=True, mutable=['batch_stats'])
      return optim.cross_entropy(logits, labels, 3)
    return float(jnp.abs(attack(losses, images, jax.random.key(0)) - images).max())

  assert moved(setup.model) == 0.0  # Why the attack needs its own model.
  assert moved(setup.attack_model) > 0.0


def test_bad_adversarial_fields_are_user_errors():
  for field, value, words in [('train', 'cw', 'config.adversarial.train'),
                              ('epsilon', -1.0, 'config.adversarial.epsilon'),
                              ('clean_fraction', 1.0, 'config.adversarial.clean_fraction')]:
    with pytest.raises(UserError, match=words):
      train.validate_config(tiny_config(**{f'adversarial.{field}': value}))


def test_fgsm_training_reports_robust_accuracy_and_eval_mode_repeats_it(folder_config, tmp_path):
  config = folder_config
  config.num_train_steps = 2
  config.adversarial.train = 'fgsm'
  config.adversarial.step_size = 10.0
  config.adversarial.clean_fraction = 0.25
  config.adversarial.eval_steps = 2
  workdir = str(tmp_path / 'wd')
  results = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    saved = json.load(f)
  assert 0.0 <= saved['robust_accuracy'] <= 1.0
  assert saved['robust_accuracy'] == results['robust_accuracy']
  history = [json.loads(l) for l in open(os.path.join(workdir, 'history.jsonl'))]
  assert 'robust_accuracy' in [h for h in history if h['kind'] == 'eval'][-1]
  again = train.evaluate_checkpoint(config, workdir, report_dir=str(tmp_path / 'rep'))
  assert again['robust_accuracy'] == saved['robust_accuracy']
  assert again['num_examples'] == saved['num_examples'] == 15


def test_resume_refuses_a_changed_training_attack_but_not_a_changed_robust_eval():
  from resnet_jax import resume
  saved = tiny_config(**{'adversarial.train': 'fgsm'})
  meta = {'run': resume.run_fields(saved)}
  changed = resume.resume_changes(tiny_config(**{'adversarial.train': 'pgd'}), meta, '/none')
  assert changed == ["config.adversarial.train (checkpoint 'fgsm', now 'pgd')"]
  assert resume.resume_changes(tiny_config(**{'adversarial.train': 'fgsm',
                                              'adversarial.eval_steps': 20}), meta, '/none') == []
  # Checkpoints from before these fields existed resume as before.
  old = {'run': {k: v for k, v in meta['run'].items() if not k.startswith('adversarial.')}}
  assert resume.resume_changes(tiny_config(), old, '/none') == []


def test_a_workdir_from_before_the_adversarial_fields_can_be_scored_for_robustness(tmp_path):
  """--mode=eval --config.adversarial.eval_steps=k on an older config.json."""
  from resnet_jax import saved_config
  old = json.loads(tiny_config(**{'optimizer.learning_rate': 0.03}).to_json())
  del old['adversarial']
  del old['finetune']['preset']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config = saved_config.load(str(tmp_path))
  assert config.adversarial.eval_steps == 0 and config.finetune.preset == 'full'
  assert config.optimizer.learning_rate == 0.03  # The workdir's own values stay.


def test_final_console_line_gives_clean_and_robust_accuracy_and_the_ema_one(tmp_path, capsys):
  """The final report ends with one line per extra figure: robust (adversarial.eval_steps)
  and the weight average (config.ema), each beside the clean accuracy."""
  import numpy as np

  from resnet_jax import reporting
  rep = reporting.Reporter(str(tmp_path), ['a', 'b'], 10)
  try:
    rep.eval_results(10, {'accuracy': 0.75, 'robust_accuracy': 0.25, 'top5_accuracy': 1.0,
                          'loss': 0.5, 'num_examples': 4, 'ema_accuracy': 0.5,
                          'ema_loss': 0.6, 'ema_top5_accuracy': 1.0,
                          'confusion': np.asarray([[2, 0], [1, 1]])}, final=True)
  finally:
    rep.close()
  out = capsys.readouterr().out
  assert 'accuracy 0.7500 clean, 0.2500 robust' in out
  assert 'accuracy 0.7500 raw weights, 0.5000 EMA weights' in out
