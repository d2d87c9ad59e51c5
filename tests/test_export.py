"""scripts/export.py and resnet_jax.export/exported: every format computes the in-process
model, the model card tells the truth, prediction from the export matches the checkpoint's."""

import json
import logging
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import checkpointing, export, exported, models, train
from tests.conftest import (CLASSES, REPO, digest, import_script, subprocess_env, tiny_config,
                            write_image_folder)

BATCH_SIZES = (1, 7, 64)


@pytest.fixture(scope='session')
def exported_model(tmp_path_factory):
  """A tiny model trained on a generated folder, and its export (all formats)."""
  base = tmp_path_factory.mktemp('export')
  images = write_image_folder(str(base / 'images'))
  workdir = str(base / 'wd')
  config = tiny_config(**{'dataset.name': 'image_folder', 'dataset.data_dir': images,
                          'dataset.eval_split': 'test', 'num_train_steps': 2,
                          'checkpoint_every_steps': 1})
  train.train_and_evaluate(config, workdir)
  out = str(base / 'export')
  card = export.export_model(workdir, out)
  return types.SimpleNamespace(images=images, workdir=workdir, out=out, card=card,
                               config=config, reference=_reference(workdir, config))


def _reference(workdir, config):
  """The in-process model on uint8 images, written independently of export.classifier_fn."""
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  step, state, meta = ckpt.restore_newest_valid(which='best')
  model = models.create_model(config.model, len(meta['class_names']))
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  mean = jnp.asarray(config.dataset.mean, jnp.float32) * 255.0
  std = jnp.asarray(config.dataset.std, jnp.float32) * 255.0
  apply = jax.jit(lambda x: jax.nn.softmax(
      model.apply(variables, (x.astype(jnp.float32) - mean) / std, train=False)))
  return lambda x: np.asarray(apply(x))


def random_images(n, size=8, seed=0):
  return np.random.default_rng(seed + n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize('batch', BATCH_SIZES)
def test_jax_export_equals_the_in_process_model(exported_model, batch):
  classifier = exported.load(exported_model.out)
  x = random_images(batch)
  np.testing.assert_allclose(classifier(x), exported_model.reference(x), atol=1e-5, rtol=0)
  assert not isinstance(classifier.exported.in_avals[0].shape[0], int)  # Symbolic batch.
  assert {'cpu', 'cuda'} <= set(classifier.exported.platforms)


@pytest.fixture(scope='session')
def saved_model_fn(exported_model):
  import tensorflow as tf
  loaded = tf.saved_model.load(os.path.join(exported_model.out, export.SAVED_MODEL_DIR))
  return loaded, loaded.signatures['serving_default']


@pytest.mark.parametrize('batch', BATCH_SIZES)
def test_saved_model_equals_the_in_process_model(exported_model, saved_model_fn, batch):
  import tensorflow as tf
  _, serve = saved_model_fn
  x = random_images(batch)
  probs = serve(images=tf.constant(x))['probabilities'].numpy()
  np.testing.assert_allclose(probs, exported_model.reference(x), atol=1e-5, rtol=0)
  assert serve.structured_input_signature[1]['images'].shape.as_list() == [None, 8, 8, 3]


def test_labels_and_model_card_describe_the_checkpoint(exported_model):
  out, card = exported_model.out, exported_model.card
  assert json.load(open(os.path.join(out, 'labels.json'))) == list(CLASSES)
  assert json.load(open(os.path.join(out, 'model_card.json'))) == card
  results = json.load(open(os.path.join(exported_model.workdir, 'eval_results.json')))
  assert card['source'] == {'workdir': exported_model.workdir, 'checkpoint': 'best', 'step': 2}
  assert card['evaluation']['step'] == results['step'] == 2
  assert card['evaluation']['accuracy'] == results['accuracy']
  assert card['evaluation']['split'] == 'test'
  assert card['evaluation']['num_examples'] == 15
  assert card['architecture']['name'] == 'resnet20'
  assert card['architecture']['width_multiplier'] == 0.25
  assert card['classes'] == list(CLASSES)
  assert card['dataset']['data_dir'] == exported_model.images
  pre = card['preprocessing']
  assert pre['image_size'] == 8 and not pre['centre_crop']
  assert pre['inside_the_model']['mean'] == list(exported_model.config.dataset.mean)
  for lib in ('jax', 'jaxlib', 'flax', 'tensorflow', 'numpy'):
    assert card['versions'][lib]
  assert card['formats']['onnx']['path'] is None
  assert 'orbax-checkpoint' in card['formats']['onnx']['reason']
  assert re.match(r'\d{4}-\d\d-\d\dT', card['exported_at'])
  md = open(os.path.join(out, 'MODEL_CARD.md')).read()
  assert f"accuracy {results['accuracy']:.4f} on `test` (15 images) at step 2" in md
  assert 'cat, dog, frog' in md


def test_model_card_without_an_evaluation_of_that_step(exported_model):
  trained = export.load_trained(exported_model.workdir, 'latest')
  trained.step = 1  # Checkpoint 1 exists but was never evaluated.
  card = export.model_card(trained, {})
  assert card['evaluation'] is None
  assert 'this checkpoint was not evaluated' in export.card_markdown(card)


def _predict_module():
  return import_script('predict')


def test_predict_from_the_export_gives_the_checkpoint_top_k(exported_model, tmp_path, caplog):
  predict = _predict_module()
  same_size = write_image_folder(str(tmp_path / 'same'), splits=(('x', 4),), size=8, seed=3)
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'nope')
  paths = [same_size, os.path.join(exported_model.images, 'test'), str(bad)]
  from_ckpt = predict.predict(exported_model.workdir, paths, top_k=3)
  with caplog.at_level(logging.WARNING):
    from_export = predict.predict_exported(exported_model.out, paths, top_k=3)
  assert any('broken.jpg' in r.getMessage() for r in caplog.records)
  assert [p for p, _ in from_export] == [p for p, _ in from_ckpt] and len(from_ckpt) == 27
  for (path, ckpt_top), (_, export_top) in zip(from_ckpt, from_export):
    if path.startswith(same_size):  # Trained size: the very same pixels reach the model.
      assert [n for n, _ in export_top] == [n for n, _ in ckpt_top], path
      np.testing.assert_allclose([p for _, p in export_top], [p for _, p in ckpt_top],
                                 atol=1e-5)
    else:  # Resized 12px -> 8px: the export's input is rounded to uint8 (near ties may swap).
      ckpt_probs = dict(ckpt_top)
      np.testing.assert_allclose([p for _, p in export_top],
                                 [ckpt_probs[n] for n, _ in export_top], atol=1e-2)


