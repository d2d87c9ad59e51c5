"""The command line: bad input is one line naming the problem, exit 2, no traceback,
and nothing in the workdir changes."""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from resnet_jax import saved_config, train, workdir as workdir_lib
from resnet_jax.errors import UserError
from tests.conftest import REPO, digest, subprocess_env, tiny_config

FOLDER_ARGS = ['--config.model.name=resnet20', '--config.model.width_multiplier=0.25',
               '--config.dataset.image_size=8', '--config.batch_size=8',
               '--config.eval_batch_size=8', '--config.num_train_steps=2',
               '--config.checkpoint_every_steps=1', '--config.dataset.name=image_folder',
               '--config.dataset.eval_split=test']


def run_main(*args, devices=1):
  return subprocess.run([sys.executable, '-m', 'resnet_jax.main', *args], cwd=REPO,
                        env=subprocess_env(devices),
                        capture_output=True, text=True, timeout=300)


def run_main_side_by_side(*arg_lists, devices=1):
  """run_main for each argument list, two or more at a time, in order.

  A failing command line spends its seconds importing TensorFlow and JAX in one
  thread, and this process only waits: side by side they use the other cores.
  """
  workers = min(len(arg_lists), max(2, min(4, os.cpu_count() or 1)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda args: run_main(*args, devices=devices), arg_lists))


def assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == errors[0]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]



@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  from tests.conftest import write_image_folder
  base = tmp_path_factory.mktemp('cli')
  images = write_image_folder(str(base / 'images'))
  workdir = str(base / 'wd')
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': images,
                     'dataset.eval_split': 'test', 'num_train_steps': 2})
  train.train_and_evaluate(c, workdir)
  return images, workdir


BAD_OVERRIDES = [
    ('--config.model.name=resnet19', ('config.model.name', 'resnet19')),
    ('--config.optimizer.name=lamb', ('config.optimizer.name', 'lamb')),
    ('--config.schedule.name=step', ('config.schedule.name', 'step')),
    ('--config.batch_size=0', ('config.batch_size', 'positive')),
    ('--config.finetune.freeze=^stage9/', ('config.finetune.freeze', 'matches no parameter')),
    ('--config.dataset.train_split=nosuchsplit', ('config.dataset.train_split', 'nosuchsplit')),
    ('--config.batch_size=abc', ('batch_size',)),
    ('--config.no_such_field=1', ('no_such_field',)),
    ('--config.model.name=resnet32', ('config.model.name', 'new workdir')),
    ('--config.model.width_multiplier=0.5', ('config.model.width_multiplier', 'new workdir')),
    ('--config.batch_size=100000', ('config.batch_size', 'larger than the training split')),
]


@pytest.fixture(scope='module')
def bad_override_runs(trained_workdir, tmp_path_factory):
  """{override: (process, its workdir, the workdir's digest before)}, all run side by side.

  Each run gets its own copy of the trained workdir, so a run that wrote to it fails
  its own test.
  """
  images, workdir = trained_workdir
  base = tmp_path_factory.mktemp('bad_overrides')
  copies = [str(base / str(i)) for i in range(len(BAD_OVERRIDES))]
  for copy in copies:
    shutil.copytree(workdir, copy)
  before = [digest(copy) for copy in copies]
  procs = run_main_side_by_side(*[
      ('--config=configs/default.py', f'--workdir={copy}', *FOLDER_ARGS,
       f'--config.dataset.data_dir={images}', override)
      for copy, (override, _) in zip(copies, BAD_OVERRIDES)])
  return {override: run for (override, _), run in zip(BAD_OVERRIDES, zip(procs, copies, before))}


@pytest.mark.parametrize('override,fragments', BAD_OVERRIDES)
def test_bad_input_is_one_line_and_leaves_the_workdir_untouched(bad_override_runs, override,
                                                                 fragments):
  proc, workdir, before = bad_override_runs[override]
  assert_one_line_error(proc, *fragments)
  assert digest(workdir) == before


