"""Exports a trained workdir for serving, from its config.json and a checkpoint.

  python scripts/export.py --workdir=/tmp/run --output=/tmp/export [--checkpoint=best|latest]

Writes a jax.export artefact (StableHLO, CPU/CUDA/TPU, any batch size), a
TensorFlow SavedModel for TF Serving (`saved_model/1`, signature
`serving_default`), labels.json and a model card (model_card.json and
MODEL_CARD.md). The exported function takes uint8 RGB images at the trained
size and returns class probabilities. No ONNX: see the model card for why.
Bad input is one line `error: ...` and exit code 2, with nothing written.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string('workdir', None, 'A workdir written by resnet_jax.main.')
flags.DEFINE_string('output', None, 'The export directory to write (new or empty).')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to export.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing, non-empty --output.')
flags.DEFINE_bool('saved_model', True, 'Also write the TensorFlow SavedModel.')
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad flag is one line, not a usage dump."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else 'bad command-line flags')
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.workdir:
    fail('--workdir is required')
  logging.set_verbosity(logging.WARNING)  # Orbax narrates every restore at INFO.
  from resnet_jax import export  # After the flags: JAX takes a while to import.
  from resnet_jax.errors import UserError
  try:
    export.check_output(FLAGS.output, FLAGS.overwrite)  # Before the slow part.
    card = export.export_model(FLAGS.workdir, FLAGS.output, FLAGS.checkpoint, FLAGS.overwrite,
                               saved_model=FLAGS.saved_model)
  except UserError as e:
    fail(str(e))
  ev = card['evaluation']
  accuracy = f"accuracy {ev['accuracy']:.4f} on {ev['split']}" if ev else 'not evaluated'
  print(f"Exported {card['architecture']['name']} (step {card['source']['step']}, {accuracy}) "
        f"to {os.path.abspath(FLAGS.output)}: "
        + ', '.join(f['path'] for f in card['formats'].values() if f.get('path')), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
