"""A workdir's `config.json` as a config file, so `--config.x=y` overrides apply to it.

`--mode=eval` and `scripts/predict.py` without `--config` evaluate with the
config the workdir was trained with: `with_saved_config` adds
`--config=<this file>:<workdir>` to the command line, and ml_collections loads
this file and calls `get_config(<workdir>)`. Overrides then parse against the
saved values' types, exactly as they would against a config file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples: configs hold tuples, which the CLI can override."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _fill_missing(saved: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
  """`saved` plus the reference's fields it lacks (added since the workdir was written).

  So `--config.adversarial.eval_steps=20` can score a checkpoint trained before
  that field existed; the values the workdir has are never replaced.
  """
  out = dict(saved)
  for key, value in reference.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _fill_missing(out[key], value)
  return out


def load(workdir: str) -> ml_collections.ConfigDict:
  from configs import default  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = _tuples(json.load(f))
  return ml_collections.ConfigDict(_fill_missing(saved, default.get_config().to_dict()))


def get_config(workdir: str) -> ml_collections.ConfigDict:
  return load(workdir)


def _flag_value(argv: list[str], name: str) -> str | None:
  """The last value of --name=V or --name V in argv (absl's rule: the last one wins)."""
  value = None
  for i, arg in enumerate(argv):
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
    elif re.match(rf'^--?{name}=', arg):
      value = arg.split('=', 1)[1]
  return value


def with_saved_config(argv: list[str], always: bool = False) -> list[str]:
  """argv plus --config=<workdir's config.json>, when --config is not given.

  Only for `--mode=eval` (or `always`, for scripts that only read a workdir),
  and only when the workdir holds a config.json; otherwise argv is unchanged.
  """
  if any(re.match(r'^--?config(=|$)', a) for a in argv[1:]):
    return argv
  if not always and _flag_value(argv[1:], 'mode') != 'eval':
    return argv
  workdir = _flag_value(argv[1:], 'workdir')
  if not workdir or not os.path.isfile(os.path.join(workdir, 'config.json')):
    return argv
  return argv[:1] + [f'--config={os.path.abspath(__file__)}:{os.path.abspath(workdir)}'] + argv[1:]
