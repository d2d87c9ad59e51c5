"""What a dataset is to the pipeline: its splits, sources and class names.

`Source` (random access: file paths or uint8 images in memory) and
`StreamSource` (a large TFDS split read as a stream), split names with
per-class slices ('train[:90%]'), class subsets, and `DatasetInfo`, shared by
`image_folder.py` and the TFDS code in `input_pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from resnet_jax.errors import UserError

_IN_MEMORY_MAX_BYTES = 4 << 30


@dataclasses.dataclass
class DatasetInfo:
  """What the rest of the program needs to know about the data."""
  num_classes: int
  class_names: list[str]
  num_train: int
  num_eval: int
  image_size: int


# --------------------------------------------------------------------------- splits


_SLICE_RE = re.compile(r'^([\w\-]+)(?:\[(-?\d*%?):(-?\d*%?)\])?$')


def parse_split(field: str, split: str) -> tuple[str, str, str]:
  """'train[:90%]' -> ('train', '', '90%'). Slices apply per class for image folders."""
  m = _SLICE_RE.match(split.strip())
  if not m:
    raise UserError(f'{field}: cannot parse split {split!r}; use NAME or NAME[start:end] '
                    f"with integers or percentages, e.g. 'train[:90%]'")
  return m.group(1), m.group(2) or '', m.group(3) or ''


def _slice_bound(text: str, n: int) -> int | None:
  if not text:
    return None
  if text.endswith('%'):
    return int(round(int(text[:-1]) * n / 100))
  return int(text)


def apply_slice(items: list[Any], start: str, end: str) -> list[Any]:
  n = len(items)
  return items[_slice_bound(start, n):_slice_bound(end, n)]


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
  """A split with random access: either file paths or in-memory uint8 images."""
  labels: np.ndarray
  paths: np.ndarray | None = None        # object array of str
  images: np.ndarray | None = None       # uint8 [N, H, W, C]

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class StreamSource:
  """A TFDS split too large for memory, read as a stream of encoded records."""
  builder: Any
  split: str
  num_examples: int

  def __len__(self) -> int:
    return self.num_examples


def _class_subset(config_ds: Any) -> list[str]:
  classes = config_ds.get('classes', '')
  if isinstance(classes, (tuple, list)):
    return [str(c) for c in classes]
  return [c.strip() for c in str(classes).split(',') if c.strip()]


def _check_classes(field: str, class_names: list[str], where: str) -> None:
  """One class is no classification problem (and a silently perfect accuracy)."""
  if len(class_names) < 2:
    raise UserError(f'{field}: {where} has only {len(class_names)} class '
                    f'({", ".join(class_names) or "none"}); classification needs at least two')
