"""Export a trained workdir for serving: jax.export, a TF SavedModel, labels and a model card.

Every format wraps one function, `classifier_fn`: uint8 RGB images
[batch, S, S, 3] at the trained size -> float32 class probabilities
[batch, C]. Normalisation (the config's dataset mean/std) and the eval-mode
forward pass (BatchNorm on its running averages) are inside; the parameters
are baked in as constants, so an export needs neither this code base nor the
checkpoint. The batch dimension is symbolic.

Layout of an export directory:

  model.jaxexport   serialized jax.export.Exported (StableHLO), CPU/CUDA/TPU
  saved_model/1/    TensorFlow SavedModel, signature `serving_default`
                    (images uint8 -> probabilities float32), for TF Serving
  labels.json       class names, index = class id
  model_card.json   architecture, data, preprocessing, eval, source, versions
  MODEL_CARD.md     the same for people

TensorFlow is imported only to write the SavedModel.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
from typing import Any, Callable

from resnet_jax.errors import UserError
from resnet_jax.exported import CARD_JSON, JAX_EXPORT_FILE, LABELS_FILE

FORMAT_VERSION = 1
SAVED_MODEL_DIR = os.path.join('saved_model', '1')  # TF Serving wants <base>/<version>/.
CARD_MD = 'MODEL_CARD.md'
# jax.export lowers for devices it does not have; the tests run the cpu lowering.
PLATFORMS = ('cpu', 'cuda', 'tpu')
SIGNATURE_INPUT = 'images'
SIGNATURE_OUTPUT = 'probabilities'

ONNX_NOT_WRITTEN = (
    'not written: jax2onnx 0.17.1 (the current release) requires orbax-checkpoint<0.11.37, which '
    'would downgrade the pinned orbax-checkpoint 0.12.8, so no converter is installed; tried in a '
    'scratch environment (--no-deps), it converts this ResNet but onnxruntime 1.32.0 refuses the '
    'graph (ShapeInferenceError: Incompatible dimensions at a residual Add, NCHW vs NHWC shapes)')


@dataclasses.dataclass
class Trained:
  """A workdir's model as it was evaluated: config, variables and class names."""
  workdir: str
  config: Any            # ml_collections.ConfigDict, from <workdir>/config.json
  step: int
  which: str             # 'best' or 'latest'
  variables: dict[str, Any]
  class_names: list[str]
  meta: dict[str, Any]


def load_trained(workdir: str, which: str = 'best') -> Trained:
  """Reads <workdir>/config.json and the best or newest readable checkpoint.

  The one place this module reads a workdir's config and checkpoint, so it can
  follow the project's loader if that changes.
  """
  if which not in ('best', 'latest'):
    raise UserError(f'--checkpoint: choose best or latest, got {which!r}')
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir: {workdir} is not a directory')
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise UserError(f'--workdir: {workdir} has no config.json (not a resnet_jax workdir?)')
  from resnet_jax import resume, saved_config  # After the cheap checks: JAX, Orbax.
  config = saved_config.load(workdir)
  step, variables, meta = resume.restore_variables(
      config, workdir, which, None, None, '--workdir',
      'export with the config it was trained with')
  class_names = [str(c) for c in meta.get('class_names') or []]
  if not class_names:
    raise UserError(f'--workdir: checkpoint {step} in {workdir} names no classes '
                    '(a converted pretrained checkpoint, not a trained classifier?)')
  return Trained(workdir, config, int(step), which, variables, class_names, dict(meta))


def classifier_fn(trained: Trained) -> Callable[[Any], Any]:
  """uint8 [b, S, S, 3] -> float32 probabilities [b, C], as evaluation computes them.

  The normalisation repeats input_pipeline.make_preprocess in float32:
  (x - 255 * mean) / (255 * std).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from resnet_jax import models

  model = models.create_model(trained.config.model, len(trained.class_names))
  variables = jax.tree.map(np.asarray, trained.variables)
  mean = np.asarray(trained.config.dataset.mean, np.float32) * np.float32(255.0)
  std = np.asarray(trained.config.dataset.std, np.float32) * np.float32(255.0)

  def fn(images):
    x = (images.astype(jnp.float32) - mean) / std
    logits = model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return fn


def image_size(trained: Trained) -> int:
  return int(trained.config.dataset.image_size)


def export_jax(fn: Callable[[Any], Any], size: int,
               platforms: tuple[str, ...] = PLATFORMS) -> Any:
  """jax.export with a symbolic batch dimension; returns the Exported."""
  import jax
  import jax.numpy as jnp

  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'b, {size}, {size}, 3'), jnp.uint8)
  return jax.export.export(jax.jit(fn), platforms=platforms)(spec)


def write_saved_model(fn: Callable[[Any], Any], size: int, directory: str,
                      platforms: tuple[str, ...] = PLATFORMS) -> None:
  """jax2tf (native serialization, polymorphic batch) under a `serving_default` signature."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  converted = jax2tf.convert(fn, polymorphic_shapes=[f'(b, {size}, {size}, 3)'],
                             native_serialization_platforms=platforms, with_gradient=False)
  module = tf.Module()
  module.serve = tf.function(
      lambda images: {SIGNATURE_OUTPUT: converted(images)},
      input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=SIGNATURE_INPUT)],
      autograph=False)
  tf.saved_model.save(module, directory, signatures={'serving_default': module.serve})