@pytest.mark.parametrize('overrides,fragment', [
    ({'batch_size': 100000}, 'config.batch_size'),
    ({'dataset.std': (0.2, 0.0, 0.2)}, 'config.dataset.std'),
    ({'finetune.freeze': '^stage9/'}, 'config.finetune.freeze'),
    ({'parallelism': 'pmap', 'dataset.on_device': True}, 'config.dataset.on_device'),
    ({'grad_accum_steps': 3}, 'config.grad_accum_steps'),
    ({'batch_size': 6}, 'config.batch_size'),  # Does not divide over the 4 test devices.
])
def test_failed_run_leaves_a_trained_workdir_byte_identical(trained_workdir, overrides,
                                                             fragment):
  images, workdir = trained_workdir
  before = digest(workdir)
  # The settings the workdir was trained with, so that only the bad one can fail.
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': images,
                     'dataset.eval_split': 'test', 'num_train_steps': 2, **overrides})
  with pytest.raises(UserError, match=fragment.replace('.', r'\.')):
    train.train_and_evaluate(c, workdir)
  assert digest(workdir) == before


def test_missing_init_from_leaves_a_fresh_workdir_as_it_was(trained_workdir, tmp_path):
  # init_from is read only for a fresh start (a resume ignores it), so a workdir without
  # checkpoints: one holding only the user's notes.
  images, _ = trained_workdir
  workdir = tmp_path / 'fresh'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  before = digest(str(workdir))
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': images,
                     'dataset.eval_split': 'test', 'finetune.init_from': '/no/such/checkpoint'})
  with pytest.raises(UserError, match=r'config\.finetune\.init_from'):
    train.train_and_evaluate(c, str(workdir))
  assert digest(str(workdir)) == before


def test_second_run_on_a_workdir_in_use_is_refused(trained_workdir):
  images, workdir = trained_workdir
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': images,
                     'dataset.eval_split': 'test', 'num_train_steps': 2})
  with workdir_lib.Lock(workdir):
    before = digest(workdir)
    with pytest.raises(UserError) as info:
      train.train_and_evaluate(c, workdir)
    assert digest(workdir) == before
  message = str(info.value)
  assert message.startswith('--workdir') and 'in use' in message, message
  assert f'pid {os.getpid()} on {os.uname().nodename}' in message, message
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))


def test_stale_lock_of_a_dead_process_is_taken_over(trained_workdir, tmp_path, caplog):
  images, _ = trained_workdir
  workdir = str(tmp_path / 'wd')
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  os.makedirs(workdir)
  with open(os.path.join(workdir, workdir_lib.LOCK_NAME), 'w') as f:
    f.write(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "started": 0}}\n')
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': images,
                     'dataset.eval_split': 'test', 'num_train_steps': 2})
  results = train.train_and_evaluate(c, workdir)
  assert results['step'] == 2
  stale = [r.getMessage() for r in caplog.records if 'stale lock' in r.getMessage()]
  assert len(stale) == 1 and f'pid {dead.pid}' in stale[0], stale
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))  # Released at exit.


def test_ctrl_c_during_start_up_exits_130_in_one_line(trained_workdir, tmp_path):
  images, _ = trained_workdir
  workdir = str(tmp_path / 'wd')
  env = subprocess_env(1)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'resnet_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', *FOLDER_ARGS, f'--config.dataset.data_dir={images}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.5)  # Importing absl, JAX and TensorFlow.
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  assert err.strip().splitlines()[-1].startswith('interrupted'), err[-2000:]
  assert not os.path.exists(workdir)


def test_missing_data_dir_and_unknown_dataset(tmp_path):
  missing_dir, unknown = run_main_side_by_side(
      ('--config=configs/default.py', f'--workdir={tmp_path}/wd', *FOLDER_ARGS,
       '--config.dataset.data_dir=/no/such/folder'),
      ('--config=configs/default.py', f'--workdir={tmp_path}/wd2',
       '--config.dataset.name=no_such_dataset_xyz', f'--config.dataset.data_dir={tmp_path}'))
  assert_one_line_error(missing_dir, 'config.dataset.data_dir', '/no/such/folder')
  assert not os.path.exists(f'{tmp_path}/wd')
  assert_one_line_error(unknown, 'config.dataset.name', 'no_such_dataset_xyz')
  assert not os.path.exists(f'{tmp_path}/wd2')


def test_batch_that_does_not_divide_over_devices(trained_workdir, tmp_path):
  images, _ = trained_workdir
  proc = run_main('--config=configs/default.py', f'--workdir={tmp_path}/wd', *FOLDER_ARGS,
                  f'--config.dataset.data_dir={images}', '--config.batch_size=6', devices=4)
  assert_one_line_error(proc, 'config.batch_size', '6', '4 devices')
  assert not os.path.exists(f'{tmp_path}/wd')


