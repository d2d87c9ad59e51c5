"""Training batches from an image folder with Grain: PIL decode and resize in worker processes.

`dataset.loader='grain'` (see `check_config`) makes `input_pipeline.Data.train_iter`
read training batches here instead of tf.data. It pays for 224px random-resized
crops of JPEG folders: PIL's antialiased uint8 resize costs about a third of
TensorFlow's float32 one (docs/benchmarks.md, "tf.data against Grain").

The data are the same function of (seed, step) as tf.data's, and only of those:
  * the examples of each step, and their global counters, are
    `input_pipeline._train_indices`'s, so the example order and the split
    between processes are tf.data's, and a resume at step s reads on from s;
  * each example's random choices (crop box, flip) come from a Philox
    generator keyed by (config.seed, counter) alone, so neither the worker
    count nor the step a run started at changes them.
The pixels are PIL's, not TensorFlow's: not bit-identical to tf.data's for the
same (seed, step), hence `dataset.loader` is a resume field.

Each element of the Grain dataset is one step's whole local batch: workers take
steps in turn (`mp_prefetch`), and Grain hands them back in step order.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import weakref
from typing import Any, Iterator

import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.preprocess import CROP_AREA, CROP_RATIO, CROP_TRIES, augment_kind, pixel_norm

LOADERS = ('tf.data', 'grain')
_FAR = 2**62  # The dataset's end: training is infinite, the caller stops.
_OPEN: Any = weakref.WeakSet()  # Iterators with workers, closed at exit if still open.


def _close_open() -> None:
  """Closes what is still open at exit (see `_closing`). Registered after Grain's own exit
  handlers (atexit runs the last registered first), so the workers are still there."""
  for it in list(_OPEN):
    it.close()


def loader(config_ds: Any) -> str:
  """'tf.data' or 'grain': the training input pipeline; every misuse is one UserError line."""
  name = config_ds.get('loader', 'tf.data')
  if name not in LOADERS:
    raise UserError(f"config.dataset.loader: unknown loader {name!r}; choose 'tf.data' or "
                    "'grain'")
  if name == 'tf.data':
    return name
  wrong = []
  if config_ds.get('name') != 'image_folder':
    wrong.append(f"dataset.name={config_ds.get('name')!r} (needs 'image_folder')")
  if augment_kind(config_ds) != 'random_resized_crop':
    wrong.append(f'dataset.augment={augment_kind(config_ds)!r} (needs random_resized_crop)')
  if str(config_ds.get('randaugment', '')).strip():
    wrong.append("dataset.randaugment (needs '')")
  if float(config_ds.get('random_erasing', 0.0)):
    wrong.append('dataset.random_erasing (needs 0)')
  if config_ds.get('on_device', False):
    wrong.append('dataset.on_device (needs False)')
  if wrong:
    raise UserError("config.dataset.loader: 'grain' reads image folders with "
                    'random_resized_crop and no RandAugment or erasing only; here ' +
                    ', '.join(wrong) + "; set dataset.loader='tf.data' or change those")
  workers = int(config_ds.get('grain_workers', 0))
  if workers < 0:
    raise UserError(f'config.dataset.grain_workers: 0 (the cores available) or more, got '
                    f'{workers}')
  return name


def cpu_cores() -> int:
  """The cores this process may run on (its affinity), else the machine's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def example_rng(seed: int, counter: int) -> np.random.Generator:
  """The random stream of one example: Philox keyed by (seed, global example counter)."""
  key = ((int(seed) & (2**64 - 1)) << 64) | (int(counter) & (2**64 - 1))
  return np.random.Generator(np.random.Philox(key=key))


def crop_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
  """(left, top, width, height): Inception's box, as tf.data draws it (area and ratio
  uniform in `CROP_AREA`, `CROP_RATIO`; `CROP_TRIES` tries, else the whole image)."""
  for _ in range(CROP_TRIES):
    area = w * h * rng.uniform(*CROP_AREA)
    ratio = rng.uniform(*CROP_RATIO)
    cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
  return 0, 0, w, h


def random_resized_crop(path: str, rng: np.random.Generator, size: int, flip: bool
                        ) -> np.ndarray:
  """uint8 [size, size, 3]: the box of `crop_box`, resized (bilinear, antialiased), flipped."""
  from PIL import Image
  with Image.open(path) as im:
    w, h = im.size  # From the header: nothing decoded yet.
    left, top, cw, ch = crop_box(rng, w, h)
    # JPEGs: decode at the largest DCT reduction that keeps the box at least size x size.
    im.draft(im.mode, (math.ceil(w * size / cw), math.ceil(h * size / ch)))
    sx, sy = im.size[0] / w, im.size[1] / h
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    image = np.asarray(im.convert('RGB').resize((size, size), Image.BILINEAR, box=box))
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


