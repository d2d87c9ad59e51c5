"""ResNet family in Flax linen: torchvision v1.5 ResNets and the He et al. CIFAR ResNets.

Parameter paths are the public interface: `stem/conv`, `stem/bn`,
`stage{K}/block{J}/{conv1,bn1,conv2,bn2[,conv3,bn3][,proj_conv,proj_bn]}` and
`head`. Freeze regexes, `dont_load` and the torchvision converter all speak them.

Two attributes carry fine-tuning decisions into the forward pass (both come from
`optim.ParamSpec`, the single source of truth for "frozen"):
  * `frozen_bn`: module paths of BatchNorm layers that must use their running
    averages (so their statistics stay fixed even in training mode);
  * `stop_gradient_after`: the last top-level module of a frozen prefix; its
    output is wrapped in `stop_gradient` so no backward pass runs through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import conv_lowering
from resnet_jax.errors import UserError

# Kaiming-normal (fan_out, untruncated) as in He et al. and torchvision.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torchvision's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
head_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

TOP_LEVEL_ORDER = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')


class ExactBatchNorm(nn.Module):
  """BatchNorm whose cross-device statistics are `reductions.exact_pmean`s.

  flax's `nn.BatchNorm` averages its batch statistics with `lax.pmean`, whose
  summation order depends on the collective's implementation (see
  `reductions`); this one sums in device order, so training is bit-identical
  on any split of the same devices into processes. Same parameters (`scale`,
  `bias`), statistics (`mean`, `var`), momentum convention and one-pass
  variance as flax's; used only with `config.exact_reductions`.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str | None = None
  scale_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    from resnet_jax import reductions  # pylint: disable=import-outside-toplevel
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      moments = jnp.stack([xf.mean(axes), jnp.square(xf).mean(axes)])
      if self.axis_name is not None:
        moments = reductions.exact_pmean(moments, self.axis_name)
      mean = moments[0]
      var = jnp.maximum(0.0, moments[1] - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * mul + bias
    return y.astype(self.dtype)


class _Base(nn.Module):
  """Shared helpers: conv and BatchNorm built the same way everywhere."""
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9  # Flax convention: weight of the old average.
  frozen_bn: frozenset[str] = frozenset()
  exact_bn: bool = False  # ExactBatchNorm (config.exact_reductions).

  def conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   dtype=self.dtype, kernel_init=conv_init, name=name,
                   conv_general_dilated=conv_lowering.conv_general_dilated)

  def norm(self, name: str, train: bool, zero_scale: bool = False) -> nn.Module:
    path = '/'.join(self.path + (name,))
    cls = ExactBatchNorm if self.exact_bn and self.bn_axis_name is not None else nn.BatchNorm
    return cls(
        use_running_average=(not train) or path in self.frozen_bn,
        momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
        axis_name=self.bn_axis_name,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name)

  def _children_kwargs(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                bn_momentum=self.bn_momentum, frozen_bn=self.frozen_bn, exact_bn=self.exact_bn)


def drop_path(module: nn.Module, y: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth on a residual branch: per example, drop it with probability `rate`
  and scale the kept ones by 1 / (1 - rate), so its expectation is unchanged; identity
  in evaluation. Uses the 'dropout' random stream."""
  if not train or rate <= 0.0:
    return y
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, (y.shape[0],) + (1,) * (
      y.ndim - 1))
  return jnp.where(keep, y / (1.0 - rate), jnp.zeros_like(y))


def drop_path_rates(stage_sizes: Sequence[int], rate: float) -> list[float]:
  """Per-block rates rising linearly from 0 (first block) to `rate` (last), as timm's
  `linspace(0, drop_path_rate, num_blocks)` (Huang et al. 2016's linear decay rule)."""
  n = int(sum(stage_sizes))
  return [rate * i / (n - 1) if n > 1 else rate for i in range(n)]


class BasicBlock(_Base):
  """Two 3x3 convs; a 1x1 conv + BN projection when the shape changes."""
  features: int = 64
  strides: int = 1
  zero_init_residual: bool = False
  drop_path: float = 0.0
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = self.conv(self.features, 3, self.strides, 'conv1')(x)
    y = nn.relu(self.norm('bn1', train)(y))
    y = self.conv(self.features, 3, 1, 'conv2')(y)
    y = self.norm('bn2', train, zero_scale=self.zero_init_residual)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features, 1, self.strides, 'proj_conv')(residual)
      residual = self.norm('proj_bn', train)(residual)
    return nn.relu(residual + drop_path(self, y, self.drop_path, train))


class BottleneckBlock(_Base):
  """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand by 4."""
  features: int = 64
  strides: int = 1
  zero_init_residual: bool = False
  drop_path: float = 0.0
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = self.conv(self.features, 1, 1, 'conv1')(x)
    y = nn.relu(self.norm('bn1', train)(y))
    y = self.conv(self.features, 3, self.strides, 'conv2')(y)
    y = nn.relu(self.norm('bn2', train)(y))
    y = self.conv(self.features * 4, 1, 1, 'conv3')(y)
    y = self.norm('bn3', train, zero_scale=self.zero_init_residual)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features * 4, 1, self.strides, 'proj_conv')(residual)
      residual = self.norm('proj_bn', train)(residual)
    return nn.relu(residual + drop_path(self, y, self.drop_path, train))


