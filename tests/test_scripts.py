"""scripts/: the benchmark's JSON line (and its TensorFlow-free imports), and predict."""

import json
import logging
import os
import subprocess
import sys

import pytest

from resnet_jax import train
from resnet_jax.errors import UserError
from tests.conftest import REPO, import_script, subprocess_env, tiny_config, write_image_folder


_BENCH_FLAGS = ['--config.model.width_multiplier=0.25', '--config.dataset.image_size=8',
                '--config.batch_size=128']


@pytest.fixture(scope='module')
def one_device_benchmark():
  """The script's own run on one device: (its JSON line, whether TensorFlow was loaded)."""
  code = ('import sys, runpy; sys.argv = ["benchmark.py", "--config=configs/mnist.py", '
          + ''.join(f'"{f}", ' for f in _BENCH_FLAGS) + '"--steps=1", "--rounds=1"]\n'
          'try:\n  runpy.run_path("scripts/benchmark.py", run_name="__main__")\n'
          'except SystemExit:\n  pass\n'
          'print("TF_LOADED", any(m.startswith("tensorflow") for m in sys.modules))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  return json.loads(lines[-2]), lines[-1]


def test_benchmark_prints_json_without_importing_tensorflow(one_device_benchmark):
  result, tf_loaded = one_device_benchmark
  assert tf_loaded == 'TF_LOADED False'
  for key in ('images_per_sec', 'step_time_ms', 'compile_time_s', 'num_devices', 'device_kind',
              'flops_per_image', 'mfu'):
    assert key in result
  assert result['num_devices'] == 1 and result['images_per_sec'] > 0
  assert result['flops_per_image'] > 1e5   # ResNet-20/4 at 8px: a few MFLOP per image.


def test_benchmark_counts_the_flops_of_all_devices(one_device_benchmark):
  """XLA's cost analysis describes one device's program (and a scan body once): over 4
  devices with 2 accumulation steps the global figure per image is still the same."""
  benchmark = import_script('benchmark')
  from configs import mnist  # pylint: disable=import-outside-toplevel
  config = mnist.get_config()   # As _BENCH_FLAGS set it, plus accumulation.
  config.model.width_multiplier, config.dataset.image_size, config.batch_size = 0.25, 8, 128
  config.grad_accum_steps = 2
  four = benchmark.benchmark(config, steps=1, rounds=1, num_classes=10, compare_torch=False)
  assert four['num_devices'] == 4
  one = one_device_benchmark[0]['flops_per_image']
  assert four['flops_per_image'] == pytest.approx(one, rel=0.05)
  # Exact reductions: the step runs under shard_map, which binds BatchNorm's axis.
  config.exact_reductions, config.grad_accum_steps = True, 1
  exact = benchmark.benchmark(config, steps=1, rounds=1, num_classes=10, compare_torch=False)
  assert exact['num_devices'] == 4 and exact['images_per_sec'] > 0


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of one short training run: predict only reads it."""
  base = tmp_path_factory.mktemp('predict')
  config = tiny_config(**{'dataset.name': 'image_folder', 'dataset.eval_split': 'test',
                          'dataset.data_dir': write_image_folder(str(base / 'images')),
                          'num_train_steps': 2})
  train.train_and_evaluate(config, str(base / 'wd'))
  return config, str(base / 'wd')


def test_predict_prints_top_k_with_class_names(trained, tmp_path, caplog):
  predict = import_script('predict')
  folder_config, workdir = trained
  folder = os.path.join(folder_config.dataset.data_dir, 'test', 'dog')
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'nope')
  with caplog.at_level(logging.WARNING):
    results = predict.predict(workdir, [folder, str(bad)], top_k=2)
  assert len(results) == len(os.listdir(folder)) == 5
  for path, top in results:
    assert len(top) == 2 and {n for n, _ in top} <= {'cat', 'dog', 'frog'}
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 <= probs[-1] and sum(probs) <= 1 + 1e-6
  assert any('broken.jpg' in r.getMessage() for r in caplog.records)
  with pytest.raises(UserError, match='config.json'):
    predict.predict(str(tmp_path), [folder])


def test_predict_uses_config_json_and_names_a_mismatched_field(trained):
  predict = import_script('predict')
  from resnet_jax import saved_config
  folder_config, workdir = trained
  image = os.path.join(folder_config.dataset.data_dir, 'test', 'dog', '0001.jpg')
  wide = saved_config.load(workdir)
  wide.model.width_multiplier = 0.5
  with pytest.raises(UserError, match=r'config.model.width_multiplier: 0.5 differs from 0.25'):
    predict.predict(workdir, [image], config=wide)
  command = [sys.executable, 'scripts/predict.py', f'--workdir={workdir}', '--top_k=2']
  # Both command lines at once: each mostly imports in one thread.
  runs = [subprocess.Popen(command + extra, cwd=REPO, env=subprocess_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for extra in ([image], ['--config.model.name=resnet32', image])]
  (out, err), (_, mismatch_err) = [run.communicate(timeout=300) for run in runs]
  assert runs[0].returncode == 0, err[-2000:]
  assert out.strip().startswith(f'{image}: ')
  # --config.x=y applies on top of config.json (no --config file given).
  assert runs[1].returncode == 2, mismatch_err[-2000:]
  assert mismatch_err.strip().splitlines()[-1].startswith("error: config.model.name: 'resnet32'")
