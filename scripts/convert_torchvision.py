"""Converts a torchvision-layout ResNet state dict into an Orbax checkpoint of this project.

  python scripts/convert_torchvision.py --arch=resnet50 --input=resnet50.pth --output=/ckpt/r50
  python scripts/convert_torchvision.py --arch=resnet18 --input=torchvision:resnet18 --output=...

The output is a workdir-like folder (`<output>/checkpoints/0/`) that works as
`--config.finetune.init_from=<output>`. Every name and shape must match the
model exactly; the number of classes is read from the weights' `fc` layer.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string('arch', 'resnet50', 'Architecture name, e.g. resnet18 or resnet50.')
flags.DEFINE_string('input', None, 'A .pth/.pt/.safetensors file, or torchvision:<arch>.')
flags.DEFINE_string('output', None, 'Output folder (a workdir-like checkpoint root).')
flags.DEFINE_string('stem', '', "Stem override ('imagenet' or 'cifar'); default: the arch's.")
flags.DEFINE_string('cache_dir', '~/.cache/resnet_jax', 'Download cache for torchvision:<arch>.')
FLAGS = flags.FLAGS


def convert(arch: str, source: str, output: str, stem: str = '',
            cache_dir: str = '~/.cache/resnet_jax') -> dict:
  """Writes the checkpoint and returns a small summary."""
  import jax
  import ml_collections
  import numpy as np

  from resnet_jax import checkpointing, models, pretrained
  from resnet_jax.errors import UserError

  loaded = pretrained.load_pretrained(source, cache_dir)
  if 'kernel' not in loaded['params'].get('head', {}):
    raise UserError(f'{source}: no fc/linear layer, cannot tell the number of classes')
  num_classes = int(np.shape(loaded['params']['head']['kernel'])[1])
  model = models.create_model(ml_collections.ConfigDict({'name': arch, 'stem': stem}),
                              num_classes)
  # Shapes only: every leaf must come from the file, so nothing is initialised or compiled.
  fresh = jax.eval_shape(lambda r: models.init_variables(model, r, 64), jax.random.key(0))
  report = checkpointing.compare_trees(loaded, fresh, dont_load='')
  report.unexpected += [f'torch:{n}' for n in loaded.get('unexpected', [])]
  if report.errors():
    raise UserError(f'{source} does not fit {arch}: {report.summary()}: '
                    + '; '.join(report.errors()[:5]))
  merged = checkpointing.merge_loaded(loaded, fresh, report)
  if os.path.exists(checkpointing.checkpoint_dir(output)):
    raise UserError(f'--output: {output} already holds checkpoints; choose a new folder')
  ckpt = checkpointing.Checkpointer(output, keep=1)
  state = {'step': np.int32(0), 'params': merged['params'],
           'batch_stats': merged['batch_stats'], 'opt_state': {}}
  ckpt.save(0, state, {'class_names': [], 'num_classes': num_classes, 'source': source,
                       'arch': arch})
  ckpt.close()
  return {'arch': arch, 'num_classes': num_classes, 'tensors': len(report.matched),
          'params': models.param_count(merged['params']), 'output': os.path.abspath(output)}


def main(argv):
  del argv
  from resnet_jax import console
  from resnet_jax.errors import UserError
  console.quiet_libraries()  # No Orbax INFO.
  if not FLAGS.input or not FLAGS.output:
    print('error: --input and --output are required', file=sys.stderr)
    sys.exit(2)
  try:
    summary = convert(FLAGS.arch, FLAGS.input, FLAGS.output, FLAGS.stem, FLAGS.cache_dir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(summary)


if __name__ == '__main__':
  app.run(main)
