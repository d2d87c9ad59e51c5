"""Fine-tuning: pretrained loading, frozen parts that stay bit-identical, torchvision weights."""

import os
import urllib.error

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax import checkpointing, conv_lowering, models, optim, pretrained, train
from resnet_jax.errors import UserError
from tests.conftest import tiny_config, write_image_folder


def _fresh(name='resnet20', classes=10, size=8, **kw):
  m = models.create_model(ml_collections.ConfigDict(dict(name=name, **kw)), classes)
  return m, jax.device_get(jax.jit(lambda r: models.init_variables(m, r, size))(jax.random.key(1)))


def _shapes(name='resnet20', classes=10, size=8, **kw):
  """_fresh's variables as shapes, without compiling: enough to compare trees by shape."""
  m = models.create_model(ml_collections.ConfigDict(dict(name=name, **kw)), classes)
  return jax.eval_shape(lambda r: models.init_variables(m, r, size), jax.random.key(1))


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize('arch,size,stem', [('resnet18', 64, 'imagenet'),
                                            ('resnet50', 64, 'imagenet'),
                                            ('resnet20', 32, 'cifar')])
@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_converted_weights_give_pytorch_logits(tmp_path, arch, size, stem, fmt):
  torch = pytest.importorskip('torch')
  from resnet_jax import torch_reference as tr
  layers = {'resnet18': ((2, 2, 2, 2), tr.BasicBlock, (64, 128, 256, 512)),
            'resnet50': ((3, 4, 6, 3), tr.Bottleneck, (64, 128, 256, 512)),
            'resnet20': ((3, 3, 3), tr.BasicBlock, (16, 32, 64))}[arch]
  torch.manual_seed(0)
  ref = tr.randomize_batchnorm(tr.ResNet(layers[1], layers[0], layers[2], 10, stem)).eval()
  path = str(tmp_path / f'weights.{fmt}')
  if fmt == 'pth':
    torch.save(ref.state_dict(), path)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  loaded = pretrained.load_pretrained(path, str(tmp_path))
  model = models.create_model(ml_collections.ConfigDict(dict(name=arch, stem=stem)), 10)
  # Shapes suffice: every leaf comes from the file.
  fresh = jax.eval_shape(lambda r: models.init_variables(model, r, size), jax.random.key(1))
  report = checkpointing.compare_trees(loaded, fresh, dont_load='')
  assert not report.errors() and not loaded['unexpected'], report.errors()
  variables = checkpointing.merge_loaded(loaded, fresh, report)
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_convert_script_output_works_as_init_from(tmp_path):
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file
  from scripts import convert_torchvision
  from resnet_jax import torch_reference as tr
  ref = tr.ResNet(tr.BasicBlock, (3, 3, 3), (16, 32, 64), 10, 'cifar')
  src = str(tmp_path / 'r20.safetensors')
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, src)
  out = str(tmp_path / 'converted')
  summary = convert_torchvision.convert('resnet20', src, out)
  assert summary['num_classes'] == 10 and summary['params'] == 272_474
  loaded = checkpointing.load_variables(out)
  np.testing.assert_array_equal(loaded['params']['stem']['conv']['kernel'],
                                ref.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded['batch_stats']['stage3']['block0']['proj_bn']['var'],
                                ref.layer3[0].downsample[1].running_var.numpy())
  with pytest.raises(UserError, match='already holds checkpoints'):
    convert_torchvision.convert('resnet20', src, out)
  with pytest.raises(UserError, match='does not fit resnet32'):
    convert_torchvision.convert('resnet32', src, str(tmp_path / 'other'))


def test_torchvision_download_offline_is_one_clear_error(tmp_path, monkeypatch):
  def offline(*a, **k):
    raise urllib.error.URLError('no network')
  monkeypatch.setattr(pretrained.urllib.request, 'urlopen', offline)
  with pytest.raises(UserError, match=r'place it at .*resnet18-f37072fd\.pth'):
    pretrained.fetch_torchvision('resnet18', str(tmp_path))
  assert os.listdir(tmp_path) == []  # No partial file left behind.
  placed = tmp_path / 'resnet18-f37072fd.pth'
  placed.write_bytes(b'x')
  assert pretrained.fetch_torchvision('resnet18', str(tmp_path)) == str(placed)
  with pytest.raises(UserError, match='no torchvision weights'):
    pretrained.fetch_torchvision('resnet20', str(tmp_path))


def test_torch_name_map():
  assert pretrained.torch_name_to_path('layer2.0.downsample.1.running_var') == \
      ('batch_stats', 'stage2/block0/proj_bn/var')
  assert pretrained.torch_name_to_path('layer4.1.conv2.weight') == \
      ('params', 'stage4/block1/conv2/kernel')
  assert pretrained.torch_name_to_path('bn1.weight') == ('params', 'stem/bn/scale')
  assert pretrained.torch_name_to_path('fc.bias') == ('params', 'head/bias')
  assert pretrained.torch_name_to_path('layer1.0.bn1.num_batches_tracked') is None


# --------------------------------------------------------------------------- loading rules


