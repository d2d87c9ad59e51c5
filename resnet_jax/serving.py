"""An HTTP server for an export: POST /predict, GET /healthz, GET /metrics (Starlette + uvicorn).

`POST /predict` takes one image as the raw body (Content-Type image/jpeg or
image/png) or one or more images as multipart/form-data files, and answers
`{"results": [{"file": name|null, "top_k": [{"label", "probability"}, ...]}]}`
(`?top_k=N` overrides the default). Images from concurrent requests are
classified together: a `Batcher` gathers them up to `max_batch`, waiting at
most `max_wait_ms` for requests still decoding their images, and pads each
batch to a power of two so the exported function compiles for a handful of
sizes only (all at start-up).

Bad requests get a 4xx JSON `{"error": ...}` and never stop the server: a
content type other than those above (415), an empty body (400), bytes that are
not an image (400), a body over `max_body_bytes` (413; refused from its
Content-Length before any of it is read, and otherwise as soon as the bytes
read so far pass the limit). `/metrics` counts requests by status, errors by
reason, request latency and the batch sizes the model ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import time
from typing import Any, Callable

import numpy as np

from resnet_jax import exported

RAW_TYPES = ('image/jpeg', 'image/png')


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  max_batch: int = 32          # Images per forward pass, at most.
  max_wait_ms: float = 5.0     # How long a batch may wait for images still being decoded.
  max_body_bytes: int = 10 * 2**20
  max_files: int = 32          # Files in one multipart request.
  top_k: int = 5


class RequestError(Exception):
  """A request we refuse: HTTP status, a metrics reason, a message for the client."""

  def __init__(self, status: int, reason: str, message: str):
    super().__init__(message)
    self.status, self.reason, self.message = status, reason, message


class Metrics:
  """Prometheus metrics of one app, in their own registry."""

  def __init__(self, max_batch: int):
    import prometheus_client as prom
    self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter('predict_requests', 'POST /predict requests by HTTP status.',
                                 ['status'], registry=self.registry)
    self.errors = prom.Counter('predict_errors', 'Refused or failed /predict requests by reason.',
                               ['reason'], registry=self.registry)
    self.latency = prom.Histogram(
        'predict_latency_seconds', 'Time to answer POST /predict.', registry=self.registry,
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    self.batch_size = prom.Histogram(
        'predict_batch_size', 'Images per forward pass of the model.', registry=self.registry,
        buckets=tuple(_buckets(max_batch)))
    self.images = prom.Counter('predict_images', 'Images classified.', registry=self.registry)

  def render(self) -> tuple[bytes, str]:
    import prometheus_client as prom
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


def _buckets(max_batch: int) -> list[int]:
  """1, 2, 4, ... up to and including max_batch."""
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 2
  return sizes + [max_batch]


class Batcher:
  """Feeds images from concurrent requests to `predict` in batches.

  One worker task takes the first queued image, then every queued one up to
  `max_batch`; it waits (at most `max_wait_s`) for more only while requests
  announced by `expect` are still decoding, so a lone request never waits. It
  runs `predict` in its own thread, and the event loop keeps accepting
  requests meanwhile.
  """

  def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int,
               max_wait_s: float, on_batch: Callable[[int], None] = lambda n: None):
    self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
    self.on_batch = on_batch
    self.sizes = _buckets(max_batch)
    self.expected = 0  # Images announced by requests, not queued yet.
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='model')

  def padded_predict(self, batch: np.ndarray) -> np.ndarray:
    """predict() on the batch padded to the next compiled size."""
    n = len(batch)
    size = next(s for s in self.sizes if s >= n)
    if size > n:
      batch = np.concatenate([batch, np.zeros((size - n,) + batch.shape[1:], batch.dtype)])
    return np.asarray(self.predict(batch))[:n]

  def warm_up(self, image_shape: tuple[int, ...]) -> None:
    for size in self.sizes:
      self.padded_predict(np.zeros((size,) + tuple(image_shape), np.uint8))

  async def start(self) -> None:
    self._queue = asyncio.Queue()
    self._task = asyncio.create_task(self._run())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
    self._executor.shutdown(wait=True)

  def expect(self, n: int) -> None:
    """n images are on their way (negative: they arrived, or never will)."""
    self.expected += n

  async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
    """Probabilities for each image, computed in whatever batches they land in."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in images]
    for image, future in zip(images, futures):  # All queued before anything else runs.
      self._queue.put_nowait((image, future))
    return list(await asyncio.gather(*futures))

  async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
    loop = asyncio.get_running_loop()
    items = [await self._queue.get()]
    deadline = loop.time() + self.max_wait_s
    while len(items) < self.max_batch:
      if not self._queue.empty():
        items.append(self._queue.get_nowait())
        continue
      remaining = deadline - loop.time()
      if self.expected <= 0 or remaining <= 0:
        break
      try:
        items.append(await asyncio.wait_for(self._queue.get(), remaining))
      except asyncio.TimeoutError:
        break
    return [(image, f) for image, f in items if not f.done()]  # Drop abandoned requests.

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = await self._collect()
      if not items:
        continue
      batch = np.stack([image for image, _ in items])
      try:
        probs = await loop.run_in_executor(self._executor, self.padded_predict, batch)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception('The model failed on a batch of %d', len(items))
        for _, f in items:
          if not f.done():
            f.set_exception(e)
        continue
      self.on_batch(len(items))
      for (_, f), p in zip(items, probs):
        if not f.done():
          f.set_result(p)


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


