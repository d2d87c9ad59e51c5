"""Times training's parts and prints one JSON line (the last line of stdout).

  python scripts/benchmark.py --config=configs/cifar10.py --steps=10 [--config.batch_size=128]
  python scripts/benchmark.py --config=configs/cifar10.py --steps=5 --compare-torch
  python scripts/benchmark.py --mode=input --config=... --config.dataset.name=image_folder ...
  python scripts/benchmark.py --mode=loop --config=configs/cifar10.py --steps=20

--mode=step (default) times the bare jitted train step on a synthetic batch.
--mode=input times the host input pipeline alone (`Data.train_iter`, no model):
images/s and images/s per CPU core. --mode=loop times the training loop's own
per-step path (`loop.Loop`: iterator, step, per-step metrics, log lines) on a
device-resident synthetic batch against the bare step on the same compiled
step, batch and state, in alternating rounds: loop_efficiency = loop / step.

Needs only jax, flax, optax, numpy and ml-collections (no TensorFlow), so it
runs on accelerator machines that lack the rest. With --compare-torch the same
network (same architecture, stem, width and batch) trains in PyTorch in the
same process (channels_last, PyTorch's fastest layout, unless
--notorch_channels_last), and the two are timed in alternating rounds; the best
round of each side gives the ratio, so it holds even on a noisy shared machine.
XLA options go in XLA_FLAGS as usual.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resnet_jax  # noqa: E402,F401  (the project's XLA_FLAGS, before JAX starts)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('mode', 'step', 'step: the bare train step; input: the host input '
                    'pipeline; loop: the training loop against the bare step.')
flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
flags.DEFINE_integer('warmup', 3, '--mode=input: batches read before the clock starts.')
flags.DEFINE_integer('rounds', 3, 'Timing rounds (alternating with torch when comparing).')
flags.DEFINE_integer('num_classes', 10, 'Classes of the synthetic task.')
flags.DEFINE_bool('compare_torch', False, 'Also time the same network in PyTorch.')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0: torch default).')
flags.DEFINE_bool('torch_channels_last', True, 'PyTorch in channels_last (its fastest layout).')
FLAGS = flags.FLAGS

# Dense bf16 / fp32 peak FLOP/s per device, for MFU where the device is known.
PEAK_FLOPS = {
    'H100': {'bfloat16': 989e12, 'float32': 67e12},
    'H200': {'bfloat16': 989e12, 'float32': 67e12},
    'A100': {'bfloat16': 312e12, 'float32': 19.5e12},
    'V100': {'bfloat16': 125e12, 'float32': 15.7e12},
    'L4': {'bfloat16': 121e12, 'float32': 30.3e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return PEAK_FLOPS[key].get(dtype)
  return None


def global_flops(compiled, num_devices: int, grad_accum_steps: int = 1) -> float | None:
  """FLOPs of one step over the whole global batch, from XLA's cost analysis.

  The analysis describes the program one device runs: under SPMD each device
  convolves 1/D of the batch, so the step's work is D times that (the small
  replicated part, the optimizer update, is then counted D times). It also
  counts a loop body once, and gradient accumulation runs the forward and
  backward passes as a k-step `lax.scan`, so those are k times what it says.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_device = float((cost or {}).get('flops', 0.0))
  return per_device * num_devices * grad_accum_steps if per_device > 0 else None


class JaxBench:
  """The project's own train step, state and optimizer on a fixed synthetic batch."""

  def __init__(self, config, num_classes: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnet_jax import models, optim, train
    self.jax = jax
    setup = train.Setup(config, num_classes, 50_000, int(config.dataset.image_size))
    self.setup = setup
    state = setup.make_state(setup.fresh_variables)
    step = train.make_train_step(
        setup.model, setup.tx, setup.schedule, num_classes,
        grad_accum_steps=int(config.get('grad_accum_steps', 1)),
        trainable=optim.trainable_mask(setup.spec, setup.fresh_variables['params']),
        exact_reductions=setup.par.exact)
    rng = np.random.default_rng(0)
    size = int(config.dataset.image_size)
    b = int(config.batch_size)
    batch = {'image': rng.normal(size=(b, size, size, 3)).astype(np.float32),
             'label': rng.integers(0, num_classes, b).astype(np.int32)}
    self.batch_host = batch
    par = setup.par
    self.batch = par.put_batch(batch)
    self.state = par.put_state(state)
    self.flops = None
    # The options training compiles with (remat on CPU needs one).
    options = models.compiler_options(config.model, par.devices[0].platform)
    t0 = time.perf_counter()
    if par.mode == 'jit':
      # par.compile: under exact_reductions jit runs the step inside shard_map.
      compiled = par.compile(step, compiler_options=options).lower(self.state, self.batch).compile()
      self.compile_time = time.perf_counter() - t0
      self.flops = global_flops(compiled, len(par.devices),
                                int(config.get('grad_accum_steps', 1)))
      self.step = compiled
    else:
      self.step = par.compile(step)
      self.state, m = self.step(self.state, self.batch)
      jax.block_until_ready(m)
      self.compile_time = time.perf_counter() - t0
    self.state, m = self.step(self.state, self.batch)   # Warm-up.
    jax.block_until_ready(m)
    del jnp

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    self.jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - t0) / steps


