"""tf.data against Grain on the same input work, in alternating rounds; one JSON line.

  python scripts/benchmark_grain.py --config=configs/default.py \\
    --config.dataset.name=image_folder --config.dataset.data_dir=/tmp/data \\
    --config.dataset.train_split=train --config.dataset.eval_split='train[:1%]' \\
    --config.batch_size=128 --steps=100 --rounds=3 [--workers=N] [--grain_threads=1]

(add --config.dataset.image_size=224 for 224px random-resized crops).

Sides, each timed for --steps batches per round after --warmup untimed batches,
alternating for --rounds rounds in one process; the best round of each side
counts. Each round builds a side's pipeline afresh and closes it after (Grain's
workers end, tf.data's threads stop), so no side prefetches in the background
while the other is timed (with both kept open, buffers filled during the other
side's round inflated short rounds up to 100-fold):

- tfdata: the project's pipeline as training reads it (`create_data(config)`,
  `Data.train_iter(batch_size, as_uint8=...)`, as `benchmark.py --mode=input`).
- grain: pad_crop: a `grain.MapDataset` over the same files and labels
  (shuffle, repeat, per-example `random_map`, batch, then `mp_prefetch` into
  --workers spawned processes, default: the cores available): decode the JPEG
  (PIL), pad by `crop_padding`, random crop, random flip. random_resized_crop:
  the project's own Grain loader (`grain_loader.train_batches`, what
  `dataset.loader=grain` trains with: PIL crop-box decode, antialiased resize,
  flip), with --workers workers (--grain_threads applies to pad_crop only).
- grain_in_memory (pad_crop only): the same, from the split decoded once into
  memory (`decoded_once`, what `dataset.decode_once` gives tf.data).

Both produce {'image': uint8 [B, S, S, 3], 'label': int32 [B]}. The JSON line
has images/s and images/s per core per side and grain_over_tfdata (the faster
Grain variant over tf.data).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer('steps', 100, 'Timed batches per round and side.')
flags.DEFINE_integer('warmup', 8, 'Untimed batches before each round of each side.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
flags.DEFINE_integer('workers', 0, 'Grain worker processes (0: the cores available).')
flags.DEFINE_integer('grain_threads', 1, 'Grain reading threads in each worker.')
FLAGS = flags.FLAGS


class Examples:
  """Random-access source: {'x': path or uint8 image, 'label': int32} by index."""

  def __init__(self, items, labels):
    self.items, self.labels = items, np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {'x': self.items[i], 'label': self.labels[i]}


def _rgb(image, size):
  from PIL import Image
  image = image.convert('RGB')
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image)


def pad_crop(ex, rng, size, pad, flip):
  """Decode (a path) or take (an array), pad, random size x size crop, random flip."""
  from PIL import Image
  x = ex['x']
  if isinstance(x, np.ndarray):
    image = x if x.shape[:2] == (size, size) else _rgb(Image.fromarray(x), size)
  else:
    with Image.open(x) as im:
      image = _rgb(im, size)
  image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  y, x0 = rng.integers(0, 2 * pad + 1, size=2)
  image = image[y:y + size, x0:x0 + size]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {'image': np.ascontiguousarray(image), 'label': ex['label']}


def grain_batches(source: Examples, cds, batch: int, seed: int, workers: int, threads: int):
  """pad_crop batches through Grain (random_resized_crop uses the project's own Grain loader)."""
  import grain
  fn = functools.partial(pad_crop, size=int(cds.image_size), pad=int(cds.get('crop_padding', 4)),
                         flip=bool(cds.get('flip', True)))
  ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        .random_map(fn, seed=seed).batch(batch, drop_remainder=True))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2))
  it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                   per_worker_buffer_size=2))
  return iter(it)


def _time(batches, steps: int, warmup: int) -> tuple[float, dict]:
  for _ in range(warmup):
    b = next(batches)
  images, t0 = 0, time.perf_counter()
  for _ in range(steps):
    b = next(batches)
    images += int(b['image'].shape[0])
  return images / (time.perf_counter() - t0), b


def compare(config, steps: int, rounds: int, warmup: int = 8, workers: int = 0,
            grain_threads: int = 1) -> dict:
  """Both pipelines on the same split, in alternating rounds; best round of each.

  Grain reads its own absl flags (grain_*), so call this once flags are parsed
  (as `main` is, under app.run).
  """
  from resnet_jax import grain_loader, input_pipeline, preprocess
  from resnet_jax.errors import UserError
  cds = config.dataset
  kind = input_pipeline.augment_kind(cds)
  if cds.name != 'image_folder' or kind not in ('pad_crop', 'random_resized_crop'):
    raise UserError('benchmark_grain: an image_folder with pad_crop or random_resized_crop')
  if cds.get('randaugment', '') or float(cds.get('random_erasing', 0.0)):
    raise UserError('benchmark_grain: the Grain side has no RandAugment or random erasing')
  cores = grain_loader.cpu_cores()
  workers = workers or cores
  b, seed = int(config.batch_size), int(config.seed)
  data = input_pipeline.create_data(config)
  src = data.train_source
  paths = Examples(list(src.paths.astype(str)), src.labels)
  sides = {'tfdata': lambda: data.train_iter(b, as_uint8=preprocess.sends_uint8(cds)),
           'grain': lambda: grain_batches(paths, cds, b, seed, workers, grain_threads)}
  if kind == 'random_resized_crop':  # What `dataset.loader=grain` trains with.
    sides['grain'] = lambda: grain_loader.train_batches(src, config, b, as_uint8=True,
                                                        workers=workers)
  if kind == 'pad_crop':
    mem = input_pipeline.decoded_once(src)
    if mem.images is not None:
      pixels = Examples(mem.images, mem.labels)
      sides['grain_in_memory'] = lambda: grain_batches(pixels, cds, b, seed, workers,
                                                       grain_threads)
  rates = {k: [] for k in sides}
  last = {}
  for _ in range(rounds):
    for name, make in sides.items():
      # A fresh pipeline per round, closed after it: nothing fills its buffers in the
      # background while the other side is timed (the warm-up batches absorb the start).
      it = make()
      rate, last[name] = _time(it, steps, warmup)
      rates[name].append(rate)
      getattr(it, 'close', lambda: None)()
      del it
      gc.collect()
  out = {'augment': kind, 'image_size': int(cds.image_size), 'batch_size': b,
         'steps': steps, 'warmup': warmup, 'rounds': rounds, 'cores': cores,
         'workers': workers, 'grain_threads': grain_threads,
         'tfdata_decode_once': bool(cds.get('decode_once', True))}
  for name, r in rates.items():
    out[name] = {'images_per_sec': max(r), 'images_per_sec_per_core': max(r) / cores,
                 'round_images_per_sec': r,
                 'image_shape': list(last[name]['image'].shape),
                 'image_dtype': str(last[name]['image'].dtype),
                 'label_dtype': str(last[name]['label'].dtype),
                 'label_min': int(last[name]['label'].min()),
                 'label_max': int(last[name]['label'].max())}
  best = max((k for k in sides if k != 'tfdata'), key=lambda k: out[k]['images_per_sec'])
  out['num_classes'] = data.info.num_classes
  out['grain_best'] = best
  out['grain_over_tfdata'] = out[best]['images_per_sec'] / out['tfdata']['images_per_sec']
  return out


def main(argv):
  del argv
  from resnet_jax.errors import UserError
  try:
    result = compare(FLAGS.config, FLAGS.steps, FLAGS.rounds, FLAGS.warmup, FLAGS.workers,
                     FLAGS.grain_threads)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
