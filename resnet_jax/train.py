"""A run's start-up: checks, then the lock, then the loop; and --mode=eval.

The step bodies are `steps.py` (TensorFlow-free, re-exported here);
`train_and_evaluate` pulls in the input pipeline and the metric writers, which
are not. The loop itself is
`loop.Loop`; what a checkpoint must match is `resume`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import (adversarial, augment, checkpointing, device_data, ema, mixing, models,
                        optim, parallel, preprocess, presets, resume)
from resnet_jax.errors import UserError
from resnet_jax.loop import Preempted  # noqa: F401  (main catches train.Preempted)
# The step bodies live in steps.py; callers keep using train.make_train_step & co.
from resnet_jax.steps import State, evaluate, make_eval_step, make_train_step  # noqa: F401


# --------------------------------------------------------------------------- setup


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks that need no data or devices, so bad settings fail before any work.

  The model, schedule and optimizer are checked by the functions that build
  them, called here on dummy sizes, so each rule is written once.
  """
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if int(config.get(field, 0)) < 0:
      raise UserError(f'config.{field}: must be >= 0, got {config.get(field)}')
  if int(config.get('grad_accum_steps', 1)) < 1:
    raise UserError(f'config.grad_accum_steps: must be >= 1, got {config.grad_accum_steps}')
  preprocess.sends_uint8(config.dataset)  # Checks dataset.transfer.
  if not 0.0 <= float(config.get('label_smoothing', 0.0)) < 1.0:
    raise UserError(f'config.label_smoothing: must be in [0, 1), got {config.label_smoothing}')
  std = tuple(config.dataset.get('std', ()))
  if any(not np.isfinite(float(v)) or float(v) == 0 for v in std):
    raise UserError(f'config.dataset.std: {std} holds a zero or non-finite value; images are '
                    'divided by it')
  models.create_model(config.model, num_classes=1)
  adversarial.check_config(config)
  ema.check_config(config)
  mixing.check_config(config)
  augment.check_config(config.dataset)
  presets.check_preset(config)
  optim.check_schedule(config)
  optim.check_optimizer(config)