class TorchBench:
  """The same network in PyTorch: SGD (Nesterov, weight decay), eager mode.

  On CUDA it uses channels_last and bfloat16 autocast when the config asks for
  bfloat16, as a PyTorch user would.
  """

  def __init__(self, config, num_classes: int, batch_host, threads: int,
               channels_last: bool = True):
    import torch

    from resnet_jax import torch_reference
    if threads:
      torch.set_num_threads(threads)
    self.torch = torch
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    m = config.model
    model = torch_reference.build(m.name, num_classes, m.stem, float(m.width_multiplier))
    self.amp = self.device == 'cuda' and m.dtype == 'bfloat16'
    # channels_last: PyTorch's fastest layout for convolutions on CPUs (oneDNN) and GPUs.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.channels_last = channels_last
    self.model = model.to(self.device, memory_format=fmt).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                               weight_decay=float(config.optimizer.weight_decay))
    self.x = torch.from_numpy(batch_host['image'].transpose(0, 3, 1, 2).copy()).to(
        self.device).contiguous(memory_format=fmt)
    self.y = torch.from_numpy(batch_host['label']).long().to(self.device)
    self.run(1)

  def _step(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.amp):
      loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    self.opt.step()

  def run(self, steps: int) -> float:
    sync = self.torch.cuda.synchronize if self.device == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
      self._step()
    sync()
    return (time.perf_counter() - t0) / steps


