"""scripts/benchmark.py --mode=input (the host pipeline alone) and --mode=loop (loop vs step)."""

import json
import subprocess
import sys

from tests.conftest import REPO, import_script, subprocess_env, tiny_config


def test_input_mode_times_the_pipeline_and_counts_what_it_read(image_folder):
  benchmark = import_script('benchmark')
  config = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': image_folder,
                          'dataset.eval_split': 'test'})
  result = benchmark.benchmark_input(config, steps=3, warmup=2)
  json.dumps(result)   # One JSON line.
  assert result['images'] == 3 * 8 and result['batch_size'] == 8
  assert result['images_per_sec'] > 0 and result['images_per_sec_per_core'] > 0
  assert result['cores'] >= 1
  assert result['images_per_sec_per_core'] * result['cores'] == result['images_per_sec']
  assert (result['dataset'], result['image_size'], result['augment']) == (
      'image_folder', 8, 'pad_crop')


def test_loop_mode_reports_both_rates_and_their_ratio(capsys):
  benchmark = import_script('benchmark')
  config = tiny_config(**{'log_every_steps': 2})
  result = benchmark.benchmark_loop(config, steps=3, rounds=2, num_classes=10)
  json.dumps(result)
  assert result['loop_images_per_sec'] > 0 and result['step_images_per_sec'] > 0
  assert result['loop_efficiency'] > 0  # No range: a loaded machine moves either side.
  assert result['loop_efficiency'] == (result['loop_images_per_sec']
                                       / result['step_images_per_sec'])
  assert len(result['loop_step_ms']) == len(result['bare_step_ms']) == 2
  # The real loop ran: its progress lines, at log_every and at the end.
  assert 'step 2/4' in capsys.readouterr().out


def test_unknown_mode_is_a_one_line_error():
  proc = subprocess.run([sys.executable, 'scripts/benchmark.py', '--mode=fast',
                         '--config=configs/default.py'], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=subprocess_env())
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --mode: choose step, input, loop; got 'fast'"]
  assert proc.stdout == ''


def test_torch_comparison_uses_channels_last_and_the_best_round_of_each_side():
  import pytest  # pylint: disable=import-outside-toplevel
  pytest.importorskip('torch')
  benchmark = import_script('benchmark')
  config = tiny_config()
  result = benchmark.benchmark(config, steps=1, rounds=2, num_classes=10, compare_torch=True)
  assert result['torch_channels_last'] is True
  assert result['jax_over_torch'] == pytest.approx(
      result['torch_step_time_ms'] / result['step_time_ms'])
  assert result['images_per_sec'] == pytest.approx(8 / (result['step_time_ms'] / 1000))
  assert len(result['round_ms']) == len(result['torch_round_ms']) == 2
  assert result['step_time_ms'] == min(result['round_ms'])
  assert result['torch_step_time_ms'] == min(result['torch_round_ms'])
