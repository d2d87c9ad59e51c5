"""Training augmentations beyond crop and flip: RandAugment and random erasing, in TensorFlow.

Both run in the host tf.data pipeline (`preprocess.make_preprocess`) and are
stateless: every random choice comes from the example's seed, which is keyed
by (seed, example counter), so the data stay a function of (seed, step) and a
resumed run sees the same images.

RandAugment (Cubuk et al. 2020): N operations drawn uniformly (with
replacement) from the paper's 14 (OPS) and always applied, each at magnitude M
on the 0..10 scale with a random sign where the operation has a direction.
Ranges are those of timm's `rand_augment_ops` in its 'increasing' form:
rotate up to 30 degrees, shear up to 0.3, translate up to 45% of the side,
solarize threshold 256 down to 0, colour, contrast, brightness and sharpness
factors 1 +- 0.9; posterize keeps 8 down to 4 bits (the paper's 4..8 range,
severity rising with M; timm's increasing variant keeps 4 down to 0). So M = 0
changes nothing but autocontrast and equalize, which have no magnitude. M up
to 30 extrapolates the linear ranges; solarize and posterize stop at their
M = 10 values, factors at 0.1 (as timm clamps them).

Where this differs from timm: timm's operation list has invert and
solarize-add instead of identity, and timm applies each drawn operation with
probability 0.5 and can add magnitude noise ('rand-m9-mstd0.5'); here every
drawn operation is applied at exactly M, as in the paper.

Pixels are uint8 values between operations, and each operation gives the
pixels PIL gives (what timm runs), conventions included: blends truncate,
sharpness leaves the border, geometric operations sample pixel centres with
nearest neighbour in float64 and fill with the dataset's mean colour (timm's
`img_mean`), which normalisation turns into 0.

Hand-written in TF ops because no maintained library provides it for TF2
tf.data: tensorflow_addons (its image transforms) is discontinued, and the
TF ports (tensorflow/models, big_vision's autoaugment) live in model
repositories, not installable libraries.

Random erasing (Zhong et al. 2020), as timm's `RandomErasing` in 'pixel'
mode: with probability p, up to 10 attempts draw an area of 2%-33% of the
image and a log-uniform aspect ratio in 0.3-3.3; the first box that fits
inside the image is replaced by per-pixel, per-channel N(0, 1) noise in
normalised space; when none fits, nothing is erased.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from resnet_jax.errors import UserError

MAX_MAGNITUDE = 30.0
MAX_OPERATIONS = 10
OPS = ('identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color', 'posterize',
       'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x',
       'translate_y')
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


def parse_randaugment(text: str) -> tuple[int, float] | None:
  """'N,M' -> (N, M); '' -> None. Bad text is a UserError naming the field."""
  text = (text or '').strip()
  if not text:
    return None
  parts = text.split(',')
  try:
    if len(parts) != 2:
      raise ValueError
    n, m = int(parts[0]), float(parts[1])
  except ValueError:
    raise UserError(f"config.dataset.randaugment: expected 'N,M' such as '2,9' ('' = off), "
                    f'got {text!r}') from None
  if not 1 <= n <= MAX_OPERATIONS:
    raise UserError(f'config.dataset.randaugment: N (operations per image) must be in '
                    f'1..{MAX_OPERATIONS}, got {n}')
  if not 0 <= m <= MAX_MAGNITUDE:   # Also refuses nan and inf.
    raise UserError(f'config.dataset.randaugment: M (magnitude) must be in '
                    f'0..{MAX_MAGNITUDE:g}, got {m:g}')
  return n, m


def check_config(config_ds: Any) -> None:
  """RandAugment, erasing and where they can run, before any work."""
  parse_randaugment(config_ds.get('randaugment', ''))
  p = float(config_ds.get('random_erasing', 0.0))
  if not 0.0 <= p <= 1.0:
    raise UserError(f'config.dataset.random_erasing: a probability in [0, 1], got {p}')
  if config_ds.get('on_device', False) and (config_ds.get('randaugment', '').strip() or p > 0):
    raise UserError('config.dataset.on_device: the device-resident split crops and flips in '
                    'JAX only; RandAugment and random erasing need the host pipeline '
                    '(on_device=False)')


def fill_colour(mean: Sequence[float]) -> tuple[int, ...]:
  """The fill of geometric operations: the dataset mean in 0..255 (timm's `img_mean`)."""
  return tuple(min(255, round(255 * float(m))) for m in mean)


def _blend(tf: Any, degenerate: Any, image: Any, factor: Any) -> Any:
  """PIL's Image.blend(degenerate, image, factor): interpolate or extrapolate, truncate, clip."""
  return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _luma(tf: Any, image: Any) -> Any:
  """PIL's convert('L'): ITU-R 601-2 luma in 16-bit fixed point, rounded (HxWx1)."""
  weights = tf.constant([19595.0, 38470.0, 7471.0])
  return tf.floor((tf.reduce_sum(image * weights, -1, keepdims=True) + 32768.0) / 65536.0)


def _affine(tf: Any, image: Any, coefficients: Sequence[Any], fill: Any) -> Any:
  """PIL's Image.transform(AFFINE, NEAREST) with fill colour `fill`.

  Output pixel (x, y) takes input pixel (floor(a x' + b y' + c), floor(d x' +
  e y' + f)) at its centre (x', y') = (x + 1/2, y + 1/2), in float64 as PIL
  computes it; pixels that map outside the image get `fill`.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float64) for v in coefficients]
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ys, xs = tf.meshgrid(tf.cast(tf.range(h), tf.float64) + 0.5,
                       tf.cast(tf.range(w), tf.float64) + 0.5, indexing='ij')
  x_in = tf.cast(tf.floor(a * xs + b * ys + c), tf.int32)
  y_in = tf.cast(tf.floor(d * xs + e * ys + f), tf.int32)
  inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
  pixels = tf.gather_nd(image, tf.stack([tf.clip_by_value(y_in, 0, h - 1),
                                         tf.clip_by_value(x_in, 0, w - 1)], -1))
  return tf.where(inside[..., None], pixels, fill)


def _equalize(tf: Any, image: Any) -> Any:
  """Per-channel histogram equalisation (PIL's ImageOps.equalize)."""
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.where(step > 0, tf.gather(lut, c), c), tf.float32)
  return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def _sharpness_degenerate(tf: Any, image: Any) -> Any:
  """PIL's ImageFilter.SMOOTH, rounded, with the one-pixel border left as it was."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  inner = tf.round(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0])
  pad = [[1, 1], [1, 1], [0, 0]]
  border = tf.pad(tf.zeros_like(inner[..., :1]), pad, constant_values=1.0) > 0
  return tf.where(border, image, tf.pad(inner, pad))


def _apply_op(tf: Any, index: Any, image: Any, level: float, sign: Any,
              fill: Sequence[float] = (128, 128, 128)) -> Any:
  """Operation `index` of OPS at level M / 10 with direction `sign` (+-1), on uint8 values.

  `image` is float32 HxWx3 holding integers in 0..255; so is the result.
  """
  fill = tf.constant(fill, tf.float32)
  factor = tf.maximum(1.0 + sign * 0.9 * level, 0.1)
  # Geometry in float64, as PIL computes it.
  h = tf.cast(tf.shape(image)[0], tf.float64)
  w = tf.cast(tf.shape(image)[1], tf.float64)
  sign64 = tf.cast(sign, tf.float64)
  shear, shift = sign64 * (level * 0.3), sign64 * (level * 0.45)

  def rotate():  # PIL's Image.rotate: counter-clockwise about the centre (w/2, h/2).
    angle = -sign64 * (level * 30.0 * math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = w / 2, h / 2
    return _affine(tf, image, [cos, sin, cx - cos * cx - sin * cy,
                               -sin, cos, cy + sin * cx - cos * cy], fill)

  def autocontrast():  # PIL's ImageOps.autocontrast (cutoff 0), per channel, in float64 as PIL.
    x = tf.cast(image, tf.float64)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    scaled = tf.clip_by_value(tf.floor(x * scale - lo * scale), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, scaled, x), tf.float32)

  def posterize():  # Keeps the top 8 - int(4 M / 10) bits.
    shift_bits = int(min(level, 1.0) * 4)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(
        tf.cast(image, tf.uint8), shift_bits), shift_bits), tf.float32)

  def contrast():  # Degenerate: the rounded mean luma everywhere.
    mean = tf.floor(tf.reduce_mean(_luma(tf, image)) + 0.5)
    return _blend(tf, tf.fill(tf.shape(image), mean), image, factor)

  branches = [
      lambda: image,
      autocontrast,
      lambda: _equalize(tf, image),
      rotate,
      # Inverts pixels >= 256 - int(256 M / 10) (none at M = 0).
      lambda: tf.where(image >= 256.0 - float(int(256 * min(level, 1.0))), 255.0 - image, image),
      lambda: _blend(tf, tf.tile(_luma(tf, image), [1, 1, 3]), image, factor),
      posterize,
      contrast,
      lambda: _blend(tf, tf.zeros_like(image), image, factor),
      lambda: _blend(tf, _sharpness_degenerate(tf, image), image, factor),
      lambda: _affine(tf, image, [1.0, shear, 0.0, 0.0, 1.0, 0.0], fill),
      lambda: _affine(tf, image, [1.0, 0.0, 0.0, shear, 1.0, 0.0], fill),
      lambda: _affine(tf, image, [1.0, 0.0, shift * w, 0.0, 1.0, 0.0], fill),
      lambda: _affine(tf, image, [1.0, 0.0, 0.0, 0.0, 1.0, shift * h], fill),
  ]
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def randaugment(tf: Any, image: Any, n: int, magnitude: float, seed: Any,
                fill: Sequence[float] = (128, 128, 128)) -> Any:
  """N random operations at magnitude M on a float32 HxWx3 image of 0..255 values.

  The image is rounded to uint8 values first (a resize leaves fractions), as
  the references run on uint8 images; the result holds uint8 values too.
  """
  seeds = tf.random.experimental.stateless_split(seed, 2 * n)
  level = magnitude / 10.0
  image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
  for i in range(n):
    index = tf.random.stateless_uniform([], seeds[2 * i], 0, len(OPS), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], seeds[2 * i + 1]) < 0.5, -1.0, 1.0)
    image = _apply_op(tf, index, image, level, sign, fill)
  return image


def random_erasing(tf: Any, image: Any, probability: float, seed: Any) -> Any:
  """One erased box (normal noise) with probability p, on a normalised image (HxWxC)."""
  seeds = tf.random.experimental.stateless_split(seed, 6)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # timm's 10 attempts, drawn at once; the first box that fits is used.
  area = tf.cast(h * w, tf.float32) * tf.random.stateless_uniform(
      [ERASE_ATTEMPTS], seeds[0], *ERASE_AREA)
  ratio = tf.exp(tf.random.stateless_uniform(
      [ERASE_ATTEMPTS], seeds[1], math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])))
  heights = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  widths = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = (heights < h) & (widths < w)
  first = tf.argmax(tf.cast(fits, tf.int32))
  eh = tf.where(fits[first], heights[first], 0)
  ew = tf.where(fits[first], widths[first], 0)
  top = tf.random.stateless_uniform([], seeds[2], 0, h - eh + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[3], 0, w - ew + 1, tf.int32)
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
  noise = tf.random.stateless_normal(tf.shape(image), seeds[4])
  erase = tf.random.stateless_uniform([], seeds[5]) < probability
  return tf.where(inside & erase, noise, image)
