"""Weight sources without torch: the safe .pth reader, timm: downloads, and check_source."""

import collections
import hashlib
import http.server
import io
import os
import pickle
import sys
import threading
import types
import urllib.error
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax import checkpointing, hub, models, pretrained, torch_pickle
from resnet_jax.errors import UserError
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- writing .pth without torch

# Stand-ins for torch's globals: pickled under these module names, then renamed in the bytes
# (protocol 2 writes globals as text lines), so tests can build any torch.save file, even
# malformed ones, on machines without torch.
_FAKE_TORCH = types.ModuleType('fake_torch')
_FAKE_UTILS = types.ModuleType('fake_torch_utils')
for _name in ('FloatStorage', 'HalfStorage', 'BFloat16Storage', 'LongStorage'):
  setattr(_FAKE_TORCH, _name, type(_name, (), {'__module__': 'fake_torch'}))


def _rebuild_tensor_v2(*args):
  raise AssertionError('only pickled, never called')


_rebuild_tensor_v2.__module__ = 'fake_torch_utils'
_FAKE_UTILS._rebuild_tensor_v2 = _rebuild_tensor_v2
_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
                  np.dtype(np.int64): 'LongStorage'}


class Strided:
  """A tensor record with explicit storage, offset, size and stride (and optional BUILD state)."""

  def __init__(self, flat, offset, size, stride, state=None):
    self.flat, self.offset, self.size, self.stride, self.state = flat, offset, size, stride, state