class Setup:
  """Everything a run needs that follows from the config and the data."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, num_train: int,
               image_size: int):
    self.config = config
    exact = bool(config.get('exact_reductions', False))
    self.par = parallel.Parallel(config.get('parallelism', 'jit'), exact=exact)
    self.local_batch = self.par.check_batch('config.batch_size', int(config.batch_size))
    self.local_eval_batch = self.par.check_batch('config.eval_batch_size',
                                                 int(config.eval_batch_size))
    k = int(config.get('grad_accum_steps', 1))
    if (int(config.batch_size) // len(self.par.devices)) % k:
      raise UserError(f'config.grad_accum_steps: {k} does not divide the per-device batch '
                      f'{int(config.batch_size) // len(self.par.devices)}')
    self.num_classes = num_classes
    self.total_steps = optim.total_steps_from_config(config, num_train)
    self.schedule = optim.make_schedule(config, self.total_steps)
    rng = jax.random.key(int(config.seed))
    self.init_rng, self.dropout_rng = jax.random.split(rng)
    plain = models.create_model(config.model, num_classes)
    variables = jax.jit(lambda r: models.init_variables(plain, r, image_size))(self.init_rng)
    self.fresh_variables = jax.device_get(variables)
    # The spec needs the parameter tree; the model needs the spec. Build both in turn.
    self.spec = optim.build_param_spec(config, self.fresh_variables['params'])
    self.model = models.create_model(config.model, num_classes,
                                     bn_axis_name=self.par.bn_axis_name,
                                     frozen_bn=self.spec.frozen_bn,
                                     stop_gradient_after=self.spec.stop_gradient_after,
                                     exact_bn=exact)
    self.eval_model = models.create_model(config.model, num_classes)
    # The attack needs the gradient down to the input: no stop-gradient boundary.
    self.attack_model = models.create_model(config.model, num_classes,
                                            bn_axis_name=self.par.bn_axis_name,
                                            frozen_bn=self.spec.frozen_bn, exact_bn=exact)

  def make_state(self, variables: dict[str, Any]) -> State:
    params = variables['params']
    self.tx = optim.make_optimizer(self.config, self.spec, params, self.schedule)
    state = {'step': jnp.asarray(0, jnp.int32), 'params': params,
             'batch_stats': variables.get('batch_stats', {}),
             'opt_state': self.tx.init(params)}
    if ema.enabled(self.config):
      state['ema'] = ema.init(state)
    return state

  def evaluate(self, eval_step: Callable[..., Any], state: Any, data: Any) -> dict[str, Any]:
    """Scores the whole eval split (this process's shard) with `eval_step`."""
    return evaluate(self.par, eval_step, state,
                    data.eval_iter(self.local_eval_batch, jax.process_index(),
                                   jax.process_count(),
                                   as_uint8=preprocess.sends_uint8(self.config.dataset)))

  def steps(self):
    trainable = optim.trainable_mask(self.spec, self.fresh_variables['params'])
    train_step = make_train_step(
        self.model, self.tx, self.schedule, self.num_classes,
        float(self.config.get('label_smoothing', 0.0)),
        int(self.config.get('grad_accum_steps', 1)), self.dropout_rng,
        trainable=trainable,
        attack=adversarial.train_attack(self.config), attack_model=self.attack_model,
        clean_fraction=float(self.config.get('adversarial', {}).get('clean_fraction', 0.0)),
        exact_reductions=self.par.exact, ema_decay=ema.decay(self.config),
        ema_warmup=bool(self.config.get('ema', {}).get('warmup', True)),
        ema_moving=ema.moving_mask(trainable, self.fresh_variables.get('batch_stats', {}),
                                   self.spec.frozen_bn),
        mix=mixing.settings(self.config) if mixing.enabled(self.config) else None,
        num_shards=len(self.par.devices), loss_kind=self.config.get('loss', 'softmax_xent'),
        pixel_norm=preprocess.pixel_norm(self.config.dataset))
    options = models.compiler_options(self.config.model, self.par.devices[0].platform)
    return self.par.compile(train_step, compiler_options=options), self.eval_step()

  def eval_step(self):
    eval_step = make_eval_step(self.eval_model, self.num_classes,
                               adversarial.eval_attack(self.config),
                               jax.random.fold_in(jax.random.key(int(self.config.seed)), 2),
                               exact_reductions=self.par.exact,
                               pixel_norm=preprocess.pixel_norm(self.config.dataset))
    return self.par.compile(eval_step, donate_state=False)


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# --------------------------------------------------------------------------- entry points


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir if it holds a checkpoint) and evaluates.

  Everything that can be checked (config, data sizes, devices, init_from, the
  freeze regex, the workdir's checkpoints) is checked before the workdir is
  locked and first written, so a failing run leaves it byte-identical.
  """
  from resnet_jax import input_pipeline, loop, reporting  # TensorFlow lives here.
  from resnet_jax import workdir as workdir_lib

  data = _data_and_weights(config, workdir)
  info = data.info
  setup = Setup(config, info.num_classes, info.num_train, info.image_size)
  input_pipeline.check_steps_per_epoch(info.num_train, int(config.batch_size))
  # Reads checkpoints (or finetune.init_from, only for a fresh start); writes nothing.
  seen = resume.steps_on_disk(workdir)
  start_step, state = resume.restore_or_init(config, workdir, setup, info.class_names,
                                             info.num_train)
  train_step, eval_step = setup.steps()
  train_iter = _train_batches(config, data, setup, start_step)  # Its own checks, no writes.
  summary = setup.spec.summary(state['params'])
  state = setup.par.put_state(state)
  lead = jax.process_index() == 0

  with loop.Preemption() as preempt, workdir_lib.Lock(workdir, enabled=lead):
    if resume.steps_on_disk(workdir) != seen:  # Another run saved between our read and lock.
      raise UserError(f'--workdir: its checkpoints changed while this run was starting '
                      f'({seen} -> {resume.steps_on_disk(workdir)}); another run used it; rerun')
    if lead:
      _first_writes(config, workdir, info, setup, summary, start_step)
    total = setup.total_steps
    # closing(): also on errors, an in-flight asynchronous save finishes.
    with contextlib.closing(checkpointing.Checkpointer(
        workdir, keep=int(config.get('keep_checkpoints', 2)),
        run_meta={'run': resume.run_fields(config, info.num_train)})) as ckpt, contextlib.closing(
            reporting.Reporter(workdir, info.class_names, total)) as rep:
      if start_step:
        ckpt.set_aside_steps_after(start_step)  # Unreadable newer steps: retrained, saved again.
      return loop.Loop(
          train_step=train_step, evaluate=lambda s: setup.evaluate(eval_step, s, data),
          get_state=setup.par.get_state, get_metrics=setup.par.get_metrics, ckpt=ckpt, rep=rep,
          meta={'class_names': info.class_names, 'num_classes': info.num_classes},
          total=total, log_every=int(config.log_every_steps) or total,
          eval_every=int(config.eval_every_steps) or total,
          ckpt_every=int(config.checkpoint_every_steps) or total,
          global_batch=int(config.batch_size), lead=lead,
          stop_flag=setup.par.put_stop_flag if jax.process_count() > 1 else None,
          rank_key='ema_accuracy' if config.get('ema', {}).get('rank_by') == 'ema' else 'accuracy',
      ).run(state, train_iter, start_step, preempt)


def _data_and_weights(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The data, after the cheap checks; a missing dataset and missing weights named together.

  Config, workdir and weights are checked first (about a second, and at most one
  bounded request for weights that are not cached), so a bad setting does not
  wait for a dataset to load. The weights matter only for a fresh start: a
  resume does not read `finetune.init_from`.
  """
  from resnet_jax import input_pipeline, pretrained
  from resnet_jax import workdir as workdir_lib
  validate_config(config)
  workdir_lib.check_writable(workdir)
  weights = None if resume.has_checkpoints(workdir) else pretrained.check_source(config)
  try:
    data = input_pipeline.create_data(config)
  except UserError as e:
    raise UserError(f'{e}; {weights}' if weights else str(e)) from None
  if weights:
    raise UserError(weights)
  return data


def _first_writes(config: ml_collections.ConfigDict, workdir: str, info: Any, setup: Setup,
                  summary: dict[str, int], start_step: int) -> None:
  """config.json, parameters.txt (one row per tensor) and the start-up block on the console."""
  from resnet_jax import console
  _write_json_atomic(os.path.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))
  table = os.path.join(workdir, 'parameters.txt')
  console.write_parameter_table(table, setup.fresh_variables['params'],
                                set(setup.spec.frozen_paths()))
  ft = config.get('finetune', {})
  init = '' if start_step else console.describe_init(ft.get('init_from', ''),
                                                     ft.get('cache_dir', ''))
  console.say(console.start_block(
      config, info, summary, num_devices=len(setup.par.devices),
      platform=setup.par.devices[0].platform, total_steps=setup.total_steps, workdir=workdir,
      start_step=start_step, init=init, parameter_file=table))


