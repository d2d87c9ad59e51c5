"""What the person at the terminal sees, and what they are spared.

* `start_block`: one short block at start: data, model, schedule, workdir, and
  how the run starts (new, resumed at a step, or fine-tuned from what).
* `Progress`: one line per log step: step/total, loss, accuracy, learning rate,
  images/s and ETA.
* `write_parameter_table`: the per-tensor table goes to a file, not the console.
* The known noise is dropped: TensorFlow's native start-up lines, JAX's
  "Unable to initialize backend 'tpu'", Orbax/etils/TFDS/clu INFO chatter and
  Orbax's "directory is read only".
* `install_startup_interrupt`: Ctrl-C before training starts ends the process
  at once with one line and exit code 130 (a KeyboardInterrupt raised inside
  a half-done TensorFlow or XLA import used to end in a segfault).

This module imports nothing heavy, so `main` can use it before JAX is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Any, Iterator

# fd where one-line messages go; differs from 2 while TensorFlow's import is captured.
_stderr_fd = 2


# --------------------------------------------------------------------------- interrupts


def _exit_on_interrupt(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
  os.write(_stderr_fd, b'interrupted before training started; nothing was written\n')
  os._exit(128 + signum)  # pylint: disable=protected-access


def install_startup_interrupt() -> None:
  """SIGINT ends the process at once: start-up has written nothing, so nothing is lost.

  `os._exit` skips the interpreter's teardown, which is what crashed when
  TensorFlow or XLA had been interrupted half-initialised. The training loop
  replaces this handler with its own (checkpoint, then exit) once it holds
  the workdir.
  """
  signal.signal(signal.SIGINT, _exit_on_interrupt)


# --------------------------------------------------------------------------- noise

_NATIVE_NOISE = ('All log messages before absl::InitializeLog() is called',
                 'oneDNN custom operations are on', 'cpu_feature_guard.cc',
                 'To enable the following instructions', 'This TensorFlow binary is optimized')
_QUIET_BELOW_WARNING = ('/orbax/', '/etils/', '/tensorflow_datasets/', '/clu/', 'xla_bridge.py',
                        '/jax/_src/distributed.py')
_ALWAYS_QUIET = ("Unable to initialize backend 'tpu'", 'Given directory is read only',
                 'is experimental and not all JAX functionality')


class QuietLibraries(logging.Filter):
  """Drops library INFO chatter and a few warnings that are never actionable here."""

  def filter(self, record: logging.LogRecord) -> bool:
    if any(m in record.pathname for m in _QUIET_BELOW_WARNING) and record.levelno < logging.WARNING:
      return False
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not any(m in message for m in _ALWAYS_QUIET)


def quiet_libraries() -> None:
  """Installs `QuietLibraries` on the root handlers (after absl has added its own)."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, QuietLibraries) for f in handler.filters):
      handler.addFilter(QuietLibraries())


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
  """Captures fd 2 (C++ logging) and passes on every line but the known start-up noise."""
  global _stderr_fd
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    _stderr_fd = saved
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      _stderr_fd = 2
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode(errors='replace').splitlines(keepends=True)
      kept = ''.join(l for l in lines if not any(n in l for n in _NATIVE_NOISE))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow now, minus the lines its native libraries print on load."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  with native_stderr_filtered():
    import tensorflow  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


# --------------------------------------------------------------------------- output


def say(text: str) -> None:
  """Console output for the person running the job (stdout, flushed)."""
  print(text, flush=True)


def _count(n: int) -> str:
  return f'{n:,}'


def describe_data(config: Any, info: Any) -> str:
  cds = config.dataset
  if cds.name == 'image_folder':
    source = f'image folder {os.path.abspath(cds.data_dir)}'
  else:
    source = f'TFDS {cds.name}' + (f' in {cds.data_dir}' if cds.get('data_dir', '') else '')
  return (f'{source}: {_count(info.num_train)} train ({cds.train_split}) / '
          f'{_count(info.num_eval)} eval ({cds.eval_split}) examples, '
          f'{info.num_classes} classes, {info.image_size}x{info.image_size} images')


def describe_init(init_from: str, cache_dir: str = '') -> str:
  """Which weights a fine-tune starts from: the checkpoint step, the file, or the named source."""
  if not init_from:
    return ''
  if ':' in init_from and not os.path.exists(init_from):
    scheme, name = init_from.split(':', 1)
    if scheme == 'torchvision' and cache_dir:
      from resnet_jax import pretrained  # pylint: disable=import-outside-toplevel
      url = getattr(pretrained, 'TORCHVISION_URLS', {}).get(name)
      if url:
        return f'{init_from} ({os.path.join(os.path.expanduser(cache_dir), os.path.basename(url))})'
    return init_from
  if os.path.isfile(init_from):
    return f'weight file {os.path.abspath(init_from)}'
  from resnet_jax import checkpointing  # pylint: disable=import-outside-toplevel
  try:
    root, step = checkpointing.find_checkpoint_root(init_from)
  except Exception:  # pylint: disable=broad-except
    return init_from
  if step is None:
    from resnet_jax import resume  # pylint: disable=import-outside-toplevel
    steps = resume.steps_on_disk(root)
    step = steps[-1] if steps else None
  return f'checkpoint step {step} of {root}'


