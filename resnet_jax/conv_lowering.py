"""How the ResNets' convolutions are lowered: XLA's convolution, or a matmul of patches.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so Flax's
`nn.Conv(conv_general_dilated=...)` takes it and the parameters stay the same
(`kernel` is HWIO either way; checkpoints and converted weights are unchanged).

On CPU, XLA's convolution is pathological when the kernel is larger than a tiny
output: ResNet-50 at 64px ends in 2x2 feature maps, and there one 3x3 512->512
convolution (batch 32) took 324 ms forward and about 290 ms for its gradients on
the 2-core development machine, where the same product as a matmul of its 3x3
patches takes 2.8 ms forward and 7.3 ms with gradients (`scripts/benchmark.py`,
docs/benchmarks.md). At 4x4 outputs the two are equal, and from 8x8 up XLA's
convolution is faster (up to 4x at 32x32). So on CPU a convolution whose output
has at most `PATCHES_MAX_OUTPUT_PIXELS` pixels per example becomes patches @
kernel; everything else, and every convolution on GPU and TPU (cuDNN and the TPU
compiler have no such cliff), stays XLA's own. The matmul sums the same products
in another order, so results agree to float rounding, not bit for bit. The
rule is applied when the model is traced: a model exported on CPU
(`export.py`) carries the matmul form for those layers, the same function.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Output pixels per example (H_out * W_out) at or below which CPU convolutions are matmuls.
DEFAULT_PATCHES_MAX_OUTPUT_PIXELS = 4
PATCHES_MAX_OUTPUT_PIXELS = DEFAULT_PATCHES_MAX_OUTPUT_PIXELS  # 0: XLA's convolution everywhere.


def _pairs(padding: Any) -> tuple[tuple[int, int], ...] | None:
  if isinstance(padding, str):
    return None
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _ones(value: Sequence[int] | None) -> bool:
  return value is None or all(int(v) == 1 for v in value)


def patches_apply(lhs, rhs, window_strides, padding, dimension_numbers,
                  feature_group_count: int = 1, lhs_dilation=None, rhs_dilation=None) -> bool:
  """Whether this convolution is one the patches form handles (NHWC/HWIO, undilated, ungrouped,
  explicit padding, a kernel larger than 1x1)."""
  pads = _pairs(padding)
  if lhs.ndim != 4 or dimension_numbers is None:
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return (given == nhwc and pads is not None and feature_group_count == 1 and _ones(lhs_dilation)
          and _ones(rhs_dilation) and rhs.shape[0] * rhs.shape[1] > 1)


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - kernel) // stride + 1


def _selection(h: int, w: int, kh: int, kw: int, strides: tuple[int, int],
               pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
  """0/1 matrix [ho*wo*kh*kw, h*w]: row (output pixel, tap) picks the input pixel under that
  tap, or nothing where the tap lies in the padding."""
  (ph, pw), (sh, sw) = pads, strides
  ho, wo = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
  sel = np.zeros((ho, wo, kh, kw, h, w), np.float32)
  for oy, ox, i, j in itertools.product(range(ho), range(wo), range(kh), range(kw)):
    y, x = oy * sh + i - ph[0], ox * sw + j - pw[0]
    if 0 <= y < h and 0 <= x < w:
      sel[oy, ox, i, j, y, x] = 1.0
  return sel.reshape(ho * wo * kh * kw, h * w)


def conv_as_patches(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                    padding: Sequence[tuple[int, int]], precision=None,
                    preferred_element_type=None) -> jax.Array:
  """An NHWC x HWIO convolution as two matmuls: a 0/1 selection gathers each output pixel's
  patch (N, Ho*Wo*kh*kw, C), which then meets the kernel as (N*Ho*Wo, kh*kw*C) @ (kh*kw*C, O).

  The selection copies pixels exactly (one 1 per row, zeros elsewhere), so the patches are
  the input's values; two dots keep the program small (a slice per tap made the tiny
  models' train step a fifth slower to compile).
  """
  n, h, w, c = lhs.shape
  kh, kw, _, o = rhs.shape
  strides = tuple(int(s) for s in window_strides)
  pads = _pairs(padding)
  ho, wo = output_size(h, kh, strides[0], pads[0]), output_size(w, kw, strides[1], pads[1])
  sel = jnp.asarray(_selection(h, w, kh, kw, strides, pads), lhs.dtype)
  cols = jnp.einsum('rq,nqc->nrc', sel, lhs.reshape(n, h * w, c), precision=precision)
  y = jnp.dot(cols.reshape(n * ho * wo, kh * kw * c), rhs.reshape(kh * kw * c, o),
              precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(n, ho, wo, o)


def use_patches(lhs, rhs, window_strides, padding, dimension_numbers, feature_group_count=1,
                lhs_dilation=None, rhs_dilation=None, platform: str | None = None) -> bool:
  """The rule: on CPU, a convolution the patches form handles with a tiny output."""
  platform = platform or jax.default_backend()
  if platform != 'cpu' or not patches_apply(lhs, rhs, window_strides, padding,
                                            dimension_numbers, feature_group_count,
                                            lhs_dilation, rhs_dilation):
    return False
  (ph, pw) = _pairs(padding)
  ho = output_size(lhs.shape[1], rhs.shape[0], int(window_strides[0]), ph)
  wo = output_size(lhs.shape[2], rhs.shape[1], int(window_strides[1]), pw)
  return ho * wo <= PATCHES_MAX_OUTPUT_PIXELS


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, as patches @ kernel where `use_patches` says so."""
  if batch_group_count == 1 and use_patches(lhs, rhs, window_strides, padding,
                                            dimension_numbers, feature_group_count,
                                            lhs_dilation, rhs_dilation):
    return conv_as_patches(lhs, rhs, window_strides, padding, precision, preferred_element_type)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