async def read_body(request: Any, limit: int) -> bytes:
  """The request body, refused (413) from its Content-Length or as soon as it passes `limit`."""
  length = request.headers.get('content-length')
  if length is not None:
    if not length.strip().isdigit():
      raise RequestError(400, 'bad_request', f'Content-Length {length!r} is not a number')
    if int(length) > limit:
      raise RequestError(413, 'too_large',
                         f'request body of {int(length)} bytes is over the limit of {limit}')
  chunks, total = [], 0
  async for chunk in request.stream():
    total += len(chunk)
    if total > limit:
      raise RequestError(413, 'too_large', f'request body is over the limit of {limit} bytes')
    chunks.append(chunk)
  return b''.join(chunks)


async def read_images(request: Any, config: ServerConfig) -> list[tuple[str | None, bytes]]:
  """[(file name or None, bytes)] from a raw image body or a multipart form."""
  from starlette.exceptions import HTTPException
  from starlette.datastructures import UploadFile
  from starlette.formparsers import MultiPartException
  from starlette.requests import Request

  content_type = request.headers.get('content-type', '').split(';')[0].strip().lower()
  if content_type not in RAW_TYPES + ('multipart/form-data',):
    raise RequestError(415, 'wrong_content_type',
                       f'Content-Type {content_type or "(none)"} is not image/jpeg, image/png or '
                       'multipart/form-data')
  body = await read_body(request, config.max_body_bytes)
  if not body:
    raise RequestError(400, 'empty_body', 'the request body is empty')
  if content_type in RAW_TYPES:
    return [(None, body)]
  async def replay() -> dict[str, Any]:  # The form parser reads the body we already hold.
    return {'type': 'http.request', 'body': body, 'more_body': False}

  try:
    form = await Request(request.scope, replay).form(max_files=config.max_files,
                                                     max_fields=config.max_files)
  except (HTTPException, MultiPartException) as e:
    raise RequestError(400, 'bad_multipart',
                       f'bad multipart form: {getattr(e, "detail", None) or e}') from None
  try:
    files = [(v.filename, await v.read()) for _, v in form.multi_items()
             if isinstance(v, UploadFile)]
  finally:
    await form.close()
  if not files:
    raise RequestError(400, 'empty_body', 'the form holds no files')
  empty = [name for name, data in files if not data]
  if empty:
    raise RequestError(400, 'empty_body', f'file {empty[0]!r} is empty')
  return files


def create_app(classifier: exported.Classifier, config: ServerConfig = ServerConfig()) -> Any:
  """The Starlette app; its lifespan compiles every batch size before serving."""
  from starlette.applications import Starlette
  from starlette.responses import JSONResponse, Response
  from starlette.routing import Route

  metrics = Metrics(config.max_batch)

  def on_batch(n: int) -> None:
    metrics.batch_size.observe(n)
    metrics.images.inc(n)

  batcher = Batcher(classifier, config.max_batch, config.max_wait_ms / 1000.0, on_batch)

  async def decode(name: str | None, data: bytes) -> np.ndarray:
    loop = asyncio.get_running_loop()
    try:
      return await loop.run_in_executor(None, classifier.decode_image, data)
    except exported.ImageError as e:
      what = f'{name!r}: ' if name else ''
      if e.too_large:
        raise RequestError(413, 'image_too_large', f'{what}{e}') from None
      raise RequestError(400, 'not_an_image', f'{what}{e}') from None

  def top_k_of(request: Any) -> int:
    value = request.query_params.get('top_k', str(config.top_k))
    if not value.isdigit() or int(value) < 1:
      raise RequestError(400, 'bad_request', f'top_k must be a positive integer, got {value!r}')
    return int(value)

  async def predict(request: Any) -> Any:
    start = time.perf_counter()
    try:
      k = top_k_of(request)
      files = await read_images(request, config)
      batcher.expect(len(files))  # The batch now forming may wait for these.
      try:
        images = await asyncio.gather(*(decode(name, data) for name, data in files))
      finally:
        batcher.expect(-len(files))
      probs = await batcher.classify(images)
      results = [{'file': name, 'top_k': [{'label': label, 'probability': p} for label, p in
                                          exported.top_k(row, classifier.class_names, k)]}
                 for (name, _), row in zip(files, probs)]
      status, body = 200, {'results': results}
    except RequestError as e:
      metrics.errors.labels(e.reason).inc()
      status, body = e.status, {'error': e.message}
    except Exception:  # pylint: disable=broad-except
      logging.exception('POST /predict failed')
      metrics.errors.labels('internal').inc()
      status, body = 500, {'error': 'internal error'}
    metrics.requests.labels(str(status)).inc()
    metrics.latency.observe(time.perf_counter() - start)
    return JSONResponse(body, status_code=status)

  async def healthz(request: Any) -> Any:
    del request
    return JSONResponse({'status': 'ok', 'model': classifier.card['architecture']['name'],
                         'classes': len(classifier.class_names),
                         'image_size': classifier.image_size, 'max_batch': config.max_batch})

  async def metrics_endpoint(request: Any) -> Any:
    del request
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)

  def warm_up() -> None:
    """Compiles every batch size and imports the decoder now, not on the first requests."""
    size = classifier.image_size
    batcher.warm_up((size, size, 3))
    classifier.decode_image(_png(np.zeros((2, 2, 3), np.uint8)))

  @contextlib.asynccontextmanager
  async def lifespan(app: Any):
    del app
    await asyncio.get_running_loop().run_in_executor(None, warm_up)
    await batcher.start()
    try:
      yield
    finally:
      await batcher.stop()

  app = Starlette(routes=[Route('/predict', predict, methods=['POST']),
                          Route('/healthz', healthz, methods=['GET']),
                          Route('/metrics', metrics_endpoint, methods=['GET'])],
                  lifespan=lifespan)
  app.state.metrics = metrics
  app.state.batcher = batcher
  return app