class Stage(_Base):
  """A run of residual blocks; the first one may downsample."""
  block_cls: Callable[..., nn.Module] = BasicBlock
  num_blocks: int = 2
  features: int = 64
  strides: int = 1
  zero_init_residual: bool = False
  drop_paths: tuple[float, ...] = ()  # Per block; () = none.
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # remat: the block's activations are recomputed in the backward pass instead of
    # kept (static_argnums counts self: 2 is `train`). Names, hence parameter paths, stay.
    block_cls = nn.remat(self.block_cls, static_argnums=(2,)) if self.remat else self.block_cls
    for j in range(self.num_blocks):
      x = block_cls(features=self.features,
                    strides=self.strides if j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    drop_path=self.drop_paths[j] if self.drop_paths else 0.0,
                    name=f'block{j}', **self._children_kwargs())(x, train)
    return x


class Stem(_Base):
  """`imagenet`: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool. `cifar`: 3x3/1 conv + BN + ReLU."""
  kind: str = 'imagenet'
  features: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == 'imagenet':
      x = self.conv(self.features, 7, 2, 'conv')(x)
      x = nn.relu(self.norm('bn', train)(x))
      return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    x = self.conv(self.features, 3, 1, 'conv')(x)
    return nn.relu(self.norm('bn', train)(x))