def benchmark(config, steps: int, rounds: int, num_classes: int, compare_torch: bool,
              torch_threads: int = 0, torch_channels_last: bool = True) -> dict:
  import jax
  jb = JaxBench(config, num_classes)
  tb = (TorchBench(config, num_classes, jb.batch_host, torch_threads, torch_channels_last)
        if compare_torch else None)
  jax_times, torch_times = [], []
  for _ in range(rounds):
    jax_times.append(jb.run(steps))
    if tb is not None:
      torch_times.append(tb.run(steps))
  b = int(config.batch_size)
  # The best round of each side: on a shared machine the slower rounds measure the others.
  step_time = min(jax_times)
  devices = jb.setup.par.devices
  dtype = config.model.dtype
  result = {
      'mode': 'step', 'model': config.model.name, 'stem': config.model.stem or 'default',
      'image_size': int(config.dataset.image_size), 'batch_size': b, 'dtype': dtype,
      'parallelism': jb.setup.par.mode,
      'images_per_sec': b / step_time, 'step_time_ms': 1000 * step_time,
      'round_ms': [1000 * x for x in jax_times],
      'compile_time_s': jb.compile_time, 'compile_seconds': jb.compile_time,
      'num_devices': len(devices),
      'device_kind': devices[0].device_kind,
      'flops_per_image': jb.flops / b if jb.flops else None, 'mfu': None,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  peak = peak_flops(devices[0].device_kind, dtype)
  if peak and jb.flops:
    result['mfu'] = jb.flops / step_time / (peak * len(devices))
  if tb is not None:
    t = min(torch_times)
    result.update({'torch_images_per_sec': b / t, 'torch_step_time_ms': 1000 * t,
                   'torch_device': tb.device, 'torch_amp_bf16': tb.amp,
                   'torch_channels_last': tb.channels_last,
                   'torch_round_ms': [1000 * x for x in torch_times],
                   'jax_over_torch': t / step_time})
  del jax
  return result


def benchmark_input(config, steps: int, warmup: int = 3) -> dict:
  """The host input pipeline alone: `create_data(config)`, then `Data.train_iter` batches.

  No model and no device: what one process's tf.data feed (decode, augment,
  normalise, batch) delivers per second. `images` counts what the timed
  batches held.
  """
  from resnet_jax import input_pipeline, preprocess
  data = input_pipeline.create_data(config)
  b = int(config.batch_size)
  # As training reads them: uint8 unless the host must normalise (preprocess.sends_uint8).
  uint8 = preprocess.sends_uint8(config.dataset)
  batches = data.train_iter(b, as_uint8=uint8)
  for _ in range(warmup):
    next(batches)
  images = 0
  t0 = time.perf_counter()
  for _ in range(steps):
    images += int(next(batches)['image'].shape[0])
  seconds = time.perf_counter() - t0
  from resnet_jax.grain_loader import cpu_cores  # The cores this process may use.
  cores = cpu_cores()
  rate = images / seconds
  cds = config.dataset
  return {'mode': 'input', 'dataset': cds.name, 'image_size': int(cds.image_size),
          'augment': input_pipeline.augment_kind(cds),
          'randaugment': cds.get('randaugment', '') or None, 'batch_size': b,
          'transfer': 'uint8' if uint8 else 'float32',
          'decode_once': bool(cds.get('decode_once', True)),
          'steps': steps, 'warmup_batches': warmup, 'images': images, 'seconds': seconds,
          'images_per_sec': rate, 'images_per_sec_per_core': rate / cores, 'cores': cores}


class _NoCheckpoint:
  def save(self, *args, **kwargs) -> None:
    del args, kwargs


class _NoReport:
  def train_metrics(self, step, means) -> None:
    del step, means

  def eval_results(self, step, res, final=False, **kwargs) -> dict:
    del res, final, kwargs
    return {'step': step, 'accuracy': 0.0}


class LoopBench:
  """`loop.Loop.run` over the bench's compiled step and a device-resident batch.

  The loop does all it does per step in training (next batch, step, StepMetrics'
  host copy of the previous step's metrics, log lines every log_every steps);
  evaluation and checkpoints are no-ops outside the clock. The clock runs from
  the end of the loop's first step (as the loop's own images/s does) until the
  final state is ready, before the loop copies it to the host.
  """

  def __init__(self, jb: 'JaxBench', log_every: int):
    self.jb = jb
    self.log_every = log_every

  def run(self, steps: int) -> float:
    from resnet_jax import loop
    jax, jb = self.jb.jax, self.jb
    clock: dict = {}

    def batches():
      yield jb.batch
      clock['start'] = time.perf_counter()  # Step 1 has finished (the loop waits for it).
      while True:
        yield jb.batch

    def get_state(state):
      jax.block_until_ready(state)
      clock['end'] = time.perf_counter()
      jb.state = state   # The loop donated the old one; carry on from this.
      return jb.setup.par.get_state(state)

    never = steps + 2
    loop.Loop(train_step=jb.step, evaluate=lambda s: {'loss': 0.0}, get_state=get_state,
              get_metrics=jb.setup.par.get_metrics, ckpt=_NoCheckpoint(), rep=_NoReport(),
              meta={}, total=steps + 1, log_every=self.log_every, eval_every=never,
              ckpt_every=never, global_batch=int(jb.batch_host['label'].shape[0]),
              ).run(jb.state, batches(), 0, loop.Preemption())
    return (clock['end'] - clock['start']) / steps


def benchmark_loop(config, steps: int, rounds: int, num_classes: int) -> dict:
  """Training loop vs bare step: same compiled step, batch and state, alternating rounds."""
  jb = JaxBench(config, num_classes)
  lb = LoopBench(jb, int(config.log_every_steps) or steps + 1)
  loop_times, step_times = [], []
  for _ in range(rounds):
    step_times.append(jb.run(steps))
    loop_times.append(lb.run(steps))
  b = int(config.batch_size)
  loop_rate, step_rate = b / min(loop_times), b / min(step_times)
  return {'mode': 'loop', 'model': config.model.name, 'image_size': int(config.dataset.image_size),
          'batch_size': b, 'dtype': config.model.dtype, 'steps': steps, 'rounds': rounds,
          'log_every': lb.log_every, 'loop_images_per_sec': loop_rate,
          'step_images_per_sec': step_rate, 'loop_efficiency': loop_rate / step_rate,
          'loop_step_ms': [1000 * t for t in loop_times],
          'bare_step_ms': [1000 * t for t in step_times],
          'compile_seconds': jb.compile_time, 'num_devices': len(jb.setup.par.devices),
          'device_kind': jb.setup.par.devices[0].device_kind}


MODES = ('step', 'input', 'loop')


def main(argv):
  del argv
  from resnet_jax.errors import UserError
  if FLAGS.mode not in MODES:
    print(f'error: --mode: choose {", ".join(MODES)}; got {FLAGS.mode!r}', file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.mode == 'input':
      result = benchmark_input(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    elif FLAGS.mode == 'loop':
      result = benchmark_loop(FLAGS.config, FLAGS.steps, FLAGS.rounds, FLAGS.num_classes)
    else:
      result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.rounds, FLAGS.num_classes,
                         FLAGS.compare_torch, FLAGS.torch_threads, FLAGS.torch_channels_last)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except ImportError as e:
    print(f'error: {e.name} is not installed (--compare-torch needs torch)', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