class StepBatches:
  """step -> that step's local batch {'image', 'label'}; what each Grain worker runs.

  The indices come from `_train_indices`, one generator per worker that is
  advanced, not rebuilt, while steps come in order (a worker skips the steps the
  others take); a step behind it, or an epoch ahead, starts a new one.
  """

  def __init__(self, paths: Any, labels: np.ndarray, config: Any, local_batch: int,
               process_index: int, process_count: int, as_uint8: bool):
    encoded = [os.fsencode(str(p)) for p in paths]
    self._blob = b''.join(encoded)  # Compact to pickle into each worker: 1 string, 1 array.
    self._ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
    self._labels = np.asarray(labels, np.int32)
    cds = config.dataset
    self._seed, self._size = int(config.seed), int(cds.image_size)
    self._flip, self._as_uint8 = bool(cds.get('flip', True)), as_uint8
    self._mean, self._inv_std = pixel_norm(cds)
    self._batch, self._pi, self._pc = local_batch, process_index, process_count
    self._per_epoch = len(self._labels) // (local_batch * process_count)
    self.__setstate__(self.__dict__)

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in ('_gen', '_next', '_lock')}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._gen, self._next, self._lock = None, -1, threading.Lock()

  def _path(self, i: int) -> str:
    start = int(self._ends[i - 1]) if i else 0
    return os.fsdecode(self._blob[start:int(self._ends[i])])

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, global counters) of `step`: `_train_indices` from that step."""
    from resnet_jax.input_pipeline import _train_indices
    with self._lock:
      if self._gen is None or not self._next <= step <= self._next + self._per_epoch:
        self._gen = _train_indices(self._seed, len(self._labels), self._batch, step,
                                   self._pi, self._pc)
        self._next = step
      while True:
        out = next(self._gen)
        self._next += 1
        if self._next > step:
          return out

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    index, counter = self.indices(int(step))
    images = np.stack([random_resized_crop(self._path(int(i)), example_rng(self._seed, c),
                                           self._size, self._flip)
                       for i, c in zip(index, counter)])
    if not self._as_uint8:  # As preprocess.finish and device_data.normalise: (x - mean) * inv_std.
      images = (images.astype(np.float32) - self._mean) * self._inv_std
    return {'image': images, 'label': self._labels[index]}


def _parse_flags() -> None:
  """Grain reads absl flags (grain_*): outside an absl app (tests, notebooks) use defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_batches(source: Any, config: Any, local_batch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1, as_uint8: bool = False,
                  workers: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of `train_iter`'s batches from `start_step` on, read by Grain.

  `source`: a `sources.Source` with paths. `workers`: Grain worker processes;
  None: `dataset.grain_workers`, whose 0 means the cores available; 0 here:
  in this process (tests).
  """
  import grain
  from resnet_jax.input_pipeline import check_steps_per_epoch
  loader(config.dataset)
  if getattr(source, 'paths', None) is None:
    raise UserError("config.dataset.loader: 'grain' reads image files; this split has none")
  check_steps_per_epoch(len(source), local_batch * process_count)
  if workers is None:
    workers = int(config.dataset.get('grain_workers', 0)) or cpu_cores()
  _parse_flags()
  fn = StepBatches(source.paths, source.labels, config, local_batch, process_index,
                   process_count, as_uint8)
  ds = grain.MapDataset.range(int(start_step), _FAR).map(fn)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  if workers > 0:
    buffer = max(1, -(-int(config.dataset.get('prefetch', 4)) // workers))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=buffer))
  batches = _closing(iter(it))
  atexit.unregister(_close_open)
  atexit.register(_close_open)
  _OPEN.add(batches)
  return batches


def _closing(it: Any) -> Iterator[dict[str, np.ndarray]]:
  """`it`'s batches; closing this generator (or collecting it, or exiting) closes `it`,
  which ends the workers and frees their buffered batches' shared memory. Left to Grain's
  garbage collection it is not freed (a resource_tracker warning at exit); a close just
  before exit, with workers mid-batch, may still leave a few for that tracker to free."""
  try:
    yield from it
  finally:
    it.close()