def test_mismatch_report_names_each_problem():
  r20, r20_3, r32 = _shapes('resnet20', 10), _shapes('resnet20', 3), _shapes('resnet32', 10)
  rep = checkpointing.compare_trees(r20, r20_3, dont_load='')
  assert sorted(rep.shape_mismatch) == ['params/head/bias: file (10,) vs model (3,)',
                                        'params/head/kernel: file (64, 10) vs model (64, 3)']
  assert not rep.missing and not rep.unexpected and len(rep.matched) > 100
  assert not checkpointing.compare_trees(r20, r20_3, dont_load='^head/').errors()
  rep = checkpointing.compare_trees(r20, r32, dont_load='^head/')
  assert 'params/stage1/block3/conv1/kernel' in rep.missing
  assert 'batch_stats/stage1/block3/bn1/mean' in rep.missing
  rep = checkpointing.compare_trees(r32, r20, dont_load='^head/')
  assert 'params/stage3/block4/conv2/kernel' in rep.unexpected and not rep.missing


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
  """(workdir, its variables) of a 3-step run on 3 classes, which the tests only read."""
  base = tmp_path_factory.mktemp('pretrain')
  c = tiny_config(**{'dataset.name': 'image_folder', 'dataset.eval_split': 'test',
                     'dataset.data_dir': write_image_folder(str(base / 'images')),
                     'num_train_steps': 3})
  train.train_and_evaluate(c, str(base / 'pre'))
  return str(base / 'pre'), checkpointing.load_variables(str(base / 'pre'))


def test_head_reset_and_strict_failures(pretrained_run, tmp_path):
  pre_dir, pre = pretrained_run   # 3 classes.
  _, fresh = _fresh('resnet20', 5, width_multiplier=0.25)
  c = tiny_config(**{'finetune.init_from': pre_dir, 'finetune.dont_load': '',
                     'finetune.reset_head': False})
  with pytest.raises(UserError, match='shape params/head/kernel'):
    pretrained.initial_variables(c, fresh)
  c.finetune.reset_head = True
  out = pretrained.initial_variables(c, fresh)
  assert out['params']['head']['kernel'].shape == (16, 5)
  np.testing.assert_array_equal(out['params']['head']['kernel'], fresh['params']['head']['kernel'])
  np.testing.assert_array_equal(out['params']['stage2']['block0']['conv1']['kernel'],
                                pre['params']['stage2']['block0']['conv1']['kernel'])
  np.testing.assert_array_equal(out['batch_stats']['stem']['bn']['mean'],
                                pre['batch_stats']['stem']['bn']['mean'])
  wide = _shapes('resnet20', 5, width_multiplier=0.5)
  with pytest.raises(UserError, match='shape-mismatched'):
    pretrained.initial_variables(c, wide)
  c.finetune.init_from = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='does not exist'):
    pretrained.initial_variables(c, fresh)


def test_frozen_parameters_and_batchnorm_statistics_stay_bit_identical(folder_config, tmp_path,
                                                                       pretrained_run):
  pre_dir, pre = pretrained_run
  ft_dir = str(tmp_path / 'ft')
  folder_config.dataset.classes = 'cat,dog'     # A new task with a new head.
  folder_config.finetune.init_from = pre_dir
  folder_config.finetune.freeze = '^(stem|stage1)/'
  folder_config.num_train_steps = 4
  train.train_and_evaluate(folder_config, ft_dir)
  ckpt = checkpointing.Checkpointer(ft_dir, read_only=True)
  state, _ = ckpt.restore(ckpt.steps()[-1])
  frozen_seen = moved = 0
  for coll in ('params', 'batch_stats'):
    before = optim.flat_paths(pre[coll])
    after = optim.flat_paths(state[coll])
    for path, value in after.items():
      if path.startswith('head/'):
        continue
      if path.startswith(('stem/', 'stage1/')):
        np.testing.assert_array_equal(value, before[path], err_msg=f'{coll}/{path} moved')
        frozen_seen += 1
      elif not np.array_equal(value, before[path]):
        moved += 1
  # stem: kernel, BN scale/bias, BN mean/var; stage1: 3 blocks x (2 kernels, 2 BNs x 4).
  assert frozen_seen == 5 + 3 * (2 + 2 * 4)
  assert moved > 20  # The trainable part (weights and BN statistics) did move.
  # Frozen leaves carry no optimizer state in the checkpoint.
  sizes = [x.size for x in jax.tree.leaves(state['opt_state']) if np.ndim(x) > 0]
  trainable = sum(v.size for p, v in optim.flat_paths(state['params']).items()
                  if not p.startswith(('stem/', 'stage1/')))
  assert sum(sizes) == trainable


def test_stop_gradient_removes_the_backward_pass_of_a_frozen_prefix(monkeypatch):
  # Every convolution as XLA's own (on CPU the 2x2 maps of 8px inputs would be matmuls).
  monkeypatch.setattr(conv_lowering, 'PATCHES_MAX_OUTPUT_PIXELS', 0)
  c_plain = tiny_config()
  c_frozen = tiny_config(**{'finetune.freeze': '^(stem|stage1|stage2)/'})

  def count_convs(c):
    setup = train.Setup(c, 10, 100, 8)
    state = setup.make_state(setup.fresh_variables)
    step = train.make_train_step(setup.model, setup.tx, setup.schedule, 10)
    batch = {'image': jnp.zeros((8, 8, 8, 3)), 'label': jnp.zeros((8,), jnp.int32)}
    return jax.jit(step).lower(state, batch).as_text().count('stablehlo.convolution')

  plain, frozen = count_convs(c_plain), count_convs(c_frozen)
  forward = 1 + 2 * 9 + 2        # stem + 2 per block + 2 projections = 21.
  stage3 = 2 * 3 + 1             # The only trainable convolutions when stem..stage2 freeze.
  # Plain: forward, weight grads, input grads (none for the image itself).
  assert plain == 3 * forward - 1
  # Frozen prefix: forward, then backward through stage3 only; its two convolutions that
  # read the stopped activation need no input gradient.
  assert frozen == forward + 2 * stage3 - 2