class _Pickler(pickle.Pickler):

  def __init__(self, f, storages):
    super().__init__(f, protocol=2)
    self.storages = storages

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ('storage', getattr(_FAKE_TORCH, _STORAGE_NAMES[obj.flat.dtype]), obj.key, 'cpu',
              obj.flat.size)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, np.ndarray):
      obj = obj.copy(order='C')  # (np.ascontiguousarray would make a 0-d array 1-d.)
      obj = Strided(obj.ravel(), 0, obj.shape, tuple(s // obj.itemsize for s in obj.strides))
    if not isinstance(obj, Strided):
      return NotImplemented
    key = str(len(self.storages))
    self.storages[key] = obj.flat.tobytes()
    args = (_StorageRef(key, obj.flat), obj.offset, tuple(obj.size), tuple(obj.stride),
            False, collections.OrderedDict())
    return (_rebuild_tensor_v2, args) + ((obj.state,) if obj.state is not None else ())


class _StorageRef:

  def __init__(self, key, flat):
    self.key, self.flat = key, flat


def write_pth(path, obj, monkeypatch):
  """torch.save's zip layout (`archive/data.pkl` + `archive/data/<key>`), written without torch."""
  monkeypatch.setitem(sys.modules, 'fake_torch', _FAKE_TORCH)
  monkeypatch.setitem(sys.modules, 'fake_torch_utils', _FAKE_UTILS)
  storages, buf = {}, io.BytesIO()
  _Pickler(buf, storages).dump(obj)
  data = buf.getvalue().replace(b'cfake_torch_utils\n', b'ctorch._utils\n')
  data = data.replace(b'cfake_torch\n', b'ctorch\n')
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', data)
    z.writestr('archive/byteorder', 'little')
    for key, raw in storages.items():
      z.writestr(f'archive/data/{key}', raw)
  return path


# --------------------------------------------------------------------------- the safe reader


class _RunsShell:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Evals:
  def __reduce__(self):
    return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_reader_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch, fmt):
  marker = tmp_path / 'pwned'
  payload = {'conv1.weight': np.ones((2, 2), np.float32),
             'fc.weight': _RunsShell(f'touch {marker}')}
  path = str(tmp_path / 'evil.pth')
  if fmt == 'zip':
    write_pth(path, payload, monkeypatch)
  else:  # A legacy stream: magic, protocol, sys info, then the object.
    with open(path, 'wb') as f:
      for head in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
        pickle.dump(head, f, protocol=2)
      pickle.dump({'fc.weight': _RunsShell(f'touch {marker}')}, f, protocol=2)
  # The payload is live: plain pickle runs the command (as torch.load without weights_only,
  # or pickle.load, would on a downloaded file).
  pickle.loads(pickle.dumps(_RunsShell(f'touch {marker}'), protocol=2))
  assert marker.exists()
  marker.unlink()
  with pytest.raises(UserError, match=r'refused to load: the file asks for (posix|os|nt)\.system'):
    torch_pickle.load(path)
  assert not marker.exists()
  with pytest.raises(UserError, match=r'config.finetune.init_from: .*asks for (posix|os|nt)\.system'):
    pretrained.read_state_dict(path)
  assert not marker.exists()


def test_reader_refuses_every_other_global(tmp_path, monkeypatch):
  path = write_pth(str(tmp_path / 'eval.pth'), {'x': _Evals()}, monkeypatch)
  with pytest.raises(UserError, match=r'asks for (builtins|__builtin__)\.eval'):
    torch_pickle.load(path)
  path = write_pth(str(tmp_path / 'model.pth'), {'x': ml_collections.ConfigDict()}, monkeypatch)
  with pytest.raises(UserError, match=r'asks for ml_collections\..*ConfigDict'):
    torch_pickle.load(path)


def test_reader_checks_tensor_records_against_their_storage(tmp_path, monkeypatch):
  flat = np.arange(6, dtype=np.float32)
  ok = {'t': Strided(flat, 1, (2, 2), (1, 2)), 'c': flat.reshape(2, 3)}
  got = torch_pickle.load(write_pth(str(tmp_path / 'ok.pth'), ok, monkeypatch))
  np.testing.assert_array_equal(got['t'], [[1, 3], [2, 4]])
  assert got['t'].flags['C_CONTIGUOUS'] and got['t'].flags['WRITEABLE']
  bad = [({'t': Strided(flat, 0, (4, 4), (4, 1))}, 'reads past its storage'),
         ({'t': Strided(flat, 5, (2,), (1,))}, 'reads past its storage'),
         ({'t': Strided(flat, 0, (2,), (-1,))}, 'malformed size, stride or offset'),
         ({'t': Strided(flat, 0, (2,), (1,), state={'size': (10 ** 6,)})}, 'set the state')]
  for i, (obj, message) in enumerate(bad):
    with pytest.raises(UserError, match=message):
      torch_pickle.load(write_pth(str(tmp_path / f'bad{i}.pth'), obj, monkeypatch))


def test_reader_gives_one_line_for_files_that_are_not_torch_files(tmp_path):
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a pickle at all')
  with pytest.raises(UserError, match=r'junk.pth: not a readable PyTorch file'):
    torch_pickle.load(str(junk))
  empty_zip = tmp_path / 'empty.pth'
  with zipfile.ZipFile(empty_zip, 'w') as z:
    z.writestr('archive/version', '3')
  with pytest.raises(UserError, match='expected one data.pkl'):
    torch_pickle.load(str(empty_zip))


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_reader_equals_torch_load(tmp_path, zip_format):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = collections.OrderedDict(
      transposed=base.t(),                   # Non-contiguous view of `base`...
      row=base[2],                           # ...and an offset view sharing its storage.
      every_other=base[:, 1::2],
      half=torch.randn(3, 2).half(),
      bf16=(torch.randn(5) * 3).to(torch.bfloat16),
      steps=torch.tensor(7, dtype=torch.int64),
      param=torch.nn.Parameter(torch.randn(2, 2)),
      empty=torch.zeros(0, 3))
  path = str(tmp_path / 'w.pth')
  torch.save({'state_dict': sd, 'epoch': 3}, path, _use_new_zipfile_serialization=zip_format)
  expected = torch.load(path, weights_only=True)
  got = torch_pickle.load(path)
  assert got['epoch'] == 3 and list(got['state_dict']) == list(sd)
  for name, tensor in expected['state_dict'].items():
    value = got['state_dict'][name]
    assert value.shape == tuple(tensor.shape), name
    if tensor.dtype == torch.bfloat16:
      assert str(value.dtype) == 'bfloat16'
      np.testing.assert_array_equal(value.astype(np.float32), tensor.float().numpy())
    else:
      assert value.dtype == tensor.detach().numpy().dtype, name
      np.testing.assert_array_equal(value, tensor.detach().numpy(), err_msg=name)


def test_pth_weights_load_without_torch(tmp_path, monkeypatch):
  sd = {'fc.weight': np.arange(6, dtype=np.float32).reshape(3, 2),
        'fc.bias': np.ones(3, np.float16), 'bn1.num_batches_tracked': np.array(5)}
  path = write_pth(str(tmp_path / 'w.pth'), sd, monkeypatch)
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
  loaded = pretrained.load_pretrained(path, str(tmp_path))
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], sd['fc.weight'].T)
  assert loaded['params']['head']['bias'].dtype == np.float32