def start_block(config: Any, info: Any, params: dict[str, int], *, num_devices: int,
                platform: str, total_steps: int, workdir: str, start_step: int,
                init: str = '', parameter_file: str = '') -> str:
  """The start-up summary: what is trained on what, how long, where, and from where."""
  m = config.model
  model = m.name + (f' (width {m.width_multiplier:g})' if float(m.width_multiplier) != 1 else '')
  batch = int(config.batch_size)
  per_epoch = info.num_train // batch if batch else 0
  epochs = f' ({total_steps / per_epoch:.3g} epochs)' if per_epoch else ''
  if start_step >= total_steps and start_step:
    start = f'already at the final step {start_step}; evaluating it'
  elif start_step:
    start = f'resuming at step {start_step} of {total_steps}'
  elif init:
    start = f'new run, fine-tuning from {init}'
  else:
    start = 'new run from random initialisation'
  table = f'; per tensor in {parameter_file}' if parameter_file else ''
  preset = (config.get('finetune') or {}).get('preset', 'full') or 'full'
  preset = f' (finetune.preset {preset})' if preset != 'full' else ''
  lines = [
      f'data      {describe_data(config, info)}',
      f'model     {model}: {_count(params["total"])} parameters, {_count(params["trainable"])} '
      f'trainable{preset}, {_count(params["frozen"])} frozen{table}',
      f'schedule  batch {batch} on {num_devices} {platform} device{"s" * (num_devices != 1)} '
      f'({config.get("parallelism", "jit")}), {per_epoch} steps per epoch, {total_steps} steps'
      f'{epochs}',
      f'workdir   {workdir}',
      f'start     {start}',
  ]
  from resnet_jax import adversarial  # pylint: disable=import-outside-toplevel
  robust = adversarial.describe(config)
  if robust:
    lines.insert(2, f'robust    {robust}')
  return '\n'.join(lines)


def format_duration(seconds: float) -> str:
  seconds = int(round(max(seconds, 0)))
  h, rest = divmod(seconds, 3600)
  return f'{h}:{rest // 60:02d}:{rest % 60:02d}'


class Progress:
  """Throughput and ETA from the wall clock, counted from the first finished step.

  The first step includes compilation, so the clock starts when it finishes
  (`first_step_done`). images/s is the training speed since the previous log
  line, without the evaluations and checkpoints in between (`skip`); the ETA
  divides the steps left by the average pace since the first step, those
  pauses included, since the rest of the run will have them too.
  """

  def __init__(self, total_steps: int, global_batch: int):
    self.total = total_steps
    self.batch = global_batch
    self._start: tuple[int, float] | None = None
    self._mark: tuple[int, float] | None = None
    self._images_per_sec: float | None = None

  def first_step_done(self, step: int) -> None:
    self._start = self._mark = (step, time.monotonic())

  def skip(self, step: int) -> None:
    """Leaves the time since the last mark (an evaluation, a checkpoint) out of images/s."""
    if self._mark is not None:
      self._mark = (step, time.monotonic())

  def images_per_sec(self, step: int) -> float | None:
    """Training images per second since the last mark (None until a timed step finished)."""
    now = time.monotonic()
    if self._mark is not None and step > self._mark[0] and now > self._mark[1]:
      self._images_per_sec = (step - self._mark[0]) * self.batch / (now - self._mark[1])
      self._mark = (step, now)
    return self._images_per_sec

  def eta(self, step: int) -> str:
    now = time.monotonic()
    if self._start is None or step <= self._start[0] or now <= self._start[1]:
      return '-'
    return format_duration((self.total - step) * (now - self._start[1]) / (step - self._start[0]))

  def line(self, step: int, means: dict[str, float], images_per_sec: float | None) -> str:
    width = len(str(self.total))
    speed = f'{images_per_sec:,.0f} img/s' if images_per_sec else '- img/s'
    return (f'step {step:>{width}}/{self.total}  loss {means["loss"]:.4f}  '
            f'accuracy {means["accuracy"]:.4f}  lr {means["learning_rate"]:.4g}  {speed}  '
            f'ETA {self.eta(step)}')


def write_parameter_table(path: str, params: Any, frozen: set[str]) -> None:
  """One row per tensor (path, shape, size, trainable/frozen), then the totals."""
  from resnet_jax.optim import flat_paths  # pylint: disable=import-outside-toplevel
  flat = flat_paths(params)
  width = max([len(p) for p in flat] + [9])
  rows = [f'{"parameter":<{width}}  {"shape":<18}  {"size":>12}  status']
  totals = {'trainable': 0, 'frozen': 0}
  for p, x in sorted(flat.items()):
    status = 'frozen' if p in frozen else 'trainable'
    totals[status] += int(x.size)
    rows.append(f'{p:<{width}}  {str(tuple(x.shape)):<18}  {int(x.size):>12,}  {status}')
  rows.append('')
  rows.append(f'{len(flat)} tensors, {sum(totals.values()):,} parameters: '
              f'{totals["trainable"]:,} trainable, {totals["frozen"]:,} frozen')
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write('\n'.join(rows) + '\n')
  os.replace(tmp, path)