@pytest.mark.parametrize('size,resize_size', [(8, 0), (8, 10), (12, 0)])
def test_export_decoding_is_the_eval_preprocessing(tmp_path, size, resize_size):
  """exported.decode_image equals input_pipeline's eval preprocessing up to uint8 rounding."""
  import tensorflow as tf

  from resnet_jax import input_pipeline
  config = tiny_config(**{'dataset.image_size': size, 'dataset.resize_size': resize_size})
  preprocess = input_pipeline.make_preprocess(config.dataset, train=False)
  mean = np.float32(config.dataset.mean) * 255
  std = np.float32(config.dataset.std) * 255
  folder = write_image_folder(str(tmp_path), splits=(('x', 3),), size=12, seed=1)
  for root, _, files in os.walk(folder):
    for f in files:
      data = open(os.path.join(root, f), 'rb').read()
      want = preprocess(tf.io.decode_image(data, channels=3, expand_animations=False),
                        tf.zeros([2], tf.int64)).numpy()
      got = (exported.decode_image(data, size, resize_size, resize_size > size) - mean) / std
      tolerance = 1e-6 if size == 12 else 0.5 / std.min() + 1e-6  # 12px: nothing to round.
      np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)


def test_decode_refuses_what_is_not_an_image():
  with pytest.raises(exported.ImageError, match='not a'):
    exported.decode_image(b'GIF89a but not really', 8)
  with pytest.raises(exported.ImageError, match='empty'):
    exported.decode_image(b'', 8)
  for side in (7000, 50000):  # Ours, and PIL's decompression-bomb limit.
    with pytest.raises(exported.ImageError, match='over the limit') as e:
      exported.decode_image(_png_with_size(side, side), 8)
    assert e.value.too_large


def _png_with_size(width, height):
  """A PNG whose header claims width x height (the pixel data is never reached)."""
  import struct
  import zlib
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data +
                              struct.pack('>I', zlib.crc32(kind + data)))
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b'')


