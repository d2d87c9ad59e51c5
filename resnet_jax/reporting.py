"""What a person reads afterwards: TensorBoard scalars, eval_results.json and pictures.

Writes into the workdir:
  * TensorBoard events (clu's SummaryWriter; the console lines are
    `console.py`'s, so scalars are not logged a second time);
  * `eval_results.json` after every evaluation (atomically replaced);
  * `history.jsonl`, one line per logged train step or evaluation, which the
    curves are drawn from and which survives resumption;
  * after every evaluation: `confusion_matrix.png` and `training_curves.png`
    (so a long run can be looked at while it trains); at the end also a
    classification-report table on the console.

Both JSON files are strict JSON: a non-finite number (a diverged loss) is
written as null, which `read_history` turns back into NaN.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np


def _finite_or_none(value: Any) -> Any:
  """The value with every non-finite float in it replaced by None (JSON null)."""
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return None
  return value


def strict_json(value: Any, **kwargs: Any) -> str:
  """json.dumps that never writes the NaN/Infinity tokens strict parsers reject."""
  return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def per_class_report(confusion: np.ndarray, class_names: list[str]) -> dict[str, Any]:
  """Precision, recall, F1 and support per class (rows: true, columns: predicted)."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  support = confusion.sum(1)
  predicted = confusion.sum(0)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  per_class = {name: {'precision': float(precision[i]), 'recall': float(recall[i]),
                      'f1': float(f1[i]), 'support': int(support[i])}
               for i, name in enumerate(class_names)}
  weights = support / max(support.sum(), 1)
  averages = {
      'macro': {'precision': float(precision.mean()), 'recall': float(recall.mean()),
                'f1': float(f1.mean()), 'support': int(support.sum())},
      'weighted': {'precision': float((precision * weights).sum()),
                   'recall': float((recall * weights).sum()),
                   'f1': float((f1 * weights).sum()), 'support': int(support.sum())},
  }
  return {'per_class': per_class, 'averages': averages}