def test_convert_script_reads_pth_without_torch(tmp_path, monkeypatch):
  torch = pytest.importorskip('torch')
  from resnet_jax import torch_reference as tr
  from scripts import convert_torchvision
  ref = tr.randomize_batchnorm(tr.ResNet(tr.BasicBlock, (3, 3, 3), (16, 32, 64), 10, 'cifar'))
  src = str(tmp_path / 'r20.pth')
  torch.save(ref.state_dict(), src)
  monkeypatch.setitem(sys.modules, 'torch', None)
  summary = convert_torchvision.convert('resnet20', src, str(tmp_path / 'out'))
  assert summary['num_classes'] == 10
  loaded = checkpointing.load_variables(str(tmp_path / 'out'))
  np.testing.assert_array_equal(loaded['batch_stats']['stage2']['block0']['proj_bn']['mean'],
                                ref.layer2[0].downsample[1].running_mean.numpy())


# --------------------------------------------------------------------------- timm: on a local hub


class _Hub:
  """A Hugging Face Hub stand-in on 127.0.0.1: serves /<repo>/resolve/main/<file>."""

  def __init__(self):
    self.files, self.requests = {}, []
    hub_self = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def _answer(self, body):
        hub_self.requests.append((self.command, self.path))
        data = hub_self.files.get(self.path)
        if data is None:
          self.send_response(404)
          self.send_header('X-Error-Code', 'RepoNotFound')
          self.send_header('Content-Length', '0')
          self.end_headers()
          return
        self.send_response(200)
        self.send_header('X-Repo-Commit', 'c' * 40)
        self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if body:
          self.wfile.write(data)

      def do_HEAD(self):  # noqa: N802
        self._answer(False)

      def do_GET(self):  # noqa: N802
        self._answer(True)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def add(self, name, data):
    self.files[f'/timm/{name}/resolve/main/model.safetensors'] = data

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def local_hub(monkeypatch):
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  monkeypatch.delenv('TRANSFORMERS_OFFLINE', raising=False)
  served = _Hub()
  monkeypatch.setattr(hub, 'ENDPOINT', served.url)
  # Nothing from the user's own Hugging Face cache.
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)
  yield served
  served.close()


def _safetensors(tensors):
  from safetensors.numpy import save
  return save(tensors)


def test_timm_source_downloads_once_then_works_offline(tmp_path, local_hub, monkeypatch):
  fc = np.arange(8, dtype=np.float32).reshape(2, 4)
  local_hub.add('resnet18.a1_in1k', _safetensors({'fc.weight': fc, 'fc.bias': np.ones(2, np.float32)}))
  cache = str(tmp_path / 'cache')
  loaded = pretrained.load_pretrained('timm:resnet18.a1_in1k', cache)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], fc.T)
  assert os.path.isfile(os.path.join(cache, 'timm', 'resnet18.a1_in1k', 'model.safetensors'))
  assert [m for m, _ in local_hub.requests].count('GET') == 1
  # Afterwards the cache answers on its own, offline or not.
  local_hub.close()
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  loaded = pretrained.load_pretrained('timm:resnet18.a1_in1k', cache)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], fc.T)
  config = tiny_config(**{'finetune.init_from': 'timm:resnet18.a1_in1k', 'finetune.cache_dir': cache})
  assert pretrained.check_source(config) is None