def _readme_snippets():
  text = open(os.path.join(REPO, 'README.md')).read()
  deploying = text.split('## Deploying', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```python\n(.*?)```', deploying, re.S)


def test_readme_snippets_need_only_jax_or_only_tensorflow(exported_model, tmp_path):
  jax_snippet, tf_snippet = _readme_snippets()
  assert len(jax_snippet.strip().splitlines()) <= 10 and 'tensorflow' not in jax_snippet
  assert len(tf_snippet.strip().splitlines()) <= 10 and 'jax' not in tf_snippet
  # At the trained size both snippets feed the model exactly what predict.py does.
  image = str(tmp_path / 'dog.png')
  Image.fromarray(random_images(1, seed=5)[0]).save(image)
  classifier = exported.load(exported_model.out)
  want = classifier(classifier.decode_image(open(image, 'rb').read())[None])[0]
  best = exported.top_k(want, classifier.class_names, 1)[0][0]
  for snippet, blocked in ((jax_snippet, 'tensorflow'), (tf_snippet, 'jax')):
    # The other library and this code base cannot be imported: `import` of them fails.
    code = (f'import sys\nsys.modules["{blocked}"] = sys.modules["resnet_jax"] = None\n' +
            snippet.replace("'/tmp/export'", repr(exported_model.out))
            .replace("'cat.jpg'", repr(image)))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300, cwd=str(exported_model.out),
                          env=dict(os.environ, XLA_FLAGS='', PYTHONPATH=''))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[0] == best and len(lines) == min(5, len(CLASSES)), proc.stdout


# --------------------------------------------------------------------------- the command line


def run_export(*args):
  return subprocess.run([sys.executable, 'scripts/export.py', *args], cwd=REPO,
                        env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)



def test_export_cli_bad_input_is_one_line_and_writes_nothing(exported_model, tmp_path):
  from tests.test_main import assert_one_line_error
  occupied = tmp_path / 'occupied'
  occupied.mkdir()
  (occupied / 'keep.txt').write_text('keep me')
  no_ckpt = tmp_path / 'no_ckpt'
  no_ckpt.mkdir()
  (no_ckpt / 'config.json').write_text('{}')
  wd = exported_model.workdir
  cases = [
      ((f'--output={tmp_path}/a',), ('--workdir', 'required')),
      ((f'--workdir={tmp_path}/nope', f'--output={tmp_path}/a'), ('--workdir', 'nope')),
      ((f'--workdir={tmp_path}', f'--output={tmp_path}/a'), ('--workdir', 'config.json')),
      ((f'--workdir={no_ckpt}', f'--output={tmp_path}/a'), ('--workdir', 'no checkpoint')),
      ((f'--workdir={wd}', f'--output={occupied}'), ('--output', 'not empty', '--overwrite')),
      ((f'--workdir={no_ckpt}', f'--output={occupied}', '--overwrite'), ('no checkpoint',)),
      ((f'--workdir={wd}', f'--output={occupied}/keep.txt'), ('--output', 'not a directory')),
      ((f'--workdir={wd}', '--checkpoint=first', f'--output={tmp_path}/a'), ('checkpoint',)),
  ]
  before = digest(tmp_path)
  for args, fragments in cases:
    assert_one_line_error(run_export(*args), *fragments)
  assert digest(tmp_path) == before and not os.path.exists(tmp_path / 'a')


def test_export_cli_overwrites_with_the_latest_checkpoint(exported_model, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'old.txt').write_text('replace me')
  proc = run_export(f'--workdir={exported_model.workdir}', f'--output={out}',
                    '--checkpoint=latest', '--overwrite', '--nosaved_model')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Exported resnet20 (step 2' in proc.stdout
  assert sorted(os.listdir(out)) == ['MODEL_CARD.md', 'labels.json', 'model.jaxexport',
                                     'model_card.json']
  card = json.load(open(out / 'model_card.json'))
  assert card['source']['checkpoint'] == 'latest' and 'saved_model' not in card['formats']
  x = random_images(7)
  np.testing.assert_allclose(exported.load(str(out))(x), exported_model.reference(x),
                             atol=1e-5, rtol=0)
  assert [f for f in os.listdir(tmp_path) if f.startswith('.export-')] == []
