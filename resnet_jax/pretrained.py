"""Pretrained initialisation: this project's checkpoints and torchvision-layout weights.

`finetune.init_from` may be
  * '' : train from scratch;
  * a workdir or checkpoint directory of this project (params and batch_stats);
  * a torchvision-layout state dict file: `.safetensors`, or `.pth`/`.pt` read
    by `torch_pickle` (no torch needed, and no code in the file is run);
  * 'torchvision:<arch>': the published ImageNet weights, downloaded once into
    `finetune.cache_dir` and converted;
  * 'timm:<name>': `model.safetensors` of the Hub repo `timm/<name>` (`hub`).
Before loading, the two trees are compared name by name; any mismatch not
covered by `finetune.dont_load` is an error that lists the names.
`check_source` answers, without downloading, whether `init_from` can be had,
so a caller can report it before any training work.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.error
import urllib.request
from typing import Any, Callable

import numpy as np

from resnet_jax import checkpointing, hub, torch_pickle
from resnet_jax.errors import UserError

# Seconds without an answer before a download gives up (per connection attempt or read).
DOWNLOAD_TIMEOUT_S = 20
# torchvision's published ImageNet weights (IMAGENET1K_V1).
TORCHVISION_URLS = {
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet34': 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'resnet152': 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
}

_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def torch_name_to_path(name: str) -> tuple[str, str] | None:
  """Maps a torchvision key to (collection, '/'-joined path); None for ignored keys."""
  parts = name.split('.')
  if parts[-1] == 'num_batches_tracked':
    return None
  leaf = parts[-1]
  if parts[0] in ('fc', 'linear') and len(parts) == 2:
    return 'params', f'head/{"kernel" if leaf == "weight" else "bias"}'
  if parts[0] == 'conv1' and len(parts) == 2:
    return 'params', 'stem/conv/kernel'
  if parts[0] == 'bn1' and len(parts) == 2 and leaf in _BN:
    coll, key = _BN[leaf]
    return coll, f'stem/bn/{key}'
  m = re.fullmatch(r'layer(\d+)\.(\d+)\.(.+)', name)
  if not m:
    return 'unknown', name
  prefix = f'stage{m.group(1)}/block{m.group(2)}'
  rest = m.group(3).split('.')
  if rest[0].startswith('conv') and rest[1:] == ['weight']:
    return 'params', f'{prefix}/{rest[0]}/kernel'
  if rest[0].startswith('bn') and len(rest) == 2 and rest[1] in _BN:
    coll, key = _BN[rest[1]]
    return coll, f'{prefix}/{rest[0]}/{key}'
  if rest[0] == 'downsample' and rest[1] == '0' and rest[2:] == ['weight']:
    return 'params', f'{prefix}/proj_conv/kernel'
  if rest[0] == 'downsample' and rest[1] == '1' and len(rest) == 3 and rest[2] in _BN:
    coll, key = _BN[rest[2]]
    return coll, f'{prefix}/proj_bn/{key}'
  return 'unknown', name


def convert_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """torchvision layout -> {'params': ..., 'batch_stats': ...} nested dicts (numpy).

  Conv kernels go from OIHW to HWIO, the linear weight is transposed. Keys with
  no counterpart land under 'unexpected' so the comparison can name them.
  """
  out: dict[str, Any] = {'params': {}, 'batch_stats': {}, 'unexpected': []}
  for name, value in state_dict.items():
    mapped = torch_name_to_path(name)
    if mapped is None:
      continue
    coll, path = mapped
    if coll == 'unknown':
      out['unexpected'].append(name)
      continue
    value = np.asarray(value, np.float32)
    if path.endswith('kernel'):
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    node = out[coll]
    *dirs, leaf = path.split('/')
    for d in dirs:
      node = node.setdefault(d, {})
    node[leaf] = value
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch state dict from .safetensors or .pth/.pt, without torch either way."""
  if not os.path.isfile(path):
    raise UserError(f'config.finetune.init_from: weight file {path} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'config.finetune.init_from: cannot read {path}: {e}') from None
  try:
    sd = torch_pickle.load(path)
  except UserError as e:
    raise UserError(f'config.finetune.init_from: {e}') from None
  if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
    sd = sd['state_dict']
  if not isinstance(sd, dict):
    raise UserError(f'config.finetune.init_from: {path} does not hold a state dict')
  return {str(k).removeprefix('module.'): v for k, v in sd.items()
          if isinstance(v, np.ndarray)}


def fetch_torchvision(arch: str, cache_dir: str) -> str:
  """Downloads torchvision's weights once; a clear error says where to put them offline."""
  if arch not in TORCHVISION_URLS:
    raise UserError(f'config.finetune.init_from: no torchvision weights for {arch!r}; '
                    f'choose one of {", ".join(TORCHVISION_URLS)}')
  url = TORCHVISION_URLS[arch]
  cache_dir = os.path.expanduser(cache_dir)
  dest = os.path.join(cache_dir, os.path.basename(url))
  if os.path.isfile(dest):
    return dest
  os.makedirs(cache_dir, exist_ok=True)
  tmp = dest + '.part'
  try:
    logging.info('Downloading %s to %s', url, dest)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, 'wb') as f:
      while chunk := r.read(1 << 20):
        f.write(chunk)
    os.replace(tmp, dest)
  except Exception as e:  # pylint: disable=broad-except
    if os.path.exists(tmp):
      os.remove(tmp)
    raise UserError(f'config.finetune.init_from: cannot download {url} ({type(e).__name__}); '
                    f'offline? fetch that file elsewhere and place it at {dest}') from None
  return dest


