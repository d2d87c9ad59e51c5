"""Input pipelines: TFDS datasets by name and image folders, on tf.data.

Data is a function of (seed, step): example order comes from a per-epoch
permutation keyed by (seed, epoch), and augmentation uses stateless random ops
keyed by (seed, global example counter). A run resumed at step s therefore sees
exactly the batches an uninterrupted run would have seen.

Evaluation is deterministic and counts every example once: the last batch is
padded and carries a mask.

The per-example transforms (crop, flip, RandAugment, normalisation, erasing)
are `preprocess.make_preprocess`; image folders are read by `image_folder.py`;
splits and sources are `sources.py`. This module holds the TFDS side, the
example order and `Data`, the iterators training and evaluation use. Only the
data modules and `reporting.py` import TensorFlow (lazily).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from resnet_jax import grain_loader
from resnet_jax.errors import UserError
# Folder reading, sources and per-example preprocessing live in their own modules; their
# names stay importable from here.
from resnet_jax.image_folder import (IMAGE_EXTENSIONS, _decode, _folder_split,  # noqa: F401
                                     _tf_message, _warn_overlap, _warn_skipped, decoded_once,
                                     to_uint8_images, undecodable_images)
from resnet_jax.preprocess import (AUGMENTATIONS, _tf, augment_kind,  # noqa: F401
                                   fit_to_size, make_preprocess)
from resnet_jax.sources import (_IN_MEMORY_MAX_BYTES, DatasetInfo, Source,  # noqa: F401
                                StreamSource, _check_classes, _class_subset, apply_slice,
                                parse_split)

DOWNLOAD_RETRIES = 3


def _bound_download_retries() -> None:
  """Caps TFDS's HTTP retries, so an offline machine fails in seconds, not minutes.

  TFDS retries each download 10 times with exponential backoff (0.2 s doubling),
  about 3.5 minutes before it reports a missing network. Three retries still ride
  out a flaky connection. TFDS has no option for this, hence the module constant.
  """
  from tensorflow_datasets.core.download import downloader
  downloader.MAX_RETRIES = min(downloader.MAX_RETRIES, DOWNLOAD_RETRIES)


def _tfds_builder(config_ds: Any):
  import tensorflow_datasets as tfds
  _tf()
  data_dir = config_ds.get('data_dir', '') or None
  if data_dir and not os.path.isdir(data_dir):
    raise UserError(f'config.dataset.data_dir: {data_dir} does not exist')
  try:
    builder = tfds.builder(config_ds.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'config.dataset.name: unknown dataset {config_ds.name!r} (not a TFDS '
                    "dataset; use name='image_folder' for your own images)") from None
  prepared = builder.is_prepared()
  if not prepared and not config_ds.get('download', True):
    raise UserError(f'config.dataset.download: False, and TFDS dataset {config_ds.name!r} is not '
                    f'prepared in {builder.data_dir} (run `tfds build {config_ds.name} '
                    '--data_dir=DIR` where there is network, copy DIR here and set '
                    'config.dataset.data_dir=DIR)')
  if not prepared:
    _bound_download_retries()
    try:
      manual = config_ds.get('manual_dir', '') or None
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f'could not prepare TFDS dataset {config_ds.name!r} in '
                      f'{builder.data_dir}: {first[:300]} (offline? prepare it elsewhere '
                      'and point config.dataset.data_dir at it)') from None
  if 'label' not in builder.info.features or 'image' not in builder.info.features:
    raise UserError(f'config.dataset.name: {config_ds.name!r} is not an image '
                    "classification dataset (needs 'image' and 'label' features)")
  return builder


def _tfds_check_split(builder: Any, field: str, split: str) -> None:
  name, _, _ = parse_split(field, split)
  known = list(builder.info.splits)
  if known and name not in known:  # No metadata (e.g. under tfds.testing.mock_data): let TFDS decide.
    raise UserError(f'{field}: split {name!r} does not exist in {builder.info.name} '
                    f'(it has {", ".join(builder.info.splits)})')


def _split_size(builder: Any, split: str) -> int:
  try:
    return int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except
    # No metadata (mock data): count the records once.
    return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))


def _tfds_in_memory(builder: Any, split: str, class_names: list[str],
                    wanted: list[str]) -> Source:
  import tensorflow_datasets as tfds
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']}).batch(4096)
    parts = list(tfds.as_numpy(ds))
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f'config.dataset: cannot read split {split!r} of {builder.info.name}: '
                    f'{first[:300]}') from None
  if not parts:
    raise UserError(f'config.dataset: split {split!r} of {builder.info.name} is empty')
  images = np.concatenate([p['image'] for p in parts])
  labels = np.concatenate([p['label'] for p in parts]).astype(np.int32)
  if wanted:
    old = [class_names.index(c) for c in sorted(wanted)]
    keep = np.isin(labels, old)
    remap = {o: i for i, o in enumerate(old)}
    images, labels = images[keep], np.asarray([remap[l] for l in labels[keep]], np.int32)
  return Source(labels=labels, images=images)


# --------------------------------------------------------------------------- datasets


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def check_steps_per_epoch(n: int, global_batch: int) -> int:
  """Whole global batches per epoch; none at all is a bad batch size."""
  if n // global_batch == 0:
    raise UserError(f'config.batch_size: {global_batch} is larger than the training split '
                    f'({n} examples)')
  return n // global_batch


def _train_indices(seed: int, n: int, local_batch: int, start_step: int,
                   process_index: int, process_count: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (example indices, global example counters) for each step from `start_step` on.

  Each epoch is one permutation keyed by (seed, epoch); a global batch is
  `local_batch * process_count` consecutive entries, split between processes.
  The incomplete global batch at the end of an epoch is dropped.
  """
  global_batch = local_batch * process_count
  steps_per_epoch = check_steps_per_epoch(n, global_batch)
  step = start_step
  while True:
    epoch, offset = divmod(step, steps_per_epoch)
    perm = epoch_permutation(seed, epoch, n)
    for s in range(offset, steps_per_epoch):
      lo = s * global_batch + process_index * local_batch
      counters = (epoch * steps_per_epoch + s) * global_batch + process_index * local_batch
      yield perm[lo:lo + local_batch], counters + np.arange(local_batch)
    step = (epoch + 1) * steps_per_epoch


