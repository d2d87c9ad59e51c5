"""Image folders, <root>/<split>/<class>/<image>: scanning, verifying and decoding.

Files are decoded with the decoder training uses (`preprocess.decode`,
tf.io.decode_image), for verification at start, for the device-resident
split (`to_uint8_images`) and for the in-memory copy of small equal-sized
splits (`decoded_once`). TensorFlow is imported lazily.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.preprocess import _tf, fit_to_size
from resnet_jax.preprocess import decode as _decode
from resnet_jax.sources import (_IN_MEMORY_MAX_BYTES, Source, _check_classes, _class_subset,
                                apply_slice, parse_split)

# What tf.io.decode_image reads (checked in the tests). GIF decodes too, but as its first
# frame only, so GIF files are skipped and counted instead.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def to_uint8_images(source: Source, size: int) -> np.ndarray:
  """The whole split as uint8 [N, size, size, 3] (for datasets kept on the device).

  Files go through the training decoder (`_decode`) and the host pipeline's
  resize, so a device-resident split holds the pixels the host pipeline would
  have fed (PIL decodes JPEGs and 16-bit PNGs differently).
  """
  tf = _tf()

  def fit(image):
    return tf.cast(tf.clip_by_value(tf.round(fit_to_size(tf, image, size)), 0, 255), tf.uint8)

  if source.paths is not None:
    ds = tf.data.Dataset.from_tensor_slices(source.paths.astype(str))
    ds = ds.map(lambda p: fit(_decode(tf, tf.io.read_file(p))),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    ds = tf.data.Dataset.from_tensor_slices(source.images).map(
        fit, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  parts = list(ds.batch(1024).as_numpy_iterator())
  return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)


def decoded_once(source: Source, limit: int = _IN_MEMORY_MAX_BYTES) -> Source:
  """The split with its files decoded into memory, if they share one shape and fit.

  Small folders of equal-sized images (CIFAR-like) are decoded once, with the
  training decoder, instead of once per epoch per image: the pipeline then
  gathers uint8 pixels from memory, the same pixels. A folder of mixed sizes is
  found out at its first batch of 1,024 files and keeps reading files, as does
  one whose pixels would exceed `limit` bytes.
  """
  tf = _tf()
  ds = tf.data.Dataset.from_tensor_slices(source.paths.astype(str)).map(
      lambda p: _decode(tf, tf.io.read_file(p)), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  parts = []
  try:
    for batch in ds.batch(1024).as_numpy_iterator():
      if not parts and batch[0].nbytes * len(source) > limit:
        return source
      parts.append(batch)
  except tf.errors.InvalidArgumentError:  # Files of different sizes cannot batch.
    return source
  return Source(labels=source.labels, images=np.concatenate(parts))


def _tf_message(error: Exception) -> str:
  """TensorFlow's error text without its '{{function_node ...}}' and '[Op:...]' wrapping."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S).strip()
  return f'{type(error).__name__}: {text.splitlines()[0] if text else ""}'