def load_pretrained(init_from: str, cache_dir: str) -> dict[str, Any]:
  """Returns {'params', 'batch_stats'[, 'unexpected']} from any supported source."""
  if init_from.startswith('torchvision:'):
    path = fetch_torchvision(init_from.split(':', 1)[1], cache_dir)
    return convert_torch_state_dict(read_state_dict(path))
  if init_from.startswith('timm:'):
    path = hub.fetch(init_from.split(':', 1)[1], cache_dir)
    return convert_torch_state_dict(read_state_dict(path))
  if init_from.endswith(('.safetensors', '.pth', '.pt')):
    return convert_torch_state_dict(read_state_dict(init_from))
  if not os.path.exists(init_from):
    raise UserError(f'config.finetune.init_from: {init_from} does not exist')
  return checkpointing.load_variables(init_from)


def check_source(config: Any, timeout_s: float = 5.0) -> str | None:
  """Whether `config.finetune.init_from` can be had, answered before any training work.

  Contract: returns None when there is nothing to load, or the weights are on
  disk (a file, a project workdir/checkpoint folder, a cached `torchvision:` or
  `timm:` download), or the remote file answered a metadata request; otherwise
  one line, prefixed `config.finetune.init_from:`, naming the problem and, for
  downloads, the file to fetch and where to put it (unknown architecture or
  timm name, missing file or folder, not cached while `HF_HUB_OFFLINE` is set,
  server unreachable or without that file). It never downloads weights, never
  writes (not even the cache folder) and never raises for these problems; it
  takes no network time when the weights are cached, and about `timeout_s`
  seconds at most (DNS included) for the one request it makes otherwise. It does not
  read the weights, so a corrupt file or one that does not fit the model still
  fails later, in `initial_variables`, with its own UserError.
  """
  ft = config.get('finetune', None)
  init_from = ft.get('init_from', '') if ft else ''
  if not init_from:
    return None
  cache_dir = ft.get('cache_dir', '~/.cache/resnet_jax')
  try:
    if init_from.startswith('torchvision:'):
      return _check_torchvision(init_from.split(':', 1)[1], cache_dir, timeout_s)
    if init_from.startswith('timm:'):
      name = init_from.split(':', 1)[1]
      if hub.cached(name, cache_dir):
        return None
      if hub.offline():
        return hub.missing(name, cache_dir, 'HF_HUB_OFFLINE is set')
      return _within(lambda: hub.probe(name, cache_dir, timeout_s), timeout_s,
                     hub.missing(name, cache_dir, f'the Hub did not answer within {timeout_s:g}s'))
  except UserError as e:
    return str(e)
  if init_from.endswith(('.safetensors', '.pth', '.pt')):
    if not os.path.isfile(init_from):
      return f'config.finetune.init_from: weight file {init_from} does not exist'
    return None
  if not os.path.exists(init_from):
    return f'config.finetune.init_from: {init_from} does not exist'
  try:
    checkpointing.find_checkpoint_root(init_from)
  except UserError as e:
    return str(e)
  return None


