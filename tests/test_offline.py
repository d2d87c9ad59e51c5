"""Offline, a missing TFDS dataset fails after a few connection attempts, not minutes of retries."""

import socket

import pytest

from resnet_jax import input_pipeline
from resnet_jax.errors import UserError
from tests.conftest import tiny_config


def test_offline_tfds_download_gives_up_after_a_few_attempts(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  attempts = []

  def no_network(host, *args, **kwargs):
    attempts.append(host)
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

  monkeypatch.setattr(socket, 'getaddrinfo', no_network)
  c = tiny_config(**{'dataset.name': 'cifar10', 'dataset.data_dir': str(tmp_path)})
  with pytest.raises(UserError, match='offline'):
    input_pipeline.create_data(c)
  # TFDS's own default is 11 attempts with exponential backoff (about 3.5 minutes).
  assert 1 <= len(attempts) <= input_pipeline.DOWNLOAD_RETRIES + 1, attempts


def test_download_false_names_the_unprepared_dataset(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  c = tiny_config(**{'dataset.name': 'cifar10', 'dataset.data_dir': str(tmp_path),
                     'dataset.download': False})
  with pytest.raises(UserError, match=r'config\.dataset\.download.*not prepared.*tfds build'):
    input_pipeline.create_data(c)


def test_missing_data_and_missing_weights_are_named_in_one_line(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  from resnet_jax import train

  def no_network(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

  monkeypatch.setattr(socket, 'getaddrinfo', no_network)
  c = tiny_config(**{'dataset.name': 'cifar10', 'dataset.data_dir': str(tmp_path / 'tfds'),
                     'finetune.init_from': 'torchvision:resnet18',
                     'finetune.cache_dir': str(tmp_path / 'cache')})
  (tmp_path / 'tfds').mkdir()
  workdir = tmp_path / 'wd'
  with pytest.raises(UserError) as info:
    train.train_and_evaluate(c, str(workdir))
  message = str(info.value)
  assert '\n' not in message
  assert "TFDS dataset 'cifar10'" in message and 'offline' in message
  assert 'config.finetune.init_from' in message and 'resnet18-f37072fd.pth' in message
  assert not workdir.exists() and not (tmp_path / 'cache').exists()