class ResNet(_Base):
  """A ResNet. `__call__` returns logits, or (logits, pre-logit features)."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Callable[..., nn.Module] = BasicBlock
  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  stem: str = 'imagenet'
  width_multiplier: float = 1.0
  zero_init_residual: bool = False
  dropout_rate: float = 0.0
  stop_gradient_after: str | None = None
  drop_path_rate: float = 0.0
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    widths = [max(1, int(round(w * self.width_multiplier))) for w in self.widths]
    x = x.astype(self.dtype)
    x = Stem(kind=self.stem, features=widths[0], name='stem',
             **self._children_kwargs())(x, train)
    x = self._maybe_stop('stem', x)
    rates = drop_path_rates(self.stage_sizes, self.drop_path_rate)
    first = 0
    for i, (n, w) in enumerate(zip(self.stage_sizes, widths)):
      name = f'stage{i + 1}'
      x = Stage(block_cls=self.block_cls, num_blocks=n, features=w,
                strides=1 if i == 0 else 2,
                zero_init_residual=self.zero_init_residual, name=name,
                drop_paths=tuple(rates[first:first + n]) if self.drop_path_rate > 0 else (),
                remat=self.remat, **self._children_kwargs())(x, train)
      first += n
      x = self._maybe_stop(name, x)
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, kernel_init=head_init, dtype=jnp.float32,
                      name='head')(y)
    return (logits, features) if return_features else logits

  def _maybe_stop(self, name: str, x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(x) if name == self.stop_gradient_after else x


@dataclasses.dataclass(frozen=True)
class Arch:
  stage_sizes: tuple[int, ...]
  block_cls: Callable[..., nn.Module]
  widths: tuple[int, ...]
  default_stem: str


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

ARCHS: dict[str, Arch] = {
    'resnet18': Arch((2, 2, 2, 2), BasicBlock, _IMAGENET_WIDTHS, 'imagenet'),
    'resnet34': Arch((3, 4, 6, 3), BasicBlock, _IMAGENET_WIDTHS, 'imagenet'),
    'resnet50': Arch((3, 4, 6, 3), BottleneckBlock, _IMAGENET_WIDTHS, 'imagenet'),
    'resnet101': Arch((3, 4, 23, 3), BottleneckBlock, _IMAGENET_WIDTHS, 'imagenet'),
    'resnet152': Arch((3, 8, 36, 3), BottleneckBlock, _IMAGENET_WIDTHS, 'imagenet'),
    'resnet200': Arch((3, 24, 36, 3), BottleneckBlock, _IMAGENET_WIDTHS, 'imagenet'),
    # He et al. 2016, section 4.2: 6n+2 layers, three stages of 16/32/64 channels.
    'resnet20': Arch((3, 3, 3), BasicBlock, _CIFAR_WIDTHS, 'cifar'),
    'resnet32': Arch((5, 5, 5), BasicBlock, _CIFAR_WIDTHS, 'cifar'),
    'resnet44': Arch((7, 7, 7), BasicBlock, _CIFAR_WIDTHS, 'cifar'),
    'resnet56': Arch((9, 9, 9), BasicBlock, _CIFAR_WIDTHS, 'cifar'),
    'resnet110': Arch((18, 18, 18), BasicBlock, _CIFAR_WIDTHS, 'cifar'),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def create_model(model_config: Any, num_classes: int, *,
                 bn_axis_name: str | None = None,
                 frozen_bn: frozenset[str] = frozenset(),
                 stop_gradient_after: str | None = None,
                 exact_bn: bool = False) -> ResNet:
  """Builds the ResNet a `config.model` describes; bad names are UserErrors."""
  name = model_config.name
  if name not in ARCHS:
    raise UserError(f'config.model.name: unknown model {name!r}; choose one of '
                    f'{", ".join(ARCHS)}')
  arch = ARCHS[name]
  stem = model_config.get('stem', '') or arch.default_stem
  if stem not in ('imagenet', 'cifar'):
    raise UserError(f"config.model.stem: unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
  dtype_name = model_config.get('dtype', 'float32')
  if dtype_name not in DTYPES:
    raise UserError(f'config.model.dtype: unknown dtype {dtype_name!r}; choose one of '
                    f'{", ".join(DTYPES)}')
  width = float(model_config.get('width_multiplier', 1.0))
  if width <= 0:
    raise UserError(f'config.model.width_multiplier: must be positive, got {width}')
  dropout = float(model_config.get('dropout_rate', 0.0))
  if not 0.0 <= dropout < 1.0:
    raise UserError(f'config.model.dropout_rate: must be in [0, 1), got {dropout}')
  drop_path_rate = float(model_config.get('drop_path_rate', 0.0))
  if not 0.0 <= drop_path_rate < 1.0:
    raise UserError(f'config.model.drop_path_rate: must be in [0, 1), got {drop_path_rate}')
  remat = model_config.get('remat', 'none')
  if remat not in ('none', 'blocks'):
    raise UserError(f"config.model.remat: choose 'none' or 'blocks', got {remat!r}")
  return ResNet(stage_sizes=arch.stage_sizes, block_cls=arch.block_cls,
                widths=arch.widths, num_classes=num_classes, stem=stem,
                width_multiplier=width,
                zero_init_residual=bool(model_config.get('zero_init_residual', False)),
                dropout_rate=dropout, dtype=DTYPES[dtype_name],
                bn_axis_name=bn_axis_name,
                bn_momentum=float(model_config.get('bn_momentum', 0.9)),
                frozen_bn=frozenset(frozen_bn),
                stop_gradient_after=stop_gradient_after, exact_bn=exact_bn,
                drop_path_rate=drop_path_rate, remat=remat == 'blocks')


def compiler_options(model_config: Any, platform: str) -> dict[str, str] | None:
  """XLA options the train step of this model needs on `platform` (None: none).

  nn.remat marks each recomputation with an optimization barrier, which keeps XLA
  from merging it with the forward pass (CSE) and from running it before the
  backward pass needs it. XLA:CPU expands those barriers early in its pipeline
  (the `cse_barrier_expander` pass); the recomputed blocks are then scheduled in
  the forward pass or merged away and no memory is saved (docs/benchmarks.md).
  So on CPU, with remat on, the train step is compiled without that pass. Applies
  under jit only: jax.pmap takes no compiler options.
  """
  if model_config.get('remat', 'none') != 'none' and platform == 'cpu':
    return {'xla_disable_hlo_passes': 'cse_barrier_expander'}
  return None


def init_variables(model: ResNet, rng: jax.Array, image_size: int) -> dict[str, Any]:
  """Initialises params and batch_stats on a dummy batch of one image."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return dict(model.init({'params': rng, 'dropout': rng}, dummy, train=False))


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


__all__ = ['ARCHS', 'BasicBlock', 'BottleneckBlock', 'ResNet', 'compiler_options', 'create_model',
           'init_variables', 'param_count', 'TOP_LEVEL_ORDER']