def _check_torchvision(arch: str, cache_dir: str, timeout_s: float) -> str | None:
  if arch not in TORCHVISION_URLS:
    raise UserError(f'config.finetune.init_from: no torchvision weights for {arch!r}; '
                    f'choose one of {", ".join(TORCHVISION_URLS)}')
  url = TORCHVISION_URLS[arch]
  dest = os.path.join(os.path.expanduser(cache_dir), os.path.basename(url))
  if os.path.isfile(dest):
    return None

  def head() -> str | None:
    # A one-byte ranged GET: servers that refuse HEAD still answer it, and nothing is downloaded.
    request = urllib.request.Request(url, headers={'Range': 'bytes=0-0'})
    try:
      urllib.request.urlopen(request, timeout=timeout_s).close()
      return None
    except urllib.error.HTTPError as e:
      return _torchvision_missing(dest, f'{url} answered HTTP {e.code}')
    except Exception as e:  # pylint: disable=broad-except
      return _torchvision_missing(dest, f'{url} cannot be reached ({type(e).__name__})')

  return _within(head, timeout_s,
                 _torchvision_missing(dest, f'{url} did not answer within {timeout_s:g}s'))


def _torchvision_missing(dest: str, why: str) -> str:
  return (f'config.finetune.init_from: {os.path.basename(dest)} is not cached and {why}; '
          f'fetch it elsewhere and place it at {dest}')


def _within(probe: Callable[[], str | None], timeout_s: float, late: str) -> str | None:
  """Runs a network probe with a hard deadline (socket timeouts do not bound DNS look-ups)."""
  result: list[str | None] = []

  def run() -> None:
    try:
      result.append(probe())
    except UserError as e:
      result.append(str(e))

  worker = threading.Thread(target=run, daemon=True, name='resnet_jax-weights-probe')
  worker.start()
  worker.join(timeout_s + 1.0)
  return result[0] if result else late


def initial_variables(config: Any, fresh: dict[str, Any]) -> dict[str, Any]:
  """The model's starting variables: fresh, or pretrained where names and shapes match."""
  ft = config.get('finetune', None)
  init_from = ft.get('init_from', '') if ft else ''
  if not init_from:
    return fresh
  loaded = load_pretrained(init_from, ft.get('cache_dir', '~/.cache/resnet_jax'))
  dont_load = ft.get('dont_load', '^head/')
  if ft.get('reset_head', False):
    dont_load = f'(?:{dont_load})|^head/' if dont_load else '^head/'
  report = checkpointing.compare_trees(loaded, fresh, dont_load)
  report.unexpected += [f'torch:{n}' for n in loaded.get('unexpected', [])]
  logging.info('Pretrained %s: %s', init_from, report.summary())
  errors = report.errors()
  if errors:
    shown = '; '.join(errors[:5]) + (f'; and {len(errors) - 5} more' if len(errors) > 5 else '')
    raise UserError(f'config.finetune.init_from: {init_from} does not fit the model '
                    f'({report.summary()}): {shown} (add names to config.finetune.dont_load '
                    'to keep them freshly initialised)')
  return checkpointing.merge_loaded(loaded, fresh, report)