def undecodable_images(paths: list[str]) -> dict[int, str]:
  """{index: error} for the files the training decoder (`_decode`) cannot read.

  Verification must use the decoder training uses: PIL accepts files (TIFF
  named .jpg, for example) that `tf.io.decode_image` refuses mid-run. Decoding
  runs as one parallel tf.data pass that drops failures; only the few failures
  are decoded again, eagerly, for their messages. 50k CIFAR JPEGs take about
  3 s on 2 cores (PIL in 8 threads took about 9 s).
  """
  if not paths:
    return {}
  tf = _tf()
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64),
                                           np.asarray(paths, dtype=str)))
  ds = ds.map(lambda i, p: (i, tf.shape(_decode(tf, tf.io.read_file(p)))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ok = np.zeros(len(paths), bool)
  for index, _ in ds.ignore_errors().batch(4096).as_numpy_iterator():
    ok[index] = True
  bad = {}
  for i in np.flatnonzero(~ok):
    try:
      _decode(tf, tf.io.read_file(paths[i]))
    except Exception as e:  # pylint: disable=broad-except
      bad[int(i)] = _tf_message(e)
  return bad


def _scan_split(split_dir: str, class_names: list[str]
                ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """Image files per class folder, and the files skipped, keyed by why.

  Only `<split>/<class>/<image>` with a readable extension is used. Files
  directly in the split folder or nested deeper count as 'depth'; other
  extensions as '.ext'. Hidden files (.DS_Store) are ignored silently.
  """
  skipped: dict[str, list[str]] = {}
  for f in sorted(os.listdir(split_dir)):
    if not f.startswith('.') and os.path.isfile(os.path.join(split_dir, f)):
      skipped.setdefault('depth', []).append(os.path.join(split_dir, f))
  files: dict[str, list[str]] = {}
  for cls in class_names:
    cdir = os.path.join(split_dir, cls)
    files[cls] = []
    if not os.path.isdir(cdir):
      continue
    for f in sorted(os.listdir(cdir)):
      full = os.path.join(cdir, f)
      if f.startswith('.'):
        continue
      if os.path.isdir(full):
        for root, dirs, names in os.walk(full):
          dirs[:] = [d for d in dirs if not d.startswith('.')]
          skipped.setdefault('depth', []).extend(
              os.path.join(root, n) for n in names if not n.startswith('.'))
      elif f.lower().endswith(IMAGE_EXTENSIONS):
        files[cls].append(f)
      else:
        skipped.setdefault(os.path.splitext(f)[1].lower() or '(none)', []).append(full)
  return files, skipped


def _warn_skipped(where: str, skipped: dict[str, list[str]]) -> None:
  """One warning that counts every file the image folder ignored, and why."""
  if not skipped:
    return
  depth = skipped.get('depth', [])
  exts = {k: v for k, v in skipped.items() if k != 'depth'}
  parts = []
  if exts:
    counts = ', '.join(f'{len(v)} {k}' for k, v in sorted(exts.items()))
    parts.append(f'{sum(map(len, exts.values()))} for their extension ({counts}; read are '
                 f'{", ".join(IMAGE_EXTENSIONS)})')
  if depth:
    parts.append(f'{len(depth)} for their depth (images belong in <split>/<class>/, '
                 f'e.g. not {depth[0]})')
  total = sum(map(len, skipped.values()))
  logging.warning('config.dataset.data_dir: ignored %d files in %s: %s', total, where,
                  '; '.join(parts))


def _folder_split(field: str, root: str, split: str, class_names: list[str] | None,
                  config_ds: Any) -> tuple[Source, list[str], dict[str, list[str]]]:
  """A split of an image folder, its class names and the files it skipped."""
  name, start, end = parse_split(field, split)
  split_dir = os.path.join(root, name)
  if not os.path.isdir(split_dir):
    raise UserError(f'{field}: split folder {split_dir} does not exist '
                    f'(image folders are laid out as <data_dir>/<split>/<class>/<image>)')
  found = sorted(d for d in os.listdir(split_dir)
                 if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith('.'))
  if not found:
    raise UserError(f'{field}: no class folders in {split_dir}')
  if class_names is None:
    wanted = _class_subset(config_ds)
    unknown = [c for c in wanted if c not in found]
    if unknown:
      raise UserError(f'config.dataset.classes: {", ".join(unknown)} not found in {split_dir}')
    class_names = sorted(wanted) if wanted else found
    _check_classes('config.dataset.classes' if wanted else 'config.dataset.data_dir',
                   class_names, 'the class subset' if wanted else f'split folder {split_dir}')
  else:
    extra = [c for c in found if c not in class_names and not _class_subset(config_ds)]
    if extra:
      raise UserError(f'{field}: classes {", ".join(extra)} in {split_dir} are not in the '
                      'training split')
  by_class, skipped = _scan_split(split_dir, class_names)
  paths, labels = [], []
  for label, cls in enumerate(class_names):
    files = apply_slice(by_class[cls], start, end)
    paths += [os.path.join(split_dir, cls, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise UserError(f'{field}: split {split!r} of {root} holds no images '
                    f'({", ".join(IMAGE_EXTENSIONS)})')
  if config_ds.get('verify_images', True):
    bad = undecodable_images(paths)
    if bad:
      first = min(bad)
      if config_ds.get('on_bad_image', 'skip') == 'error':
        raise UserError(f'unreadable image {paths[first]} ({bad[first]}); set '
                        'config.dataset.on_bad_image=skip to skip such files')
      for i in sorted(bad):
        logging.warning('Skipping unreadable image %s (%s)', paths[i], bad[i])
      keep = [i for i in range(len(paths)) if i not in bad]
      paths = [paths[i] for i in keep]
      labels = [labels[i] for i in keep]
      if not paths:
        raise UserError(f'{field}: no image of split {split!r} of {root} can be decoded')
  return (Source(labels=np.asarray(labels, np.int32), paths=np.asarray(paths, dtype=object)),
          class_names, skipped)


def _warn_overlap(config_ds: Any, train: Source, eval_: Source) -> None:
  """Slices of one folder split that share images make the eval score optimistic."""
  shared = set(train.paths) & set(eval_.paths)
  if shared:
    logging.warning('config.dataset.eval_split: %d of the %d eval images are also training '
                    'images (train_split=%r, eval_split=%r overlap); eval accuracy will be '
                    'optimistic', len(shared), len(eval_), config_ds.train_split,
                    config_ds.eval_split)