def format_report(report: dict[str, Any]) -> str:
  """A classification-report table, like scikit-learn's."""
  names = list(report['per_class']) + ['macro avg', 'weighted avg']
  width = max(12, max(len(n) for n in names))
  lines = [f'{"":>{width}}  precision  recall  f1-score  support']
  rows = list(report['per_class'].items()) + [('macro avg', report['averages']['macro']),
                                              ('weighted avg', report['averages']['weighted'])]
  for i, (name, r) in enumerate(rows):
    if i == len(report['per_class']):
      lines.append('')
    lines.append(f'{name:>{width}}  {r["precision"]:9.4f}  {r["recall"]:6.4f}  '
                 f'{r["f1"]:8.4f}  {r["support"]:7d}')
  return '\n'.join(lines)


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save_confusion_png(path: str, confusion: np.ndarray, class_names: list[str]) -> None:
  plt = _plt()
  n = len(class_names)
  size = min(4 + 0.45 * n, 40)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(confusion, cmap='Blues')
  labels = n <= 50
  if labels:
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    if n <= 20:
      peak = confusion.max() or 1
      for i in range(n):
        for j in range(n):
          ax.text(j, i, int(confusion[i, j]), ha='center', va='center', fontsize=8,
                  color='white' if confusion[i, j] > peak / 2 else 'black')
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'Confusion matrix ({int(confusion.sum())} examples)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_curves_png(path: str, history: list[dict[str, Any]]) -> None:
  plt = _plt()
  train = [h for h in history if h['kind'] == 'train']
  evals = [h for h in history if h['kind'] == 'eval']
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  if train:
    steps = [h['step'] for h in train]
    axes[0].plot(steps, [h['loss'] for h in train], label='train')
    axes[1].plot(steps, [h['accuracy'] for h in train], label='train')
    axes[2].plot(steps, [h['learning_rate'] for h in train])
  if evals:
    steps = [h['step'] for h in evals]
    axes[0].plot(steps, [h['loss'] for h in evals], 'o-', label='eval')
    axes[1].plot(steps, [h['accuracy'] for h in evals], 'o-', label='eval')
  for ax, title in zip(axes, ('loss', 'accuracy', 'learning rate')):
    ax.set_title(title)
    ax.set_xlabel('step')
  axes[0].legend()
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class Reporter:
  """The TensorBoard writer, plus the workdir's JSON and PNG reports."""

  def __init__(self, workdir: str, class_names: list[str], total_steps: int):
    from clu import metric_writers
    self.workdir = workdir
    self.class_names = class_names
    self.total_steps = total_steps
    self.lead = jax.process_index() == 0
    self.writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])
                   if self.lead else metric_writers.MultiWriter([]))
    self.history_path = os.path.join(workdir, 'history.jsonl')

  def _history(self, record: dict[str, Any]) -> None:
    if self.lead:
      with open(self.history_path, 'a') as f:
        f.write(strict_json(record) + '\n')

  def train_metrics(self, step: int, means: dict[str, float]) -> None:
    self.writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
    self._history({'kind': 'train', 'step': step, **means})

  def eval_results(self, step: int, res: dict[str, Any], final: bool,
                   checkpoint: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Writes eval_results.json and the pictures (and at the end, the table).

    `top5_accuracy` is always there: the fraction whose label is among the five
    highest scores, so 1.0 by definition with five classes or fewer.
    """
    confusion = res['confusion']
    report = per_class_report(confusion, self.class_names)
    results = {'step': int(step), 'accuracy': res['accuracy'],
               'top5_accuracy': res['top5_accuracy'], 'loss': res['loss'],
               'num_examples': res['num_examples']}
    if 'robust_accuracy' in res:  # adversarial.eval_steps > 0: PGD-k accuracy, same examples.
      results['robust_accuracy'] = res['robust_accuracy']
    averaged = {k: res[k] for k in ('ema_accuracy', 'ema_top5_accuracy', 'ema_loss') if k in res}
    results.update(averaged)  # config.ema: the averaged weights on the same examples.
    if checkpoint:
      results['checkpoint'] = checkpoint
    if weights:
      results['weights'] = weights  # --mode=eval --weights: raw or ema.
    results.update(report)
    results['class_names'] = self.class_names
    results['confusion_matrix'] = confusion.tolist()
    self.writer.write_scalars(step, {f'eval/{k}': results[k] for k in
                                     ('accuracy', 'loss', 'top5_accuracy', 'robust_accuracy',
                                      'ema_accuracy', 'ema_loss', 'ema_top5_accuracy')
                                     if k in results})
    robust = {'robust_accuracy': res['robust_accuracy']} if 'robust_accuracy' in res else {}
    ema_part = {k: averaged[k] for k in ('ema_accuracy', 'ema_loss') if k in averaged}
    self._history({'kind': 'eval', 'step': int(step), 'accuracy': res['accuracy'],
                   'loss': res['loss'], **robust, **ema_part})
    logging.info('Eval at step %d: accuracy %.4f, loss %.4f over %d examples%s%s', step,
                 res['accuracy'], res['loss'], res['num_examples'],
                 f', robust accuracy {res["robust_accuracy"]:.4f}' if robust else '',
                 f', EMA accuracy {averaged["ema_accuracy"]:.4f}' if averaged else '')
    if self.lead:
      path = os.path.join(self.workdir, 'eval_results.json')
      with open(path + '.tmp', 'w') as f:
        f.write(strict_json(results, indent=2))
      os.replace(path + '.tmp', path)
      if final:
        print(format_report(report), flush=True)
        if robust:
          print(f'accuracy {res["accuracy"]:.4f} clean, {res["robust_accuracy"]:.4f} robust '
                '(adversarial.eval_steps PGD steps)', flush=True)
        if averaged:
          print(f'accuracy {res["accuracy"]:.4f} raw weights, {averaged["ema_accuracy"]:.4f} '
                'EMA weights', flush=True)
      self._save_pngs(confusion)
    return results

  def _save_pngs(self, confusion: np.ndarray) -> None:
    """Replaces both pictures (atomically, so a viewer never sees half a file)."""
    path = os.path.join(self.workdir, 'confusion_matrix.png')
    save_confusion_png(path + '.tmp.png', confusion, self.class_names)
    os.replace(path + '.tmp.png', path)
    history = self.read_history()
    if history:
      path = os.path.join(self.workdir, 'training_curves.png')
      save_curves_png(path + '.tmp.png', history)
      os.replace(path + '.tmp.png', path)

  def read_history(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.history_path):
      return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(self.history_path) as f:
      for line in f:
        if line.strip():
          # null is a non-finite value (see strict_json); older files may hold bare NaN.
          record = {k: float('nan') if v is None else v for k, v in json.loads(line).items()}
          # A resumed run logs some steps again; the newest record of a step wins.
          latest[(record['kind'], record['step'])] = record
    return sorted(latest.values(), key=lambda r: (r['step'], r['kind']))

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
