"""Reads PyTorch `.pth`/`.pt` state dicts without torch and without running code from the file.

A `.pth` written by `torch.save` is a pickle, and a pickle can call any
importable function while it loads: `pickle.load` on a downloaded weight file
runs whatever the file says. This reader unpickles through an allowlist: the
only globals a file may name are the tensor and storage reconstruction helpers
of `torch._utils`, the `torch.<Dtype>Storage` types and
`collections.OrderedDict`, each bound here to a numpy stand-in. Any other
global (`os.system`, `builtins.eval`, a model class) is a `UserError` naming it,
raised before anything is called. Tensors come back as numpy arrays (bfloat16
through `ml_dtypes`); their strides and offsets are checked against the storage
before it is viewed, so a crafted file cannot read outside its own bytes.

Two formats: the zip archive of torch >= 1.6 (`<prefix>/data.pkl` plus one
`<prefix>/data/<key>` record per storage) and the older single pickle stream
(magic number, protocol, system info, the object, the storage keys, then each
storage's bytes). Tar archives of torch < 0.4 are refused with a clear message.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import tarfile
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from resnet_jax.errors import UserError

_DTYPES = {
    'FloatStorage': np.dtype(np.float32), 'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _Sealed:
  """Refuses pickle's BUILD opcode, so a file cannot rewrite our objects' fields."""
  __slots__ = ()

  def __setstate__(self, state):
    raise ValueError('the pickle tries to set the state of a tensor, storage or function')


class _Callable(_Sealed):
  """An allowlisted global: a fresh wrapper per lookup, so the module's functions stay untouched."""
  __slots__ = ('fn',)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


class _StorageType(_Sealed):
  """What `torch.FloatStorage` & co. unpickle to: only a dtype."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self.name, self.dtype = name, _DTYPES[name]


class _Storage(_Sealed):
  """A flat typed buffer; its bytes may arrive after the pickle (legacy format)."""
  __slots__ = ('dtype', 'numel', 'data', 'base')

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.data: np.ndarray | None = None
    self.base: tuple[_Storage, int] | None = None  # Legacy views: (root, element offset).

  def array(self) -> np.ndarray:
    if self.base is not None:
      root, offset = self.base
      return root.array()[offset:offset + self.numel]
    if self.data is None:
      raise ValueError('a storage the pickle refers to has no data')
    return self.data


class _Tensor(_Sealed):
  """A tensor recorded while unpickling, built into an array once every storage is read."""
  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, _Storage):
      raise ValueError('a tensor whose storage is not a persistent storage record')
    size, stride = _ints(size), _ints(stride)
    if size is None or stride is None or len(size) != len(stride) or not _ints((offset,)):
      raise ValueError('a tensor with malformed size, stride or offset')
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def build(self) -> np.ndarray:
    flat = self.storage.array()
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise ValueError(f'a tensor of size {self.size}, stride {self.stride} and offset '
                       f'{self.offset} reads past its storage of {flat.size} elements')
    flat = flat[self.offset:]
    if self.stride == _contiguous_strides(self.size):
      view = flat[:int(np.prod(self.size))].reshape(self.size)
    else:
      view = np.lib.stride_tricks.as_strided(
          flat, self.size, [s * flat.itemsize for s in self.stride], writeable=False)
    return np.array(view, order='C')  # Own, writable, contiguous memory.


def _ints(xs: Any) -> tuple[int, ...] | None:
  """The tuple when every entry is a plain int >= 0 (no bools, no negative strides), else None."""
  if isinstance(xs, (tuple, list)) and all(type(x) is int and x >= 0 for x in xs):  # pylint: disable=unidiomatic-typecheck
    return tuple(xs)
  return None


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
  strides, acc = [], 1
  for n in reversed(size):
    strides.append(acc)
    acc *= n
  return tuple(reversed(strides))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the allowlisted globals; storages come from `storage_for`."""

  def __init__(self, file: BinaryIO, path: str, storage_for=None):
    super().__init__(file)
    self._path, self._storage_for = path, storage_for

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch' and name in _DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _Callable(_ALLOWED[(module, name)])
    raise UserError(f'{self._path}: refused to load: the file asks for {module}.{name}, '
                    'which is not a tensor or storage (only weights are read; no code '
                    'from a weight file is run)')

  def persistent_load(self, pid: Any) -> Any:
    if (self._storage_for is None or not isinstance(pid, tuple) or not pid
        or pid[0] not in ('storage', b'storage')):
      raise UserError(f'{self._path}: refused to load: persistent record {str(pid)[:80]} '
                      'is not a storage')
    return self._storage_for(pid[1:])