def test_timm_offline_or_unreachable_is_one_line_naming_the_repo_and_the_place(
    tmp_path, local_hub, monkeypatch):
  import huggingface_hub

  def no_download(*a, **k):
    raise AssertionError('no download may start')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_download)
  cache = str(tmp_path / 'cache')
  place = os.path.join(cache, 'timm', 'resnet50.a1_in1k', 'model.safetensors')
  config = tiny_config(**{'finetune.init_from': 'timm:resnet50.a1_in1k', 'finetune.cache_dir': cache})
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  for problem in (pretrained.check_source(config), _error(config)):
    assert 'timm/resnet50.a1_in1k/resolve/main/model.safetensors' in problem
    assert 'HF_HUB_OFFLINE is set' in problem and problem.endswith(f'place it at {place}')
  assert local_hub.requests == []
  monkeypatch.delenv('HF_HUB_OFFLINE')
  local_hub.close()  # The endpoint now refuses connections: the probe fails once, no retries.
  for problem in (pretrained.check_source(config), _error(config)):
    assert 'the Hub cannot be reached (ConnectError)' in problem and place in problem
  assert not os.path.exists(cache)  # Nothing was written.


def test_timm_unknown_name_and_bad_name(tmp_path, local_hub):
  config = tiny_config(**{'finetune.init_from': 'timm:resnet51.nope',
                          'finetune.cache_dir': str(tmp_path)})
  assert 'the Hub has no repository timm/resnet51.nope' in pretrained.check_source(config)
  assert 'the Hub has no repository timm/resnet51.nope' in _error(config)
  config.finetune.init_from = 'timm:../../etc'
  assert 'is not a timm model name' in pretrained.check_source(config)
  assert 'is not a timm model name' in _error(config)


def test_timm_probe_is_single_and_short(tmp_path, monkeypatch):
  import huggingface_hub
  calls = []

  def metadata(url, **kwargs):
    calls.append(kwargs)
    raise OSError('down')

  monkeypatch.setattr(huggingface_hub, 'get_hf_file_metadata', metadata)
  monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  with pytest.raises(UserError, match='cannot be reached'):
    hub.fetch('resnet50.tv2_in1k', str(tmp_path))
  assert len(calls) == 1 and calls[0]['retry_on_errors'] is False and calls[0]['timeout'] <= 20


def test_timm_weights_give_pytorch_logits(tmp_path, local_hub):
  torch = pytest.importorskip('torch')
  from safetensors.torch import save
  from resnet_jax import torch_reference as tr
  torch.manual_seed(0)
  # ResNet-18's layout (imagenet stem, four stages of basic blocks) at a quarter width.
  ref = tr.randomize_batchnorm(tr.ResNet(tr.BasicBlock, (2, 2, 2, 2), (16, 32, 64, 128), 10,
                                         'imagenet')).eval()
  local_hub.add('resnet18.a1_in1k', save({k: v.contiguous() for k, v in ref.state_dict().items()}))
  loaded = pretrained.load_pretrained('timm:resnet18.a1_in1k', str(tmp_path))
  model = models.create_model(ml_collections.ConfigDict(
      {'name': 'resnet18', 'stem': 'imagenet', 'width_multiplier': 0.25}), 10)
  fresh = jax.eval_shape(lambda r: models.init_variables(model, r, 32), jax.random.key(1))
  report = checkpointing.compare_trees(loaded, fresh, dont_load='')
  assert not report.errors() and not loaded['unexpected'], report.errors()
  variables = checkpointing.merge_loaded(loaded, fresh, report)
  x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _error(config):
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained(config.finetune.init_from, config.finetune.cache_dir)
  return str(e.value)


