"""The training loop: steps, their metrics, and when to log, evaluate, save and stop.

What it guarantees:
  * at most two steps in flight, and each step's loss is checked as the step
    finishes: a non-finite loss stops the run one step after it appears, with
    the step and learning rate in the message;
  * no report, picture or checkpoint of a model with non-finite parameters;
  * the training of an evaluation step survives a failing evaluation (see
    `Loop.evaluate_and_save`);
  * SIGTERM/SIGINT (`Preemption`) save a checkpoint at the current step and stop;
    with several processes, a signal that reaches any of them stops all of
    them at the same step (see `Loop.stop_flag`).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from resnet_jax import console


class Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step; a second one stops at once."""

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self) -> 'Preemption':
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    if self.signum is not None:  # A second signal: stop now, unwinding (the lock is released).
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc: Any) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)


class Preempted(Exception):
  def __init__(self, step: int, signum: int, saved: bool = True):
    if saved:
      what = f'at step {step}; checkpoint saved, rerun the same command to resume'
    else:
      what = f'before training step {step + 1}; nothing new to save, rerun the same command'
    super().__init__(f'stopped by signal {signum} {what}')
    self.step, self.signum = step, signum


def _all_finite(tree: Any) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


class StepMetrics:
  """Host copies of the metrics of finished steps, each loss checked as its step finishes."""

  def __init__(self, get_metrics: Callable[[Any], Any], first_step: int):
    self._get = get_metrics
    self._first = first_step
    self._in_flight: list[tuple[int, Any]] = []
    self.finished: list[dict[str, Any]] = []
    self.stop_signum: int | None = None  # The agreed stop flag of a finished step, if any.

  def add(self, step: int, metrics: Any) -> None:
    """Records step's (device) metrics; waits for the step before it, bounding the queue."""
    self._in_flight.append((step, metrics))
    if len(self._in_flight) > 1:
      # At most two steps in flight: enough to keep the device busy, and a
      # signal or an error is acted on within a step, not dozens.
      self._finish(*self._in_flight.pop(0))

  def finish_all(self) -> None:
    while self._in_flight:
      self._finish(*self._in_flight.pop(0))

  def take(self) -> list[dict[str, Any]]:
    self.finish_all()
    taken, self.finished = self.finished, []
    return taken

  def _finish(self, step: int, metrics: Any) -> None:
    host = dict(self._get(metrics))
    stop = int(host.pop('stop', 0))
    if stop and self.stop_signum is None:
      self.stop_signum = stop
    loss, lr = float(host['loss']), float(host['learning_rate'])
    if not np.isfinite(loss):
      if step == self._first + 1:
        hint = ('(the first step of this run, before any update): check the input data '
                '(config.dataset.mean/std) and the weights it started from')
      else:
        hint = (f'with learning rate {lr:.4g}; lower config.optimizer.learning_rate '
                '(or add schedule.warmup_steps)')
      raise FloatingPointError(f'training loss became {loss} at step {step} {hint}; stopped, '
                               'no checkpoint of it was written')
    self.finished.append(host)


def results_brief(results: dict[str, Any]) -> dict[str, Any]:
  return {k: results[k] for k in ('step', 'accuracy', 'ema_accuracy', 'loss', 'num_examples')
          if k in results}


