"""scripts/serve.py and resnet_jax.serving: real HTTP on 127.0.0.1, dynamic batching,
bad requests answered with 4xx JSON while the server keeps serving, and /metrics counting."""

import asyncio
import concurrent.futures
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from resnet_jax import exported, serving
from tests.conftest import REPO, subprocess_env
from tests.test_export import exported_model  # noqa: F401  # pylint: disable=unused-import

LIMIT = 20_000  # max_body_bytes of the test server.
CONFIG = serving.ServerConfig(max_batch=8, max_wait_ms=20, max_body_bytes=LIMIT, max_files=4,
                              top_k=3)


@pytest.fixture(scope='module')
def server(exported_model):  # pylint: disable=redefined-outer-name
  """The app on uvicorn in a thread, on a free port of 127.0.0.1."""
  import uvicorn
  classifier = exported.load(exported_model.out)
  app = serving.create_app(classifier, CONFIG)
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  uv = uvicorn.Server(uvicorn.Config(app, log_level='warning', access_log=False))
  thread = threading.Thread(target=uv.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 120
  while not uv.started:
    assert thread.is_alive() and time.time() < deadline, 'the server did not start'
    time.sleep(0.05)
  url = f'http://127.0.0.1:{sock.getsockname()[1]}'
  yield url, classifier, exported_model.images
  uv.should_exit = True
  thread.join(timeout=30)
  sock.close()


def png_bytes(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def image_file(images, name):
  with open(os.path.join(images, 'test', *name.split('/')), 'rb') as f:
    return f.read()


def expected_top_k(classifier, data, k=CONFIG.top_k):
  probs = classifier(classifier.decode_image(data)[None])[0]
  return exported.top_k(probs, classifier.class_names, k)


def assert_answer(result, want):
  assert [d['label'] for d in result['top_k']] == [n for n, _ in want]
  np.testing.assert_allclose([d['probability'] for d in result['top_k']],
                             [p for _, p in want], atol=1e-6)


def metric(url, name, **labels):
  """A sample's value from /metrics (0 when absent)."""
  text = httpx.get(f'{url}/metrics').text
  want = ','.join(f'{k}="{v}"' for k, v in labels.items())
  pattern = re.escape(name) + (r'\{' + re.escape(want) + r'\}' if labels else '') + r' (\S+)'
  match = re.search('^' + pattern + '$', text, re.M)
  return float(match.group(1)) if match else 0.0


def test_healthz(server):
  url, _, _ = server
  response = httpx.get(f'{url}/healthz')
  assert response.status_code == 200
  assert response.json() == {'status': 'ok', 'model': 'resnet20', 'classes': 3, 'image_size': 8,
                             'max_batch': 8}


def test_raw_jpeg_and_png_and_multipart_files_get_the_exports_top_k(server):
  url, classifier, images = server
  jpeg, png = image_file(images, 'cat/0001.jpg'), image_file(images, 'dog/0000.png')
  for data, content_type in ((jpeg, 'image/jpeg'), (png, 'image/png')):
    response = httpx.post(f'{url}/predict', content=data, headers={'Content-Type': content_type})
    assert response.status_code == 200, response.text
    [result] = response.json()['results']
    assert result['file'] is None
    assert_answer(result, expected_top_k(classifier, data))
  files = [('file', ('a.jpg', jpeg, 'image/jpeg')), ('file', ('b.png', png, 'image/png')),
           ('file', ('c.png', image_file(images, 'frog/0002.png'), 'image/png'))]
  response = httpx.post(f'{url}/predict?top_k=2', files=files)
  assert response.status_code == 200, response.text
  results = response.json()['results']
  assert [r['file'] for r in results] == ['a.jpg', 'b.png', 'c.png']
  for result, (_, (_, data, _)) in zip(results, files):
    assert_answer(result, expected_top_k(classifier, data, k=2))


def test_twenty_concurrent_requests_are_answered_and_counted(server):
  url, classifier, _ = server
  rng = np.random.default_rng(0)
  bodies = [png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(20)]
  ok_before = metric(url, 'predict_requests_total', status='200')
  images_before = metric(url, 'predict_images_total')
  batches_before = metric(url, 'predict_batch_size_sum')
  over_before = (metric(url, 'predict_batch_size_count') -
                 metric(url, 'predict_batch_size_bucket', le='8.0'))
  start = threading.Barrier(20)

  def post(body):
    start.wait()
    return httpx.post(f'{url}/predict', content=body, headers={'Content-Type': 'image/png'},
                      timeout=60)

  with concurrent.futures.ThreadPoolExecutor(20) as pool:
    responses = list(pool.map(post, bodies))
  for body, response in zip(bodies, responses):
    assert response.status_code == 200, response.text
    assert_answer(response.json()['results'][0], expected_top_k(classifier, body))
  assert metric(url, 'predict_requests_total', status='200') == ok_before + 20
  assert metric(url, 'predict_images_total') == images_before + 20
  assert metric(url, 'predict_batch_size_sum') == batches_before + 20  # Every image, once.
  over_after = (metric(url, 'predict_batch_size_count') -
                metric(url, 'predict_batch_size_bucket', le='8.0'))
  assert over_after == over_before == 0  # No batch above max_batch.


def raw_http(url, head_lines, parts):
  """Sends the head and body parts over a socket; returns (status, JSON body, bytes sent)."""
  host, port = url.rsplit('//', 1)[1].split(':')
  head = '\r\n'.join(['POST /predict HTTP/1.1', f'Host: {host}', 'Connection: close',
                      *head_lines, '', '']).encode()
  sent = 0
  with socket.create_connection((host, int(port)), timeout=30) as s:
    s.sendall(head)
    for part in parts:
      s.sendall(part)
      sent += len(part)
    data = b''
    try:
      while chunk := s.recv(65536):
        data += chunk
    except ConnectionResetError:
      pass
  head, _, body = data.partition(b'\r\n\r\n')
  return int(head.split()[1]), json.loads(body), sent


BAD_REQUESTS = {
    'not_an_image': (400, {'content': b'\xff\xd8 this is not a JPEG',
                           'headers': {'Content-Type': 'image/jpeg'}}),
    'wrong_content_type': (415, {'content': b'hello', 'headers': {'Content-Type': 'text/plain'}}),
    'empty_body': (400, {'content': b'', 'headers': {'Content-Type': 'image/png'}}),
    'too_large': (413, {'content': b'\0' * (LIMIT + 1), 'headers': {'Content-Type': 'image/png'}}),
    'bad_multipart': (400, {'files': [('file', (f'{i}.png', b'x', 'image/png'))
                                      for i in range(CONFIG.max_files + 1)]}),
    'bad_request': (400, {'content': b'x', 'headers': {'Content-Type': 'image/png'},
                          'params': {'top_k': 'many'}}),
}


@pytest.mark.parametrize('reason', sorted(BAD_REQUESTS))
def test_bad_request_is_a_4xx_json_error_and_the_server_keeps_serving(server, reason):
  url, classifier, images = server
  status, kwargs = BAD_REQUESTS[reason]
  before = metric(url, 'predict_errors_total', reason=reason)
  status_before = metric(url, 'predict_requests_total', status=str(status))
  response = httpx.post(f'{url}/predict', **kwargs)
  assert response.status_code == status, response.text
  assert response.headers['content-type'] == 'application/json'
  assert response.json()['error']
  assert metric(url, 'predict_errors_total', reason=reason) == before + 1
  assert metric(url, 'predict_requests_total', status=str(status)) == status_before + 1
  good = image_file(images, 'cat/0001.jpg')
  response = httpx.post(f'{url}/predict', content=good, headers={'Content-Type': 'image/jpeg'})
  assert response.status_code == 200
  assert_answer(response.json()['results'][0], expected_top_k(classifier, good))


def test_a_non_image_file_in_a_form_names_the_file(server):
  url, _, images = server
  files = [('file', ('ok.png', image_file(images, 'dog/0000.png'), 'image/png')),
           ('file', ('notes.png', b'not a picture', 'image/png'))]
  response = httpx.post(f'{url}/predict', files=files)
  assert response.status_code == 400 and 'notes.png' in response.json()['error']


def test_oversized_body_is_refused_before_it_is_read(server):
  url, _, _ = server
  before = metric(url, 'predict_errors_total', reason='too_large')
  # Content-Length says 1 GB; only 100 bytes ever come. The answer arrives anyway.
  status, body, sent = raw_http(url, ['Content-Type: image/jpeg', 'Content-Length: 1000000000'],
                                [b'\xff' * 100])
  assert status == 413 and 'over the limit' in body['error'] and sent == 100
  # No Content-Length (chunked): refused once the bytes read pass the limit.
  chunk = b'\0' * 8192
  frame = f'{len(chunk):x}\r\n'.encode() + chunk + b'\r\n'
  status, body, sent = raw_http(url, ['Content-Type: image/png', 'Transfer-Encoding: chunked'],
                                [frame] * (LIMIT // len(chunk) + 2))
  assert status == 413 and 'over the limit' in body['error']
  assert metric(url, 'predict_errors_total', reason='too_large') == before + 2
  assert httpx.get(f'{url}/healthz').status_code == 200


def _fake_model(seen):
  def predict(batch):
    seen.append(len(batch))
    return batch.reshape(len(batch), -1)[:, :1].astype(np.float32)  # Row i = image i's value.
  return predict


def test_batcher_fills_batches_up_to_max_batch_and_returns_each_its_row():
  seen, sizes = [], []

  async def run():
    batcher = serving.Batcher(_fake_model(seen), max_batch=4, max_wait_s=0.05,
                              on_batch=sizes.append)
    await batcher.start()
    results = await batcher.classify([np.full((2, 2, 3), i, np.uint8) for i in range(11)])
    await batcher.stop()
    return results

  results = asyncio.run(run())
  assert [float(r[0]) for r in results] == list(range(11))
  assert sizes == [4, 4, 3]  # All eleven were queued before the first batch ran.
  assert seen == [4, 4, 4]   # The last batch is padded to a compiled size.


def test_batcher_waits_only_for_images_on_their_way():
  sizes = []

  async def run():
    batcher = serving.Batcher(_fake_model([]), max_batch=8, max_wait_s=60, on_batch=sizes.append)
    await batcher.start()
    # Alone: answered at once, not after max_wait_s.
    await asyncio.wait_for(batcher.classify([np.zeros((2, 2, 3), np.uint8)]), 10)
    batcher.expect(1)  # A second request is still decoding: the batch waits for it.
    first = asyncio.create_task(batcher.classify([np.ones((2, 2, 3), np.uint8)]))
    await asyncio.sleep(0.01)
    batcher.expect(-1)
    second = batcher.classify([np.full((2, 2, 3), 2, np.uint8)])
    results = await asyncio.wait_for(asyncio.gather(first, second), 10)
    await batcher.stop()
    return results

  results = asyncio.run(run())
  assert [float(r[0][0]) for r in results] == [1, 2]
  assert sizes == [1, 2]


def test_serve_cli_bad_input_is_one_line(tmp_path):
  from tests.test_main import assert_one_line_error
  env = subprocess_env()
  run = lambda *args: subprocess.run([sys.executable, 'scripts/serve.py', *args], cwd=REPO,
                                     env=env, capture_output=True, text=True, timeout=300)
  assert_one_line_error(run(), '--exported', 'required')
  assert_one_line_error(run(f'--exported={tmp_path}/nope'), '--exported', 'not a directory')
  assert_one_line_error(run(f'--exported={tmp_path}'), '--exported', 'model.jaxexport')
  assert_one_line_error(run(f'--exported={tmp_path}', '--max_batch=0'), '--max_batch')
  assert_one_line_error(run(f'--exported={tmp_path}', '--port=http'), 'port')
