"""The config's known fields: `configs/default.py` lists every one, so anything else is a typo.

ml-collections' `lock_config` only guards command-line overrides; a field that a
config file sets by mistake (`c.model.nme = 'resnet50'`) would be accepted and
silently ignored. `check_known_fields` compares the final config with the
reference tree and names each unknown field with its closest known one.
"""

from __future__ import annotations

import difflib
from typing import Any

from resnet_jax.errors import UserError


def _is_dict(x: Any) -> bool:
  return hasattr(x, 'items') and hasattr(x, 'keys')


def field_paths(config: Any, prefix: str = '') -> list[str]:
  """Dotted paths of every field and sub-config, e.g. ['seed', 'model', 'model.name', ...]."""
  out = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    out.append(path)
    if _is_dict(value):
      out += field_paths(value, f'{path}.')
  return out


def closest_field(path: str, known: list[str]) -> str | None:
  """The known field most like `path`: a sibling first, then any field."""
  parent = path.rpartition('.')[0]
  siblings = [k for k in known if k.rpartition('.')[0] == parent]
  leaf = path.rpartition('.')[2]
  match = difflib.get_close_matches(leaf, [s.rpartition('.')[2] for s in siblings], n=1, cutoff=0.6)
  if match:
    return f'{parent}.{match[0]}' if parent else match[0]
  match = difflib.get_close_matches(path, known, n=1, cutoff=0.75)
  if match:
    return match[0]
  anywhere = [k for k in known if k.rpartition('.')[2] == leaf]
  return anywhere[0] if anywhere else None


def describe_unknown(path: str, known: list[str]) -> str:
  near = closest_field(path, known)
  hint = f' (did you mean config.{near}?)' if near else ''
  return f'config.{path}: unknown field{hint}'


def check_known_fields(config: Any, reference: Any) -> None:
  """Raises a UserError naming every field of `config` that `reference` does not have."""
  known = field_paths(reference)
  known_set = set(known)
  unknown = [p for p in field_paths(config) if p not in known_set]
  # Name the outermost unknown path only ('foo', not also 'foo.bar').
  unknown = [p for p in unknown if not any(p.startswith(f'{q}.') for q in unknown)]
  if unknown:
    raise UserError('; '.join(describe_unknown(p, known) for p in unknown))