# --------------------------------------------------------------------------- model card


def _evaluation(trained: Trained) -> dict[str, Any] | None:
  """The eval metrics of exactly the exported step, from eval_results.json or the checkpoint."""
  split = str(trained.config.dataset.get('eval_split', ''))
  path = os.path.join(trained.workdir, 'eval_results.json')
  if os.path.isfile(path):
    try:
      with open(path) as f:
        results = json.load(f)
    except (OSError, ValueError):
      results = {}
    if results.get('step') == trained.step:
      keys = ('accuracy', 'top5_accuracy', 'loss', 'num_examples')
      return {'split': split, 'step': trained.step, 'source': 'eval_results.json',
              **{k: results[k] for k in keys if k in results}}
  brief = trained.meta.get('eval') or {}
  if brief.get('step') == trained.step:
    return {'split': split, 'step': trained.step, 'source': 'checkpoint meta',
            **{k: v for k, v in brief.items() if k != 'step'}}
  return None


def _versions(with_tf: bool) -> dict[str, str]:
  import flax
  import jax
  import jaxlib
  import numpy as np
  versions = {'python': platform.python_version(), 'jax': jax.__version__,
              'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'numpy': np.__version__}
  if with_tf:
    import tensorflow as tf
    versions['tensorflow'] = tf.__version__
  return versions


def model_card(trained: Trained, formats: dict[str, Any]) -> dict[str, Any]:
  """Everything a deployer needs to know about the export, as JSON."""
  from resnet_jax import models
  cfg, ds = trained.config, trained.config.dataset
  size = image_size(trained)
  resize_size = int(ds.get('resize_size', 0) or 0)
  crop = resize_size > size and bool(ds.get('eval_crop', True))
  arch = models.ARCHS.get(cfg.model.name)
  return {
      'format_version': FORMAT_VERSION,
      'architecture': {
          'name': cfg.model.name,
          'stem': cfg.model.get('stem', '') or (arch.default_stem if arch else ''),
          'width_multiplier': float(cfg.model.get('width_multiplier', 1.0)),
          'dtype': cfg.model.get('dtype', 'float32'),
          'num_params': models.param_count(trained.variables['params']),
      },
      'dataset': {'name': ds.name, 'data_dir': ds.get('data_dir', ''),
                  'train_split': ds.get('train_split', ''), 'eval_split': ds.get('eval_split', ''),
                  'num_classes': len(trained.class_names)},
      'classes': trained.class_names,
      'input': {'name': SIGNATURE_INPUT, 'dtype': 'uint8', 'shape': ['batch', size, size, 3],
                'channels': 'RGB', 'range': [0, 255]},
      'output': {'name': SIGNATURE_OUTPUT, 'dtype': 'float32',
                 'shape': ['batch', len(trained.class_names)], 'meaning': 'softmax probabilities'},
      'preprocessing': {
          'decode': 'tf.io.decode_image(channels=3): grayscale becomes RGB',
          'image_size': size, 'resize_size': resize_size, 'centre_crop': crop,
          'resize': (f'bilinear, antialiased: shorter side to {resize_size}, centre crop '
                     f'{size}x{size}' if crop else f'bilinear, antialiased, to {size}x{size}'),
          'to_uint8': 'round, clip to 0..255 (exact for images already at the size)',
          'inside_the_model': {'mean': [float(m) for m in ds.mean],
                               'std': [float(s) for s in ds.std],
                               'formula': '(x - 255 * mean) / (255 * std)'},
      },
      'evaluation': _evaluation(trained),
      'source': {'workdir': trained.workdir, 'checkpoint': trained.which, 'step': trained.step},
      'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'versions': _versions('saved_model' in formats),
      'formats': formats,
  }


def card_markdown(card: dict[str, Any]) -> str:
  """A short human-readable model card."""
  a, d, p, ev = card['architecture'], card['dataset'], card['preprocessing'], card['evaluation']
  if ev:
    # With five classes or fewer top-5 is 1.0 by definition: not worth a word.
    top5 = (f", top-5 {ev['top5_accuracy']:.4f}"
            if 'top5_accuracy' in ev and len(card['classes']) > 5 else '')
    evaluation = (f"accuracy {ev['accuracy']:.4f}{top5} on `{ev['split']}` "
                  f"({ev.get('num_examples', '?')} images) at step {ev['step']}")
  else:
    evaluation = 'this checkpoint was not evaluated'
  classes = ', '.join(card['classes'][:20]) + (' ...' if len(card['classes']) > 20 else '')
  formats = '\n'.join(f"* {name}: " + (f"`{f['path']}`" if f.get('path') else f['reason'])
                      for name, f in card['formats'].items())
  versions = ', '.join(f'{k} {v}' for k, v in card['versions'].items())
  return f"""# Model card: {a['name']} on {d['name']}

* Architecture: {a['name']} ({a['stem']} stem, width x{a['width_multiplier']}, {a['dtype']}), \
{a['num_params']:,} parameters
* Dataset: {d['name']} {d['data_dir']}, trained on `{d['train_split']}`
* Classes ({d['num_classes']}): {classes}
* Evaluation: {evaluation}
* Source: checkpoint step {card['source']['step']} ({card['source']['checkpoint']}) of \
`{card['source']['workdir']}`
* Exported: {card['exported_at']} with {versions}

## Input and output

`{card['input']['name']}`: uint8 RGB, shape [batch, {p['image_size']}, {p['image_size']}, 3], \
values 0..255. `{card['output']['name']}`: float32 [batch, {d['num_classes']}], softmax \
probabilities in the order of `labels.json`.

Preprocessing before the model: decode to RGB, resize ({p['resize']}), round to uint8.
Inside the model: `{p['inside_the_model']['formula']}` with mean {p['inside_the_model']['mean']} \
and std {p['inside_the_model']['std']}, then the network in eval mode (BatchNorm on its running \
averages).

## Files

{formats}
"""


# --------------------------------------------------------------------------- the command


def check_output(output: str, overwrite: bool) -> str:
  """The output folder must be new, empty, or replaced on purpose."""
  if not output:
    raise UserError('--output is required')
  output = os.path.abspath(output)
  if os.path.exists(output) and not os.path.isdir(output):
    raise UserError(f'--output: {output} exists and is not a directory')
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise UserError(f'--output: {output} exists and is not empty (pass --overwrite to replace it)')
  parent = os.path.dirname(output)
  if os.path.exists(parent) and not os.access(parent, os.W_OK):
    raise UserError(f'--output: cannot write into {parent}')
  return output


def export_model(workdir: str, output: str, which: str = 'best', overwrite: bool = False,
                 saved_model: bool = True) -> dict[str, Any]:
  """Writes the export directory; returns its model card.

  Everything is written into a fresh sibling folder first and moved into place
  at the end, so a failure leaves `output` as it was.
  """
  output = check_output(output, overwrite)
  trained = load_trained(workdir, which)
  size = image_size(trained)
  fn = classifier_fn(trained)
  exported = export_jax(fn, size)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.export-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from servers.
  try:
    with open(os.path.join(staging, JAX_EXPORT_FILE), 'wb') as f:
      f.write(exported.serialize())
    formats: dict[str, Any] = {
        'jax_export': {'path': JAX_EXPORT_FILE, 'platforms': list(exported.platforms),
                       'batch': 'symbolic',
                       'calling_convention_version': exported.calling_convention_version}}
    if saved_model:
      write_saved_model(fn, size, os.path.join(staging, SAVED_MODEL_DIR))
      formats['saved_model'] = {'path': SAVED_MODEL_DIR, 'signature': 'serving_default',
                                'input': SIGNATURE_INPUT, 'output': SIGNATURE_OUTPUT}
    formats['onnx'] = {'path': None, 'reason': ONNX_NOT_WRITTEN}
    card = model_card(trained, formats)
    with open(os.path.join(staging, LABELS_FILE), 'w') as f:
      json.dump(trained.class_names, f, indent=2)
    with open(os.path.join(staging, CARD_JSON), 'w') as f:
      json.dump(card, f, indent=2)
    with open(os.path.join(staging, CARD_MD), 'w') as f:
      f.write(card_markdown(card))
    if os.path.isdir(output):
      shutil.rmtree(output)  # Empty, or --overwrite.
    os.replace(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logging.info('Exported step %d of %s to %s', trained.step, trained.workdir, output)
  return card


__all__ = ['Trained', 'load_trained', 'classifier_fn', 'export_jax', 'write_saved_model',
           'model_card', 'card_markdown', 'check_output', 'export_model']
