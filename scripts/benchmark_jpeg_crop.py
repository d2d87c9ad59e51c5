"""Random-resized crops from JPEG files: whole decode against crop-window decode, side by side.

  python scripts/benchmark_jpeg_crop.py --data_dir=/data/photos/train [--image_size=224]

The same tf.data pipeline (read the file, crop, resize, flip, uint8, batch of
128) over the JPEGs under --data_dir, once decoding each whole file and then
cropping (what the pipeline did before) and once decoding only the crop window
(`make_preprocess(...).from_file`, what it does now), in alternating rounds in
one process; prints one JSON line with the best round of each and the ratio.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string('data_dir', None, 'A folder of JPEG files (searched recursively).')
flags.DEFINE_integer('image_size', 224, 'Crop size.')
flags.DEFINE_integer('images', 1024, 'Images per round.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  paths = sorted(glob.glob(os.path.join(FLAGS.data_dir or '', '**', '*.jp*g'), recursive=True))
  if not paths:
    print(f'error: --data_dir: no .jpg files under {FLAGS.data_dir!r}', file=sys.stderr)
    sys.exit(2)
  from configs import default
  from resnet_jax import preprocess
  tf = preprocess._tf()  # pylint: disable=protected-access
  config = default.get_config()
  config.dataset.image_size, config.dataset.augment = FLAGS.image_size, 'random_resized_crop'
  fn = preprocess.make_preprocess(config.dataset, train=True, as_uint8=True)
  paths = (paths * (FLAGS.images // len(paths) + 1))[:FLAGS.images]
  variants = {
      'whole_decode': lambda data, seed: fn(
          tf.io.decode_image(data, channels=3, expand_animations=False), seed),
      'crop_window_decode': fn.from_file}

  def rate(example):
    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
        lambda i, p: example(tf.io.read_file(p), tf.stack([tf.constant(0, tf.int64), i])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(128).prefetch(2)
    start = time.perf_counter()
    n = sum(len(b) for b in ds.as_numpy_iterator())
    return n / (time.perf_counter() - start)

  best = {k: 0.0 for k in variants}
  for _ in range(FLAGS.rounds):
    for name, example in variants.items():
      best[name] = max(best[name], rate(example))
  from resnet_jax.grain_loader import cpu_cores
  cores = cpu_cores()
  print(json.dumps({**{f'{k}_images_per_sec': round(v) for k, v in best.items()},
                    'crop_window_decode_per_core': round(best['crop_window_decode'] / cores),
                    'cores': cores,
                    'ratio': round(best['crop_window_decode'] / best['whole_decode'], 3)}))


if __name__ == '__main__':
  app.run(main)
