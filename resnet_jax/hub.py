"""`timm:<name>` weights: `model.safetensors` of the Hugging Face Hub repo `timm/<name>`.

timm's plain ResNets (`resnet18.a1_in1k`, `resnet50.a1_in1k`, `resnet50.tv2_in1k`,
...) use torchvision's parameter names (`conv1`, `bn1`, `layerN.M.convK`,
`downsample.0/1`, `fc`), so `pretrained.convert_torch_state_dict` maps them;
variants with other stems or blocks (`resnet50d`, `seresnet50`, ...) come out
as unexpected names and fail the strict comparison with those names.

Where the file is looked for, in order, with no network:
  1. `<finetune.cache_dir>/timm/<name>/model.safetensors` (where downloads go,
     and where to put a file fetched on another machine);
  2. the standard Hugging Face cache (`HF_HUB_CACHE`), as filled by timm itself.
Only then is the Hub asked, unless `HF_HUB_OFFLINE` is set: first a single
metadata request with a short timeout and no retries (`probe`), so an offline
machine gets its one-line error in seconds rather than after huggingface_hub's
minute of retries; then `hf_hub_download` into the folder of (1).
"""

from __future__ import annotations

import os
import re

from resnet_jax.errors import UserError

FILENAME = 'model.safetensors'
TIMEOUT_S = 10.0      # One metadata request; the download itself uses huggingface_hub's timeouts.
ENDPOINT: str | None = None  # None: HF_ENDPOINT or https://huggingface.co.
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.\-]*')


def repo_id(name: str) -> str:
  if not _NAME.fullmatch(name) or '..' in name:
    raise UserError(f'config.finetune.init_from: timm:{name} is not a timm model name '
                    '(e.g. timm:resnet50.a1_in1k)')
  return f'timm/{name}'


def local_path(name: str, cache_dir: str) -> str:
  """Where the file is downloaded to, and where to place it by hand."""
  repo_id(name)  # A valid name cannot climb out of the cache folder.
  return os.path.join(os.path.expanduser(cache_dir), 'timm', name, FILENAME)


def offline() -> bool:
  """HF_HUB_OFFLINE as huggingface_hub reads it, re-read so a change after import counts."""
  value = os.environ.get('HF_HUB_OFFLINE') or os.environ.get('TRANSFORMERS_OFFLINE') or ''
  return value.upper() in ('1', 'ON', 'YES', 'TRUE')


def cached(name: str, cache_dir: str) -> str | None:
  """The local copy of the weights, or None; never touches the network."""
  path = local_path(name, cache_dir)
  if os.path.isfile(path):
    return path
  try:
    from huggingface_hub import try_to_load_from_cache
  except ImportError:
    return None
  hit = try_to_load_from_cache(repo_id(name), FILENAME)
  return hit if isinstance(hit, str) and os.path.isfile(hit) else None


def missing(name: str, cache_dir: str, why: str) -> str:
  """The one-line problem for weights that are neither cached nor downloadable now."""
  try:
    from huggingface_hub import hf_hub_url
    url = hf_hub_url(repo_id(name), FILENAME, endpoint=ENDPOINT)
  except ImportError:
    url = f'https://huggingface.co/{repo_id(name)}/resolve/main/{FILENAME}'
  return (f'config.finetune.init_from: timm:{name} is not cached and {why}; download {url} '
          f'elsewhere and place it at {local_path(name, cache_dir)}')


def probe(name: str, cache_dir: str, timeout_s: float = TIMEOUT_S) -> str | None:
  """One metadata request, no retries: None when the Hub serves the file, else the problem."""
  try:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
  except ImportError:
    return ('config.finetune.init_from: timm: sources need huggingface_hub '
            '(pip install -r requirements.txt)')
  repo = repo_id(name)
  try:
    get_hf_file_metadata(hf_hub_url(repo, FILENAME, endpoint=ENDPOINT), timeout=timeout_s,
                         endpoint=ENDPOINT, retry_on_errors=False)
  except RepositoryNotFoundError:
    return (f'config.finetune.init_from: timm:{name}: the Hub has no repository {repo} '
            '(model names are listed at https://huggingface.co/timm)')
  except EntryNotFoundError:
    return f'config.finetune.init_from: timm:{name}: {repo} has no {FILENAME}'
  except Exception as e:  # pylint: disable=broad-except
    return missing(name, cache_dir, f'the Hub cannot be reached ({type(e).__name__})')
  return None


def fetch(name: str, cache_dir: str) -> str:
  """The path of the weights: a local copy, else downloaded once into `local_path`."""
  path = cached(name, cache_dir)
  if path:
    return path
  if offline():
    raise UserError(missing(name, cache_dir, 'HF_HUB_OFFLINE is set'))
  problem = probe(name, cache_dir)
  if problem:
    raise UserError(problem)
  from huggingface_hub import hf_hub_download
  try:
    return hf_hub_download(repo_id(name), FILENAME, local_dir=os.path.dirname(
        local_path(name, cache_dir)), etag_timeout=TIMEOUT_S, endpoint=ENDPOINT)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(missing(name, cache_dir, f'the download failed ({type(e).__name__})')) \
        from None