# --------------------------------------------------------------------------- check_source


def test_check_source_names_missing_files_and_folders_without_network(tmp_path, monkeypatch):
  def no_network(*a, **k):
    raise AssertionError('no network for local sources')

  monkeypatch.setattr(pretrained.urllib.request, 'urlopen', no_network)
  c = tiny_config()
  assert pretrained.check_source(c) is None          # From scratch.
  weights = tmp_path / 'w.safetensors'
  weights.write_bytes(b'x')
  c.finetune.init_from = str(weights)
  assert pretrained.check_source(c) is None
  c.finetune.init_from = str(tmp_path / 'gone.pth')
  assert pretrained.check_source(c) == \
      f'config.finetune.init_from: weight file {tmp_path}/gone.pth does not exist'
  c.finetune.init_from = str(tmp_path / 'no_workdir')
  assert 'no_workdir does not exist' in pretrained.check_source(c)
  (tmp_path / 'plain').mkdir()
  c.finetune.init_from = str(tmp_path / 'plain')
  assert 'is neither a workdir with checkpoints' in pretrained.check_source(c)
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  c.finetune.init_from = str(tmp_path / 'run')
  assert pretrained.check_source(c) is None
  c.finetune.init_from = 'torchvision:resnet20'
  assert 'no torchvision weights for' in pretrained.check_source(c)
  c.finetune.init_from = 'torchvision:resnet18'
  c.finetune.cache_dir = str(tmp_path / 'cache')
  os.makedirs(c.finetune.cache_dir)
  (tmp_path / 'cache' / 'resnet18-f37072fd.pth').write_bytes(b'x')
  assert pretrained.check_source(c) is None          # Cached: no request.


def test_check_source_torchvision_offline_and_silent_server(tmp_path, monkeypatch):
  c = tiny_config(**{'finetune.init_from': 'torchvision:resnet50',
                     'finetune.cache_dir': str(tmp_path / 'cache')})
  dest = os.path.join(str(tmp_path / 'cache'), 'resnet50-0676ba61.pth')

  def offline(request, timeout):
    raise urllib.error.URLError('no network')

  monkeypatch.setattr(pretrained.urllib.request, 'urlopen', offline)
  problem = pretrained.check_source(c)
  assert problem.startswith('config.finetune.init_from: resnet50-0676ba61.pth is not cached')
  assert 'cannot be reached (URLError)' in problem and problem.endswith(f'place it at {dest}')
  release = threading.Event()

  def silent(request, timeout):  # Hangs as an unanswered DNS look-up would.
    release.wait(30)
    raise urllib.error.URLError('late')

  monkeypatch.setattr(pretrained.urllib.request, 'urlopen', silent)
  try:
    problem = pretrained.check_source(c, timeout_s=0.2)
  finally:
    release.set()
  assert 'did not answer within 0.2s' in problem and dest in problem
  served = []

  def answers(request, timeout):
    served.append((request.get_header('Range'), timeout))
    return io.BytesIO(b'x')

  monkeypatch.setattr(pretrained.urllib.request, 'urlopen', answers)
  assert pretrained.check_source(c) is None
  assert served == [('bytes=0-0', 5.0)]               # One byte asked for, nothing saved.
  assert not os.path.exists(str(tmp_path / 'cache'))


def test_torchvision_download_gives_up_within_seconds(tmp_path, monkeypatch):
  timeouts = []

  def offline(url, timeout):
    timeouts.append(timeout)
    raise urllib.error.URLError('no network')

  monkeypatch.setattr(pretrained.urllib.request, 'urlopen', offline)
  with pytest.raises(UserError, match='^config.finetune.init_from: cannot download .*place it at'):
    pretrained.fetch_torchvision('resnet18', str(tmp_path))
  assert timeouts and max(timeouts) <= 30
