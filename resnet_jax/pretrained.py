"""Pretrained initialisation: this project's checkpoints and torchvision-layout weights.

`finetune.init_from` may be
  * '' : train from scratch;
  * a workdir or checkpoint directory of this project (params and batch_stats);
  * a torchvision-layout state dict file: `.safetensors` (read without torch) or
    `.pth`/`.pt` (needs torch);
  * 'torchvision:<arch>': the published ImageNet weights, downloaded once into
    `finetune.cache_dir` and converted.
Before loading, the two trees are compared name by name; any mismatch not
covered by `finetune.dont_load` is an error that lists the names.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.request
from typing import Any

import numpy as np

from resnet_jax import checkpointing
from resnet_jax.errors import UserError

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
  """Reads a torch state dict from .safetensors (no torch needed) or .pth/.pt."""
  if not os.path.isfile(path):
    raise UserError(f'config.finetune.init_from: weight file {path} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'config.finetune.init_from: cannot read {path}: {e}') from None
  try:
    import torch
  except ImportError:
    raise UserError(f'config.finetune.init_from: reading {path} needs torch '
                    '(pip install torch==2.13.0) or a .safetensors file') from None
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'config.finetune.init_from: cannot read {path}: {type(e).__name__}') from None
  if isinstance(sd, dict) and 'state_dict' in sd:
    sd = sd['state_dict']
  if not isinstance(sd, dict):
    raise UserError(f'config.finetune.init_from: {path} does not hold a state dict')
  return {k.removeprefix('module.'): v.detach().float().numpy() for k, v in sd.items()
          if hasattr(v, 'detach')}


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
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, 'wb') as f:
      while chunk := r.read(1 << 20):
        f.write(chunk)
    os.replace(tmp, dest)
  except Exception as e:  # pylint: disable=broad-except
    if os.path.exists(tmp):
      os.remove(tmp)
    raise UserError(f'cannot download {url} ({type(e).__name__}); offline? fetch that file '
                    f'elsewhere and place it at {dest}') from None
  return dest


def load_pretrained(init_from: str, cache_dir: str) -> dict[str, Any]:
  """Returns {'params', 'batch_stats'[, 'unexpected']} from any supported source."""
  if init_from.startswith('torchvision:'):
    path = fetch_torchvision(init_from.split(':', 1)[1], cache_dir)
    return convert_torch_state_dict(read_state_dict(path))
  if init_from.endswith(('.safetensors', '.pth', '.pt')):
    return convert_torch_state_dict(read_state_dict(init_from))
  if not os.path.exists(init_from):
    raise UserError(f'config.finetune.init_from: {init_from} does not exist')
  return checkpointing.load_variables(init_from)


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