def _train_batches(config: ml_collections.ConfigDict, data: Any, setup: Setup,
                   start_step: int):
  """Device-ready training batches: from a device-resident split, or prefetched host ones."""
  from resnet_jax import input_pipeline
  if config.dataset.get('on_device', False):
    if not isinstance(data.train_source, input_pipeline.Source):
      raise UserError('config.dataset.on_device: the training split must fit in memory')
    images = input_pipeline.to_uint8_images(data.train_source, data.info.image_size)
    dataset = device_data.DeviceDataset(images, data.train_source.labels, config, setup.par)
    return dataset.iterate(int(config.batch_size), start_step)
  host = data.train_iter(setup.local_batch, start_step, jax.process_index(), jax.process_count(),
                         as_uint8=preprocess.sends_uint8(config.dataset))
  return device_data.prefetch_to_device(setup.par, host, int(config.dataset.get('prefetch', 2)))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = 'latest',
                        report_dir: str | None = None, weights: str = 'raw') -> dict[str, Any]:
  """--mode=eval: evaluates the newest (or best) checkpoint and writes the report.

  Only the model's variables are read, so any optimizer the checkpoint was
  trained with restores. The checkpoints are never written. Reports go to
  `report_dir` if given, else into the workdir when it is writable and no
  training run holds it, else to stdout only.
  """
  from resnet_jax import input_pipeline, reporting

  validate_config(config)
  if which not in ('latest', 'best'):
    raise UserError(f'--checkpoint: choose latest or best, got {which!r}')
  if not resume.has_checkpoints(workdir):
    raise UserError(f'--mode=eval: no checkpoint in {os.path.abspath(workdir)}')
  data = input_pipeline.create_data(config)
  info = data.info
  setup = Setup(config, info.num_classes, info.num_train, info.image_size)
  eval_step = setup.eval_step()
  hint = ('evaluate with the config it was trained with (leave out --config to use the '
          "workdir's config.json)")
  step, variables, _ = resume.restore_variables(config, workdir, which, info.class_names,
                                                setup.fresh_variables, '--mode=eval', hint,
                                                weights=weights)
  out_dir = _report_dir(workdir, report_dir)
  # Reporter writes files; for stdout only they go to a scratch folder that is removed.
  scratch = tempfile.mkdtemp(prefix='resnet_jax_eval_') if out_dir is None else None
  rep = reporting.Reporter(out_dir or scratch, info.class_names, setup.total_steps)
  try:
    res = setup.evaluate(eval_step, setup.par.put_state(variables), data)
    results = rep.eval_results(step, res, final=True, checkpoint=which, weights=weights)
  finally:
    rep.close()
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)
  if scratch and jax.process_index() == 0:
    print(json.dumps(results), flush=True)
  return results


def _report_dir(workdir: str, report_dir: str | None) -> str | None:
  """Where eval reports go; None: stdout only (a read-only workdir and no --report_dir)."""
  if report_dir:
    try:
      os.makedirs(report_dir, exist_ok=True)
    except OSError as e:
      raise UserError(f'--report_dir: cannot create {report_dir} ({e.strerror})') from None
    if not os.access(report_dir, os.W_OK):
      raise UserError(f'--report_dir: {report_dir} is not writable')
    return os.path.abspath(report_dir)
  from resnet_jax import workdir as workdir_lib
  running = workdir_lib.holder(workdir)
  if running:
    logging.warning('%s is in use by a training run (%s): the report goes to stdout only '
                    '(--report_dir=DIR writes its files there).', workdir, running)
    return None
  if resume.writable(workdir):
    return workdir
  logging.warning('%s is read-only: the report goes to stdout only (--report_dir=DIR writes '
                  'its files there).', workdir)
  return None