def load(path: str) -> Any:
  """The object `torch.load(path, weights_only=True)` would give, tensors as numpy arrays."""
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    if tarfile.is_tarfile(path):
      raise UserError(f'{path}: the tar format of torch < 0.4 is not supported; re-save it '
                      'with torch.save, or as .safetensors')
    with open(path, 'rb') as f:
      return _load_legacy(f, path)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path}: not a readable PyTorch file ({type(e).__name__}: '
                    f'{str(e)[:200]})') from None


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    pickles = [n for n in z.namelist() if re.fullmatch(r'(?:[^/]*/)?data\.pkl', n)]
    if len(pickles) != 1:
      raise ValueError(f'expected one data.pkl in the archive, found {len(pickles)}')
    prefix = pickles[0][:-len('data.pkl')]
    big_endian = (prefix + 'byteorder' in z.namelist()
                  and z.read(prefix + 'byteorder').strip() == b'big')
    raw: dict[tuple[str, np.dtype], _Storage] = {}

    def storage_for(record: tuple) -> _Storage:
      storage_type, key, _location, numel = record
      if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
        raise ValueError(f'malformed storage record {record!r:.80}')
      key = key.decode('ascii') if isinstance(key, bytes) else str(key)
      dtype = storage_type.dtype
      if (key, dtype) not in raw:
        storage = _Storage(dtype, numel)
        storage.data = _typed(z.read(f'{prefix}data/{key}'), dtype, numel, big_endian)
        raw[(key, dtype)] = storage
      return raw[(key, dtype)]

    with z.open(pickles[0]) as f:
      obj = _Unpickler(io.BytesIO(f.read()), path, storage_for).load()
  return _build(obj)


def _load_legacy(f: BinaryIO, path: str) -> Any:
  def plain():
    return _Unpickler(f, path).load()

  if plain() != _LEGACY_MAGIC:
    raise ValueError('neither a zip archive nor a legacy torch.save stream')
  if plain() != _LEGACY_PROTOCOL:
    raise ValueError('unknown legacy protocol version')
  sys_info = plain()
  little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
  storages: dict[str, _Storage] = {}

  def storage_for(record: tuple) -> _Storage:
    storage_type, key, _location, numel, view = record
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise ValueError(f'malformed storage record {record!r:.80}')
    key = str(key)
    if key not in storages:
      storages[key] = _Storage(storage_type.dtype, numel)
    if view is None:
      return storages[key]
    view_key, offset, view_numel = view
    if str(view_key) not in storages:
      storages[str(view_key)] = _Storage(storage_type.dtype, view_numel)
      storages[str(view_key)].base = (storages[key], offset)
    return storages[str(view_key)]

  obj = _Unpickler(f, path, storage_for).load()
  for key in plain():
    storage = storages[str(key)]
    (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
    nbytes = numel * storage.dtype.itemsize
    storage.data = _typed(f.read(nbytes), storage.dtype, numel, not little)
  return _build(obj)


def _typed(data: bytes, dtype: np.dtype, numel: int, big_endian: bool) -> np.ndarray:
  if numel < 0 or len(data) < numel * dtype.itemsize:
    raise ValueError(f'a storage holds {len(data)} bytes, fewer than {numel} elements need')
  if big_endian and dtype.itemsize > 1:
    swapped = np.frombuffer(data, f'>u{dtype.itemsize}', count=numel).astype(f'<u{dtype.itemsize}')
    return swapped.view(dtype)
  return np.frombuffer(data, dtype, count=numel)


def _build(obj: Any) -> Any:
  """Replaces every recorded tensor by its array, through dicts, lists and tuples."""
  if isinstance(obj, _Tensor):
    return obj.build()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _build(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_build(v) for v in obj)
  if isinstance(obj, (_Storage, _StorageType)):
    raise ValueError('a bare storage outside a tensor')
  return obj