@dataclasses.dataclass
class Loop:
  """One training run from `start_step` to `total` over prepared steps, checkpointer and reporter."""
  train_step: Callable[..., Any]
  evaluate: Callable[[Any], dict[str, Any]]   # device state -> eval totals
  get_state: Callable[[Any], Any]             # device state -> host copy
  get_metrics: Callable[[Any], Any]
  ckpt: Any                                   # checkpointing.Checkpointer
  rep: Any                                    # reporting.Reporter
  meta: dict[str, Any]
  total: int
  log_every: int
  eval_every: int
  ckpt_every: int
  global_batch: int
  lead: bool = True
  # Several processes: signum -> the batch leaf 'stop' (`Parallel.put_stop_flag`).
  # Each step carries every process's flag and reduces it over all devices; the
  # loop stops when a finished step's reduced flag is set. Steps finish at the
  # same loop positions on every process (they depend on the step number only),
  # so all stop at the same step, one or two steps after the signal. No extra
  # collective or host round trip: one int per device rides with the batch.
  stop_flag: Callable[[int], Any] | None = None
  rank_key: str = 'accuracy'  # 'ema_accuracy' with config.ema.rank_by = 'ema'.

  def run(self, state: Any, batches: Iterator[Any], start_step: int,
          preempt: Preemption) -> dict[str, Any]:
    if preempt.signum is not None and self.stop_flag is None:
      # Interrupted while the workdir was being prepared. (Several processes first
      # agree through a step, as the others may not have been signalled.)
      raise Preempted(start_step, preempt.signum, saved=False)
    if start_step >= self.total:
      res = self.evaluate(state)
      return self.rep.eval_results(start_step, res, final=True)
    metrics = StepMetrics(self.get_metrics, start_step)
    progress = console.Progress(self.total, self.global_batch)
    started = time.monotonic()
    results: dict[str, Any] = {}
    step = start_step
    while step < self.total:
      batch = next(batches)
      if self.stop_flag is not None:
        batch = {**batch, 'stop': self.stop_flag(preempt.signum or 0)}
      state, step_metrics = self.train_step(state, batch)
      step += 1
      metrics.add(step, step_metrics)
      if step == start_step + 1:  # The compiled step: time the rest from here.
        metrics.finish_all()
        progress.first_step_done(step)
        if self.lead:  # Mostly compilation: what the persistent compilation cache saves.
          console.say(f'first step {step} done {time.monotonic() - started:.1f} s after the '
                      'loop started (compiling it included)')
      if step % self.log_every == 0 or step == self.total:
        self._log(step, metrics.take(), progress)
      if step % self.eval_every == 0 or step == self.total:
        metrics.finish_all()
        results = self.evaluate_and_save(step, state, final=step == self.total)
        progress.skip(step)
      elif step % self.ckpt_every == 0:
        metrics.finish_all()
        self.ckpt.save(step, self.get_state(state), self.meta)
        progress.skip(step)
      signum = preempt.signum if self.stop_flag is None else metrics.stop_signum
      if signum is not None:
        metrics.finish_all()
        self.ckpt.save(step, self.get_state(state), self.meta)
        raise Preempted(step, signum)
    return results

  def _log(self, step: int, host: list[dict[str, Any]], progress: console.Progress) -> None:
    means = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
    means['learning_rate'] = float(host[-1]['learning_rate'])  # A value, not a mean.
    images_per_sec = progress.images_per_sec(step)
    if self.lead:
      console.say(progress.line(step, means, images_per_sec))
    if images_per_sec is not None:
      means['images_per_sec'] = images_per_sec
    self.rep.train_metrics(step, means)

  def evaluate_and_save(self, step: int, state: Any, final: bool) -> dict[str, Any]:
    """Evaluates the model of `step`, then checkpoints it with the eval metrics.

    Why evaluate first: Orbax takes a step's metrics with its save (they rank
    the best checkpoint) and has no public way to attach them afterwards, so
    the save follows the evaluation. Why no training is lost anyway: the state
    is copied to the host before the evaluation, and the save sits in a
    `finally`, so an evaluation that raises (device out of memory, a bad eval
    batch, a report that cannot be drawn, Ctrl-C) still writes this step's
    checkpoint, without metrics, before the error propagates; the rerun
    resumes from this step. Only a process killed outright during the
    evaluation loses the steps since the previous checkpoint, as it would at
    any other moment.

    A model with non-finite parameters or a non-finite evaluation loss is
    neither reported nor saved: resuming from it could only fail again.
    """
    host = self.get_state(state)
    if not _all_finite((host['params'], host['batch_stats'])):
      raise FloatingPointError(f'parameters became non-finite at step {step}; stopped, no '
                               'report or checkpoint of it was written (lower '
                               'config.optimizer.learning_rate?)')
    meta, metrics, save = self.meta, None, True
    try:
      res = self.evaluate(state)
      if not np.isfinite(res['loss']):
        save = False
        raise FloatingPointError(
            f'eval loss is {res["loss"]} at step {step}: the model\'s outputs are not finite '
            f'(learning rate too high?); stopped, no report or checkpoint of it was written')
      results = self.rep.eval_results(step, res, final=final)
      meta = {**self.meta, 'eval': results_brief(results)}
      metrics = {k: results[k] for k in ('accuracy', 'ema_accuracy') if k in results}
      metrics['rank'] = results[self.rank_key]  # What ranks the best checkpoint.
    finally:
      if save:
        self.ckpt.save(step, host, meta, metrics=metrics)
    return results
