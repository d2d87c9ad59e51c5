"""Serves an export of scripts/export.py over HTTP.

  python scripts/serve.py --exported=/tmp/export --port=8000
  curl -s -H 'Content-Type: image/jpeg' --data-binary @cat.jpg http://127.0.0.1:8000/predict
  curl -s -F file=@cat.jpg -F file=@dog.png 'http://127.0.0.1:8000/predict?top_k=3'

POST /predict (raw image/jpeg or image/png body, or multipart files) answers
top-k JSON; GET /healthz; GET /metrics (Prometheus). Requests are batched
dynamically (--max_batch, --max_wait_ms). Only the export directory is read:
no checkpoint, no model code. Bad flags are one line `error: ...`, exit 2.
"""

from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402

flags.DEFINE_string('exported', None, 'An export directory written by scripts/export.py.')
flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (0.0.0.0 to accept other machines).')
flags.DEFINE_integer('port', 8000, 'TCP port.')
flags.DEFINE_integer('max_batch', 32, 'Images per forward pass, at most.')
flags.DEFINE_float('max_wait_ms', 5.0, 'How long a batch may wait for images still being '
                   'decoded by other requests.')
flags.DEFINE_integer('max_body_bytes', 10 * 2**20, 'Largest request body accepted.')
flags.DEFINE_integer('max_files', 32, 'Most files in one multipart request.')
flags.DEFINE_integer('top_k', 5, 'Classes per image in the answer (?top_k=N overrides).')
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else 'bad command-line flags')
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.exported:
    fail('--exported is required')
  if not 0 <= FLAGS.port <= 65535:
    fail(f'--port: {FLAGS.port} is not a TCP port')
  for name in ('max_batch', 'max_body_bytes', 'max_files', 'top_k'):
    if getattr(FLAGS, name) < 1:
      fail(f'--{name}: must be positive, got {getattr(FLAGS, name)}')
  if FLAGS.max_wait_ms < 0:
    fail(f'--max_wait_ms: must be >= 0, got {FLAGS.max_wait_ms}')
  import uvicorn

  from resnet_jax import exported, serving
  from resnet_jax.errors import UserError
  try:
    classifier = exported.load(FLAGS.exported)
  except UserError as e:
    fail(str(e))
  config = serving.ServerConfig(max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                                max_body_bytes=FLAGS.max_body_bytes, max_files=FLAGS.max_files,
                                top_k=FLAGS.top_k)
  sock = socket.socket(socket.AF_INET6 if ':' in FLAGS.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((FLAGS.host, FLAGS.port))  # Here, so that a taken port is one line.
  except OSError as e:
    fail(f'--port: cannot listen on {FLAGS.host}:{FLAGS.port} ({e.strerror or e})')
  print(f'Serving {classifier.card["architecture"]["name"]} from {classifier.directory} on '
        f'http://{FLAGS.host}:{sock.getsockname()[1]} (compiling batch sizes up to '
        f'{FLAGS.max_batch} first)', flush=True)
  server = uvicorn.Server(uvicorn.Config(serving.create_app(classifier, config),
                                         log_level='warning', access_log=False))
  server.run(sockets=[sock])


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