def test_workdir_that_is_a_file(trained_workdir, tmp_path):
  images, _ = trained_workdir
  target = tmp_path / 'afile'
  target.write_text('keep me')
  proc = run_main('--config=configs/default.py', f'--workdir={target}', *FOLDER_ARGS,
                  f'--config.dataset.data_dir={images}')
  assert_one_line_error(proc, '--workdir', 'not a directory')
  assert target.read_text() == 'keep me'


def test_eval_mode_without_a_checkpoint_and_missing_config(tmp_path):
  no_checkpoint, missing_config = run_main_side_by_side(
      ('--config=configs/default.py', f'--workdir={tmp_path}', '--mode=eval'),
      ('--config=configs/nope.py', f'--workdir={tmp_path}'))
  assert_one_line_error(no_checkpoint, '--mode=eval', 'no checkpoint')
  assert_one_line_error(missing_config, 'nope.py')


def test_cli_trains_and_eval_mode_reports(trained_workdir, tmp_path):
  images, _ = trained_workdir
  workdir = str(tmp_path / 'cli_wd')
  proc = run_main('--config=configs/default.py', f'--workdir={workdir}', *FOLDER_ARGS,
                  f'--config.dataset.data_dir={images}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, 'eval_results.json'))
  proc = run_main('--config=configs/default.py', f'--workdir={workdir}', *FOLDER_ARGS,
                  f'--config.dataset.data_dir={images}', '--mode=eval', '--checkpoint=best')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'precision' in proc.stdout  # The classification-report table.
  saved = json.load(open(os.path.join(workdir, 'eval_results.json')))
  # Step 1 was a periodic save without metrics: only step 2 was evaluated, so it is the best.
  assert (saved['step'], saved['checkpoint']) == (2, 'best')


def test_eval_best_scores_the_best_step_not_the_newest(image_folder, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'wd')
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': image_folder,
                     'dataset.eval_split': 'test', 'num_train_steps': 2, 'eval_every_steps': 1,
                     'keep_checkpoints': 1})
  accuracies, evaluate = iter([0.9, 0.1]), train.evaluate

  def fixed_accuracy(*args, **kwargs):  # Step 1 scores 0.9, step 2 scores 0.1.
    return {**evaluate(*args, **kwargs), 'accuracy': next(accuracies)}

  monkeypatch.setattr(train, 'evaluate', fixed_accuracy)
  train.train_and_evaluate(c, workdir)
  monkeypatch.undo()
  assert train.evaluate_checkpoint(c, workdir, 'latest')['step'] == 2
  # In this process: --checkpoint=best on the command line is test_cli_trains_and_eval_mode_reports'.
  assert train.evaluate_checkpoint(c, workdir, 'best')['step'] == 1
  saved = json.load(open(os.path.join(workdir, 'eval_results.json')))
  assert (saved['step'], saved['checkpoint']) == (1, 'best')


def test_eval_mode_takes_the_workdirs_config_and_overrides_on_top(trained_workdir, tmp_path):
  images, workdir = trained_workdir
  before = digest(workdir)
  reports = str(tmp_path / 'reports')
  proc, mismatch = run_main_side_by_side(
      (f'--workdir={workdir}', '--mode=eval', f'--report_dir={reports}'),
      (f'--workdir={workdir}', '--mode=eval', '--config.model.width_multiplier=0.5'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(os.path.join(reports, 'eval_results.json')))['step'] == 2
  assert_one_line_error(mismatch, 'config.model.width_multiplier', '0.5', '0.25', 'step 2')
  config = saved_config.load(workdir)
  config.dataset.classes = 'cat,dog'
  with pytest.raises(UserError, match=r'^config.dataset.classes: the data has 2 classes'):
    train.evaluate_checkpoint(config, workdir)
  assert digest(workdir) == before


def test_eval_mode_on_a_read_only_workdir(trained_workdir, tmp_path):
  """chmod a-w does not stop root: then the digest shows that nothing was written."""
  images, trained = trained_workdir
  workdir = str(tmp_path / 'ro')
  shutil.copytree(trained, workdir)
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files + ['.']:
      path = os.path.join(root, name)
      os.chmod(path, os.stat(path).st_mode & ~0o222)
  before = digest(workdir)
  try:
    proc = run_main('--config=configs/default.py', f'--workdir={workdir}', *FOLDER_ARGS,
                    f'--config.dataset.data_dir={images}', '--mode=eval', '--checkpoint=best')
  finally:
    subprocess.run(['chmod', '-R', 'u+w', workdir], check=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert digest(workdir) == before
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (printed['step'], printed['checkpoint'], printed['num_examples']) == (2, 'best', 15)