def _load_example(tf: Any, source: Source):
  if source.paths is not None:
    paths = tf.constant(source.paths.astype(str))

    def load(index):
      return _decode(tf, tf.io.read_file(tf.gather(paths, index)))
  else:
    images = tf.constant(source.images)

    def load(index):
      return tf.gather(images, index)
  return load


class Data:
  """Both splits of a dataset and how to iterate them."""

  def __init__(self, config: Any, train: Source | StreamSource, eval_: Source | StreamSource,
               info: DatasetInfo):
    self.config = config
    self.train_source = train
    self.eval_source = eval_
    self.info = info
    self._in_memory: dict[str, Source] = {}

  def _readable(self, which: str) -> Source | StreamSource:
    """The train or eval source to read from: decoded into memory once where that pays
    (`dataset.decode_once`, image folders of equal-sized files, `decoded_once`).
    random_resized_crop training keeps reading files, which decodes only each
    JPEG's crop window."""
    source = self.train_source if which == 'train' else self.eval_source
    cds = self.config.dataset
    if (not isinstance(source, Source) or source.paths is None or
        not cds.get('decode_once', True) or
        (which == 'train' and augment_kind(cds) == 'random_resized_crop')):
      return source
    if which not in self._in_memory:
      self._in_memory[which] = decoded_once(source)
    return self._in_memory[which]

  def train_iter(self, local_batch: int, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1, as_uint8: bool = False
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of {'image', 'label'} numpy batches from `start_step` on.

    `as_uint8`: images as uint8 pixels, to be normalised on the device
    (`preprocess.sends_uint8`, `device_data.normalise`); else normalised float32.
    `dataset.loader='grain'`: read by `grain_loader` (the same examples, PIL's pixels).
    """
    if grain_loader.loader(self.config.dataset) == 'grain':
      return grain_loader.train_batches(self._readable('train'), self.config, local_batch,
                                        start_step, process_index, process_count, as_uint8)
    if isinstance(self.train_source, StreamSource):
      return self._stream_train_iter(local_batch, start_step, process_index, process_count,
                                     as_uint8)
    tf = _tf()
    cds = self.config.dataset
    seed = int(self.config.seed)
    preprocess = make_preprocess(cds, train=True, as_uint8=as_uint8)
    source = self._readable('train')
    labels = tf.constant(source.labels)
    if source.paths is not None:  # From the file's bytes: JPEG crops decode less.
      paths = tf.constant(source.paths.astype(str))
      example = lambda i, s: preprocess.from_file(tf.io.read_file(tf.gather(paths, i)), s)
    else:
      load = _load_example(tf, source)
      example = lambda i, s: preprocess(load(i), s)
    n = len(source)
    gen = lambda: _train_indices(seed, n, local_batch, start_step, process_index, process_count)
    # Checked here too: inside the tf.data generator the error would become a TF error.
    check_steps_per_epoch(n, local_batch * process_count)
    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((local_batch,), tf.int64), tf.TensorSpec((local_batch,), tf.int64)))
    ds = ds.unbatch()

    def prepare(index, counter):
      image = example(index, tf.stack([tf.constant(seed, tf.int64), counter]))
      return {'image': image, 'label': tf.gather(labels, index)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(int(cds.get('prefetch', 4)))
    return ds.as_numpy_iterator()

  def eval_iter(self, local_batch: int, process_index: int = 0,
                process_count: int = 1, as_uint8: bool = False
                ) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example exactly once, in order, padded to full batches with a mask.

    `as_uint8` as for `train_iter`.
    """
    tf = _tf()
    source = self._readable('eval')
    n = len(source)
    num_batches = -(-int(np.ceil(n / process_count)) // local_batch)
    preprocess = make_preprocess(self.config.dataset, train=False, as_uint8=as_uint8)
    no_seed = tf.zeros([2], tf.int64)
    if isinstance(source, StreamSource):
      # Contiguous, nearly equal shards per process; the padding below evens them out.
      split = _tfds().even_splits(source.split, n=process_count,
                                  drop_remainder=False)[process_index]
      ds = self._stream(source, split, shuffle_files=False)
      ds = ds.map(lambda ex: {'image': preprocess(_decode(tf, ex['image']), no_seed),
                              'label': tf.cast(ex['label'], tf.int32)},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
      shard = np.array_split(np.arange(n), process_count)[process_index]
      load = _load_example(tf, source)
      labels = tf.constant(source.labels)
      ds = tf.data.Dataset.from_tensor_slices(shard.astype(np.int64))
      ds = ds.map(lambda i: {'image': preprocess(load(i), no_seed),
                             'label': tf.gather(labels, i)},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch).prefetch(2)
    size = int(self.config.dataset.image_size)
    count = 0
    for batch in ds.as_numpy_iterator():
      yield pad_batch(batch, local_batch)
      count += 1
    while count < num_batches:  # Equal batch counts on every process.
      yield pad_batch({'image': np.zeros((0, size, size, 3),
                                         np.uint8 if as_uint8 else np.float32),
                       'label': np.zeros((0,), np.int32)}, local_batch)
      count += 1


  def _stream(self, source: StreamSource, split: Any, shuffle_files: bool,
              file_seed: int | None = None) -> Any:
    tfds = _tfds()
    tf = _tf()
    read_config = tfds.ReadConfig(
        shuffle_seed=int(self.config.seed) if file_seed is None else file_seed,
        shuffle_reshuffle_each_iteration=False, try_autocache=False)
    ds = source.builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                   read_config=read_config,
                                   decoders={'image': tfds.decode.SkipDecoding()})
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def _stream_train_iter(self, local_batch: int, start_step: int, process_index: int,
                         process_count: int, as_uint8: bool = False
                         ) -> Iterator[dict[str, np.ndarray]]:
    """Large TFDS splits, read one epoch at a time, so a resume reads at most one epoch.

    Each process reads its own contiguous part of the split (`tfds.even_splits`,
    equal sizes, the remainder left out), so the processes' shares are disjoint
    and all take the same number of steps per epoch. Epoch e reads its part's
    files in an order seeded by (seed, e), through a shuffle buffer seeded the
    same way: the data are a function of (seed, step) for a given number of
    processes. Resuming at step s rebuilds the epoch of s and skips only the
    records of that epoch before s (reading, not decoding them); the old
    infinite stream had to skip every record since step 0.
    """
    tf = _tf()
    cds = self.config.dataset
    seed = int(self.config.seed)
    preprocess = make_preprocess(cds, train=True, as_uint8=as_uint8)
    source = self.train_source
    part = _tfds().even_splits(source.split, n=process_count,
                               drop_remainder=True)[process_index]
    steps_per_epoch = check_steps_per_epoch(source.num_examples, local_batch * process_count)
    epoch_records = steps_per_epoch * local_batch
    buffer = int(cds.get('shuffle_buffer', 16_384))

    def prepare(count, ex):
      step, j = count // local_batch, count % local_batch
      counter = (step * process_count + process_index) * local_batch + j
      image = preprocess.from_file(ex['image'], tf.stack([tf.constant(seed, tf.int64), counter]))
      return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

    def epoch_batches(epoch: int, offset: int) -> Iterator[dict[str, np.ndarray]]:
      epoch_seed = int(np.random.default_rng([seed, epoch, 0x57EA]).integers(2**31))
      ds = self._stream(source, part, shuffle_files=True, file_seed=epoch_seed)
      ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
      ds = ds.take(epoch_records).skip(offset * local_batch)
      ds = ds.enumerate(start=(epoch * steps_per_epoch + offset) * local_batch)
      ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      ds = ds.batch(local_batch, drop_remainder=True).prefetch(int(cds.get('prefetch', 4)))
      return ds.as_numpy_iterator()

    def batches() -> Iterator[dict[str, np.ndarray]]:
      epoch, offset = divmod(start_step, steps_per_epoch)
      while True:
        yield from epoch_batches(epoch, offset)
        epoch, offset = epoch + 1, 0

    return batches()


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a batch to `size` examples and adds a 0/1 `mask` of the real ones."""
  n = len(batch['label'])
  out = {}
  for k, v in batch.items():
    pad = np.zeros((size - n,) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad]) if n < size else v
  out['mask'] = (np.arange(size) < n).astype(np.float32)
  return out


def create_data(config: Any) -> Data:
  """Resolves the config's dataset; every problem with it is a UserError."""
  cds = config.dataset
  size = int(cds.get('image_size', 0))
  if size <= 0:
    raise UserError(f'config.dataset.image_size: must be positive, got {size}')
  augment_kind(cds)
  grain_loader.loader(cds)  # Before any folder is read.
  for f in ('mean', 'std'):
    if len(tuple(cds.get(f, ()))) != 3:
      raise UserError(f'config.dataset.{f}: needs 3 values (one per channel)')
  if cds.name == 'image_folder':
    root = cds.get('data_dir', '')
    if not root or not os.path.isdir(root):
      raise UserError(f'config.dataset.data_dir: image folder root {root!r} does not exist')
    train, class_names, skipped = _folder_split('config.dataset.train_split', root,
                                                cds.train_split, None, cds)
    eval_, _, eval_skipped = _folder_split('config.dataset.eval_split', root, cds.eval_split,
                                           class_names, cds)
    dirs = sorted({parse_split('', split)[0] for split in (cds.train_split, cds.eval_split)})
    if len(dirs) == 2:   # Two folders: count both. One folder: its files were scanned twice.
      skipped = {k: skipped.get(k, []) + eval_skipped.get(k, [])
                 for k in set(skipped) | set(eval_skipped)}
    _warn_skipped(', '.join(os.path.join(root, d) for d in dirs), skipped)
    _warn_overlap(cds, train, eval_)
  else:
    builder = _tfds_builder(cds)
    _tfds_check_split(builder, 'config.dataset.train_split', cds.train_split)
    _tfds_check_split(builder, 'config.dataset.eval_split', cds.eval_split)
    all_names = list(builder.info.features['label'].names)
    wanted = _class_subset(cds)
    unknown = [c for c in wanted if c not in all_names]
    if unknown:
      raise UserError(f'config.dataset.classes: {", ".join(unknown)} not in {cds.name}')
    class_names = sorted(wanted) if wanted else all_names
    _check_classes('config.dataset.classes' if wanted else 'config.dataset.name', class_names,
                   'the class subset' if wanted else f'dataset {cds.name!r}')
    shape = builder.info.features['image'].shape
    splits = builder.info.splits
    name = parse_split('', cds.train_split)[0]
    num = splits[name].num_examples if name in splits else 0
    mode = cds.get('in_memory', 'auto')
    if mode not in ('auto', 'always', 'never'):
      raise UserError(f"config.dataset.in_memory: choose auto, always or never, got {mode!r}")
    large = None in shape or num * int(np.prod(shape)) > _IN_MEMORY_MAX_BYTES
    if mode == 'never' or (mode == 'auto' and large):
      if wanted:
        raise UserError('config.dataset.classes: class subsets need an in-memory dataset or '
                        'an image folder')
      train = StreamSource(builder, cds.train_split, _split_size(builder, cds.train_split))
      eval_ = StreamSource(builder, cds.eval_split, _split_size(builder, cds.eval_split))
    else:
      train = _tfds_in_memory(builder, cds.train_split, all_names, wanted)
      eval_ = _tfds_in_memory(builder, cds.eval_split, all_names, wanted)
  info = DatasetInfo(num_classes=len(class_names), class_names=list(class_names),
                     num_train=len(train), num_eval=len(eval_), image_size=size)
  if info.num_eval == 0 or info.num_train == 0:
    raise UserError(f'config.dataset: the train split ({info.num_train} examples) and the '
                    f'eval split ({info.num_eval}) must both be non-empty')
  return Data(config, train, eval_, info)
