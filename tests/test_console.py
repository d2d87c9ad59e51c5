"""The console: one start-up block, one progress line per log step, the parameter table in a
file, and none of the libraries' known noise."""

import logging
import os
import re
import signal
import subprocess
import sys

from resnet_jax import console, train
from tests.conftest import REPO, subprocess_env

PROGRESS = re.compile(r'^step +(\d+)/(\d+)  loss (\d+\.\d{4})  accuracy (\d\.\d{4})  '
                      r'lr (\S+)  (-|[\d,]+) img/s  ETA (-|\d+:\d\d:\d\d)$')


def _block(out):
  lines = out.splitlines()
  return {l.split()[0]: l for l in lines if l.split() and l.split()[0] in
          ('data', 'model', 'schedule', 'workdir', 'start')}


def test_start_block_and_progress_lines_of_new_resumed_and_fine_tuned_runs(folder_config, tmp_path, capsys):
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(folder_config, workdir)
  out = capsys.readouterr().out
  block = _block(out)
  images = folder_config.dataset.data_dir
  assert block['data'] == (f'data      image folder {images}: 30 train (train) / 15 eval (test) '
                           'examples, 3 classes, 8x8 images')
  assert re.fullmatch(r'model     resnet20 \(width 0\.25\): 17,415 parameters, 17,415 '
                      r'trainable, 0 frozen; per tensor in .*/parameters\.txt', block['model'])
  assert block['schedule'] == ('schedule  batch 8 on 4 cpu devices (jit), 3 steps per epoch, '
                               '4 steps (1.33 epochs)')
  assert block['workdir'] == f'workdir   {workdir}'
  assert block['start'] == 'start     new run from random initialisation'
  progress = [PROGRESS.match(l) for l in out.splitlines() if l.startswith('step ')]
  assert [(m.group(1), m.group(2)) for m in progress] == [('2', '4'), ('4', '4')]
  assert float(progress[0].group(5)) > 0 and progress[-1].group(6) != '-'  # lr, img/s
  assert re.search(r'^first step 1 done \d+\.\d s after the loop started', out, re.M)
  assert 'stage1/block0/conv1/kernel' not in out  # The table is in the file only.
  table = open(os.path.join(workdir, 'parameters.txt')).read()
  assert re.search(r'^stage1/block0/conv1/kernel +\(3, 3, 4, 4\) +144  trainable$', table, re.M)

  # Rerun with more steps (a change the user must confirm): it says it resumes, and from
  # which step.
  folder_config.num_train_steps = 6
  folder_config.allow_resume_changes = True
  train.train_and_evaluate(folder_config, workdir)
  out = capsys.readouterr().out
  assert _block(out)['start'] == 'start     resuming at step 4 of 6'
  assert [PROGRESS.match(l).group(1) for l in out.splitlines() if l.startswith('step ')] == [
      '6']

  # Fine-tune from that workdir with the stem and stage1 frozen: the block names the
  # checkpoint step, counts frozen parameters, and the table marks them.
  folder_config.finetune.init_from = workdir
  folder_config.finetune.freeze_stages = 1
  folder_config.num_train_steps = 2
  tuned = str(tmp_path / 'tuned')
  train.train_and_evaluate(folder_config, tuned)
  block = _block(capsys.readouterr().out)
  assert block['start'] == f'start     new run, fine-tuning from checkpoint step 6 of {workdir}'
  frozen = int(re.search(r'([\d,]+) frozen', block['model']).group(1).replace(',', ''))
  table = open(os.path.join(tuned, 'parameters.txt')).read()
  assert re.search(r'^stem/conv/kernel +\(3, 3, 3, 4\) +108  frozen$', table, re.M)
  assert re.search(r'^head/kernel .* trainable$', table, re.M)
  assert frozen == sum(int(l.split()[-2].replace(',', '')) for l in table.splitlines()
                       if l.endswith('  frozen'))


def test_init_source_descriptions(tmp_path):
  weights = tmp_path / 'w.safetensors'
  weights.write_bytes(b'')
  assert console.describe_init(str(weights)) == f'weight file {weights}'
  assert console.describe_init('torchvision:resnet50', '/cache') == (
      'torchvision:resnet50 (/cache/resnet50-0676ba61.pth)')
  assert console.describe_init('') == ''


