"""dataset.loader='grain': the same examples as tf.data for each (seed, step), PIL's pixels."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resnet_jax import grain_loader, input_pipeline, preprocess, resume
from resnet_jax.errors import UserError
from tests.conftest import REPO, digest, subprocess_env, tiny_config

pytest.importorskip('grain')

CLASSES, PER_CLASS = 3, 8


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
  """<root>/{train,test}/c<k>/<i>.jpg: 40x30 noise JPEGs, class k's channel at 255 in the
  left half (so a flip shows)."""
  root = tmp_path_factory.mktemp('grain') / 'images'
  rng = np.random.default_rng(0)
  for split, n in (('train', PER_CLASS), ('test', 2)):
    for c in range(CLASSES):
      d = root / split / f'c{c}'
      d.mkdir(parents=True)
      for i in range(n):
        pixels = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
        pixels[:, :20, c] = 255  # A bright left half: flips show.
        Image.fromarray(pixels).save(d / f'{i}.jpg', quality=90)
  return str(root)


def grain_config(folder, **overrides):
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': folder,
                     'dataset.eval_split': 'test', 'dataset.image_size': 16,
                     'dataset.augment': 'random_resized_crop', 'dataset.loader': 'grain',
                     'batch_size': 4, 'seed': 7})
  for key, value in overrides.items():
    group, _, leaf = key.rpartition('.')
    (c[group] if group else c)[leaf] = value
  return c


def batches(config, steps, workers, start_step=0, process_index=0, process_count=1,
            as_uint8=True):
  data = input_pipeline.create_data(config)
  it = grain_loader.train_batches(data.train_source, config, 4, start_step, process_index,
                                  process_count, as_uint8, workers=workers)
  out = [next(it) for _ in range(steps)]
  getattr(it, 'close', lambda: None)()
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_batches_are_a_function_of_seed_and_step_not_workers_or_start(jpeg_folder):
  config = grain_config(jpeg_folder)
  in_process = batches(config, 8, workers=0)
  assert in_process[0]['image'].shape == (4, 16, 16, 3)
  assert in_process[0]['image'].dtype == np.uint8
  assert in_process[0]['label'].dtype == np.int32
  assert_same(batches(config, 3, workers=1), in_process[:3])
  assert_same(batches(config, 3, workers=2), in_process[:3])
  # A resume reads on from its step, within an epoch and into the next (6 steps each).
  assert_same(batches(config, 3, workers=2, start_step=2), in_process[2:5])
  assert_same(batches(config, 1, workers=0, start_step=7), in_process[7:])


def test_processes_share_tf_datas_examples_disjointly(jpeg_folder):
  config = grain_config(jpeg_folder)
  data = input_pipeline.create_data(config)
  n = len(data.train_source)
  seen = []
  for process in (0, 1):
    step_fn = grain_loader.StepBatches(data.train_source.paths, data.train_source.labels,
                                       config, 2, process, 2, True)
    for step in (0, 1, 5, 6, 2):  # Out of order and across an epoch (6 steps of 2 x 2).
      index, counter = step_fn.indices(step)
      want = input_pipeline._train_indices(7, n, 2, step, process, 2)
      w_index, w_counter = next(want)
      np.testing.assert_array_equal(index, w_index)
      np.testing.assert_array_equal(counter, w_counter)
      if step in (0, 1, 2):
        seen.append((step, process, set(index.tolist())))
  for step in (0, 1, 2):
    a, b = [s for st, _, s in seen if st == step]
    assert not a & b
  # And the batches' labels are those of tf.data's batches.
  grain_batches = batches(config, 3, workers=0, process_index=1, process_count=2)
  config.dataset.loader = 'tf.data'
  tf_batches = input_pipeline.create_data(config).train_iter(4, 0, 1, 2, as_uint8=True)
  for g in grain_batches:
    np.testing.assert_array_equal(g['label'], next(tf_batches)['label'])


def test_float32_is_the_uint8_batch_normalised(jpeg_folder):
  config = grain_config(jpeg_folder)
  pixels = batches(config, 2, workers=0, as_uint8=True)
  floats = batches(config, 2, workers=0, as_uint8=False)
  mean, inv_std = preprocess.pixel_norm(config.dataset)
  for p, f in zip(pixels, floats):
    assert f['image'].dtype == np.float32
    np.testing.assert_array_equal(f['image'], (p['image'].astype(np.float32) - mean) * inv_std)


def test_crops_vary_and_flips_happen(jpeg_folder):
  config = grain_config(jpeg_folder)
  steps = batches(config, 6, workers=0)  # One epoch: every image once.
  images = np.concatenate([b['image'] for b in steps]).astype(np.float32)
  assert not np.array_equal(steps[0]['image'], steps[1]['image'])
  assert len({img.tobytes() for img in images}) == len(images)
  labels = np.concatenate([b['label'] for b in steps])
  assert sorted(labels.tolist()) == sorted(list(range(CLASSES)) * PER_CLASS)
  # The bright half of each image's class channel is on the left, or (flipped) on the right.
  channel = images[np.arange(len(images)), :, :, labels]
  left = channel[:, :, :8].mean((1, 2)) > channel[:, :, 8:].mean((1, 2))
  assert 0 < left.sum() < len(left)
  # The boxes: varied, inside the image, of tf.data's area and ratio (give or take rounding).
  rng = grain_loader.example_rng(7, 0)
  boxes = {grain_loader.crop_box(rng, 40, 30) for _ in range(50)}
  assert len(boxes) > 40
  for left_, top, w, h in boxes:
    assert 0 <= left_ and left_ + w <= 40 and 0 <= top and top + h <= 30
    assert 0.08 * 1200 * 0.5 <= w * h and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25


@pytest.mark.parametrize('overrides, fragment', [
    ({'dataset.loader': 'dali'}, "unknown loader 'dali'"),
    ({'dataset.augment': 'pad_crop'}, "dataset.augment='pad_crop'"),
    ({'dataset.augment': 'auto'}, "dataset.augment='pad_crop'"),  # auto at 16px is pad_crop.
    ({'dataset.randaugment': '2,9'}, 'dataset.randaugment'),
    ({'dataset.random_erasing': 0.25}, 'dataset.random_erasing'),
    ({'dataset.on_device': True}, 'dataset.on_device'),
    ({'dataset.name': 'cifar10'}, "dataset.name='cifar10'"),
    ({'dataset.grain_workers': -1}, 'config.dataset.grain_workers'),
])
def test_bad_combinations_are_one_line_user_errors(jpeg_folder, overrides, fragment):
  config = grain_config(jpeg_folder, **overrides)
  with pytest.raises(UserError) as info:
    input_pipeline.create_data(config)
  message = str(info.value)
  assert '\n' not in message and fragment in message, message
  assert message.startswith('config.dataset.')


def test_a_resume_with_another_loader_is_refused(jpeg_folder):
  grain = grain_config(jpeg_folder)
  tfdata = grain_config(jpeg_folder, **{'dataset.loader': 'tf.data'})
  meta = {'run': resume.run_fields(tfdata, 24)}
  assert resume.resume_changes(tfdata, meta, '/nonexistent', 24) == []
  assert resume.resume_changes(grain, meta, '/nonexistent', 24) == [
      "config.dataset.loader (checkpoint 'tf.data', now 'grain')"]
  del meta['run']['dataset.loader']  # A checkpoint from before the field: it was tf.data.
  assert resume.resume_changes(tfdata, meta, '/nonexistent', 24) == []
  with pytest.raises(UserError, match=r"^config\.dataset\.loader \(checkpoint 'tf\.data', "
                                      r"now 'grain'\).*allow_resume_changes"):
    resume.check_resume(grain, ['c0', 'c1', 'c2'], meta, 2, '/nonexistent', 24)


def test_command_line_trains_with_grain_and_refuses_to_resume_with_tf_data(jpeg_folder,
                                                                           tmp_path):
  workdir = str(tmp_path / 'wd')
  args = ['--config=configs/default.py', f'--workdir={workdir}',
          '--config.model.name=resnet20', '--config.model.width_multiplier=0.25',
          '--config.dataset.name=image_folder', f'--config.dataset.data_dir={jpeg_folder}',
          '--config.dataset.eval_split=test', '--config.dataset.image_size=16',
          '--config.dataset.augment=random_resized_crop', '--config.batch_size=4',
          '--config.eval_batch_size=8', '--config.num_train_steps=2',
          '--config.checkpoint_every_steps=2', '--config.eval_every_steps=0',
          '--config.dataset.grain_workers=2']
  run = lambda *extra: subprocess.run([sys.executable, '-m', 'resnet_jax.main', *args, *extra],
                                      cwd=REPO, env=subprocess_env(1), capture_output=True,
                                      text=True, timeout=300)
  proc = run('--config.dataset.loader=grain')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints')) or os.listdir(workdir)
  before = digest(workdir)
  proc = run('--config.dataset.loader=tf.data', '--config.num_train_steps=4')
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and "config.dataset.loader (checkpoint 'grain', now 'tf.data')" in \
      errors[0], proc.stderr[-2000:]
  assert digest(workdir) == before
