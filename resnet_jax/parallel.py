"""Data parallelism: one step body, wrapped by `jax.jit` over a mesh or by `jax.pmap`.

* `jit`: a 1-D mesh over all devices; the batch is sharded on its leading axis
  and the state replicated. XLA inserts the cross-device reductions, so BatchNorm
  statistics are already global and its `axis_name` must be None.
* `pmap`: each device holds a replica; the step body averages gradients and
  metrics over `axis_name` explicitly, and BatchNorm (given the same axis_name)
  averages its own statistics, so they are never averaged a second time.

With `exact` (`config.exact_reductions`) every cross-device sum of training is
`reductions.exact_psum`, in device order, so the run is bit-identical on any
split of the same devices into processes; `jit` then runs the step body under
`shard_map` over the mesh (axis `data`), as pmap does, since XLA's own
reductions cannot be given an order.

Multi-host: each process feeds its local slice of the global batch. `jit` builds
global arrays from the local pieces; `pmap` is given the same global device list
on every process (each process's devices contiguous, as its mesh needs) and
turns each process's (local devices, ...) arrays into global ones itself.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError

PMAP_AXIS = 'batch'
MESH_AXIS = 'data'
MODES = ('jit', 'pmap')


def pmap_device_order(devices: list[Any]) -> list[Any]:
  """The devices grouped by process (stable); every process must hold as many.

  pmap needs the same device list on every process, with each process's devices
  contiguous (its host-local inputs are one block of the global mesh), and
  splits the mapped axis evenly over the processes.
  """
  counts = collections.Counter(d.process_index for d in devices)
  if len(counts) != jax.process_count() or len(set(counts.values())) > 1:
    raise UserError('config.parallelism: pmap needs the same number of devices on each of '
                    f'the {jax.process_count()} processes, got {dict(sorted(counts.items()))} '
                    '(process: devices)')
  return sorted(devices, key=lambda d: d.process_index)


class Parallel:
  """How arrays are placed and steps compiled for one parallelism mode."""

  def __init__(self, mode: str = 'jit', devices: list[jax.Device] | None = None,
               exact: bool = False):
    if mode not in MODES:
      raise UserError(f'config.parallelism: unknown mode {mode!r}; choose jit or pmap')
    self.mode = mode
    self.exact = bool(exact)
    self.devices = list(devices) if devices is not None else jax.devices()
    if mode == 'pmap':
      self.devices = pmap_device_order(self.devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.asarray(self.devices), (MESH_AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(MESH_AXIS))
    # pmap's per-process view: one slice per local device along a leading axis.
    self.stacked = (NamedSharding(Mesh(np.asarray(self.local_devices), ('replica',)), P('replica'))
                    if mode == 'pmap' and self.local_devices else None)

  @property
  def bn_axis_name(self) -> str | None:
    """The axis BatchNorm averages over: None where XLA's SPMD partitioner does it."""
    if self.mode == 'pmap':
      return PMAP_AXIS
    return MESH_AXIS if self.exact else None

  def check_batch(self, field: str, global_batch: int) -> int:
    """Validates a global batch size and returns the per-process batch size."""
    if global_batch <= 0:
      raise UserError(f'{field}: must be positive, got {global_batch}')
    n = len(self.devices)
    if global_batch % n:
      raise UserError(f'{field}: {global_batch} does not divide over {n} devices')
    return global_batch // jax.process_count()

  def put_state(self, state: Any) -> Any:
    if self.mode == 'jit':
      return jax.device_put(state, self.replicated)
    # pmap: one copy per local device along a new leading axis.
    d = len(self.local_devices)
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (d,) + np.shape(x)),
                                 self.stacked),
        state)

  def get_state(self, state: Any) -> Any:
    """A host copy of one replica (numpy arrays)."""
    if self.mode == 'pmap':
      return jax.tree.map(_local_replica, state)
    return jax.device_get(state)

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    if self.mode == 'jit':
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)
    # On the devices now, so that prefetch_to_device overlaps the transfer with a step.
    d = len(self.local_devices)
    return jax.tree.map(
        lambda x: jax.device_put(np.reshape(x, (d, -1) + np.shape(x)[1:]), self.stacked), batch)

  def put_stop_flag(self, signum: int) -> Any:
    """This process's stop request (a signal number, 0 for none) as one value per local device.

    Added to a training batch as 'stop'; the step reduces it over all devices
    (`make_train_step`), so every process reads the same verdict from the
    step's metrics and stops at the same step, with no extra round trip.
    """
    local = np.full((len(self.local_devices),), signum, np.int32)
    if self.mode == 'jit':
      return jax.make_array_from_process_local_data(self.batch_sharding, local)
    return jax.device_put(local, self.stacked)

  def compile(self, fn: Callable[..., Any], donate_state: bool = True,
              compiler_options: dict[str, str] | None = None) -> Callable[..., Any]:
    """Wraps fn(state, batch) -> (state_or_metrics, ...) for this mode.

    `compiler_options` (XLA options, e.g. `models.compiler_options`) apply under
    jit; jax.pmap takes none.
    """
    donate = (0,) if donate_state else ()
    if self.mode == 'jit' and self.exact:
      # Replicated state and outputs, the batch split over the mesh; the body sums
      # across devices itself (`reductions.exact_psum`). check_vma is off because
      # values made replicated by an all_gather are typed as varying.
      mapped = jax.shard_map(functools.partial(fn, axis_name=MESH_AXIS), mesh=self.mesh,
                             in_specs=(P(), P(MESH_AXIS)), out_specs=P(), check_vma=False)
      return jax.jit(mapped, donate_argnums=donate, compiler_options=compiler_options)
    if self.mode == 'jit':
      return jax.jit(fn, donate_argnums=donate, compiler_options=compiler_options)
    # The global list, identical on every process: pmap's mesh spans all of them and
    # its collectives (gradient and BatchNorm averages) run over every device.
    return jax.pmap(functools.partial(fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS,
                    donate_argnums=donate, devices=tuple(self.devices))

  def get_metrics(self, metrics: Any) -> Any:
    """Host values of metrics that are identical on every replica."""
    if self.mode == 'pmap':
      return jax.tree.map(_local_replica, metrics)
    return jax.device_get(metrics)


def _local_replica(x: Any) -> np.ndarray:
  """pmap output -> the replica on one of this process's devices, as numpy.

  Read from the device's own buffer: `x[0]` is a computation over the global
  array, which every process has to run, and several of them in flight on CPU
  deadlocked two processes in their gloo collectives.
  """
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_shards[0].data)[0]
  return np.asarray(x)[0]