def test_progress_line_reports_training_speed_and_eta(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(console.time, 'monotonic', lambda: now[0])
  progress = console.Progress(total_steps=1000, global_batch=64)
  progress.first_step_done(1)
  now[0] = 110.0
  rate = progress.images_per_sec(101)  # 100 steps of 64 images in 10 s.
  assert rate == 640.0
  line = progress.line(101, {'loss': 1.23456, 'accuracy': 0.5, 'learning_rate': 0.1}, rate)
  assert line == 'step  101/1000  loss 1.2346  accuracy 0.5000  lr 0.1  640 img/s  ETA 0:01:30'
  assert PROGRESS.match(line)
  now[0] = 130.0  # An evaluation of 20 s: not training speed, but part of the pace.
  progress.skip(101)
  now[0] = 135.0
  rate = progress.images_per_sec(201)
  assert rate == 1280.0
  assert progress.eta(201) == '0:02:20'  # 200 steps took 35 s; 799 are left.


def test_main_console_has_the_block_and_none_of_the_known_noise(tmp_path):
  from tests.conftest import write_image_folder
  images = write_image_folder(str(tmp_path / 'images'))
  env = subprocess_env(1)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.main', '--config=configs/default.py',
       f'--workdir={tmp_path}/wd', '--config.model.name=resnet20',
       '--config.model.width_multiplier=0.25', '--config.dataset.image_size=8',
       '--config.batch_size=8', '--config.eval_batch_size=8', '--config.num_train_steps=2',
       '--config.log_every_steps=1', '--config.dataset.name=image_folder',
       '--config.dataset.eval_split=test', f'--config.dataset.data_dir={images}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  everything = proc.stdout + proc.stderr
  for noise in ("Unable to initialize backend 'tpu'", 'oneDNN', 'absl::InitializeLog',
                'Given directory is read only', 'Setting work unit notes', 'train/loss=',
                'stage1/block0/conv1/kernel'):
    assert noise not in everything, noise
  assert set(_block(proc.stdout)) == {'data', 'model', 'schedule', 'workdir', 'start'}
  assert len([l for l in proc.stdout.splitlines() if PROGRESS.match(l)]) == 2


def test_startup_interrupt_handler_exits_130_with_one_line():
  code = ('import os, signal, time\n'
          'from resnet_jax import console\n'
          'console.install_startup_interrupt()\n'
          'os.kill(os.getpid(), signal.SIGINT)\n'
          'time.sleep(30)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 128 + signal.SIGINT
  assert proc.stderr.strip().splitlines() == [
      'interrupted before training started; nothing was written']


def _record(pathname, level, message):
  return logging.LogRecord('x', level, pathname, 1, message, (), None)


def test_library_noise_is_dropped_and_warnings_that_matter_kept():
  quiet = console.QuietLibraries()
  site = '/venv/lib/python3.11/site-packages'
  dropped = [
      _record(f'{site}/orbax/checkpoint/checkpoint_manager.py', logging.INFO, 'Saving step 4'),
      _record(f'{site}/orbax/checkpoint/checkpoint_manager.py', logging.WARNING,
              'Given directory is read only=/w/checkpoints'),
      _record(f'{site}/jax/_src/xla_bridge.py', logging.INFO,
              "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"),
      _record(f'{site}/clu/platform/local.py', logging.INFO, 'Setting work unit notes: 1 steps/s'),
  ]
  kept = [
      _record(f'{site}/orbax/checkpoint/checkpoint_manager.py', logging.WARNING,
              '/w/checkpoints is read only, save will be skipped'),
      _record(f'{site}/jax/_src/xla_bridge.py', logging.WARNING,
              'An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not '
              'installed. Falling back to cpu.'),
      _record('/repo/resnet_jax/reporting.py', logging.INFO, 'Eval at step 4: accuracy 0.5'),
  ]
  assert [quiet.filter(r) for r in dropped] == [False] * len(dropped)
  assert [quiet.filter(r) for r in kept] == [True] * len(kept)


def test_native_start_up_lines_are_dropped_and_others_passed_on(capfd):
  with console.native_stderr_filtered():
    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written '
                b'to STDERR\nI0000 port.cc:153] oneDNN custom operations are on.\n'
                b'E0000 something real went wrong\n')
  assert capfd.readouterr().err == 'E0000 something real went wrong\n'
