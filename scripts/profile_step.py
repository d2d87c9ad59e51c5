"""Where the CPU train step's time goes: a trace of the step by op kind, and one convolution's parts.

  python scripts/profile_step.py --config=configs/cifar10.py --config.batch_size=128
  python scripts/profile_step.py --config=configs/imagenet_resnet50.py \
    --config.batch_size=32 --config.dataset.image_size=64 --config.model.dtype=float32
  python scripts/profile_step.py --conv=128,32,64,64 [--torch]

Default: compiles the project's train step (`benchmark.JaxBench`, the same as
`benchmark.py --mode=step`), traces `--steps` steps with `jax.profiler`, and
sums XLA:CPU's per-operation trace events by kind (convolution forward,
input gradient, filter gradient, matmul, layout copies, elementwise and
reductions), printing a table and one JSON line. The events are the XLA:CPU
runtime's own; operations that run side by side on the two cores overlap, so
the kinds can sum to more than the step's wall time. Read it with one caveat:
Eigen's convolutions (XLA:CPU's own, the project's default) run on XLA's
intra-op pool and their events cover little more than the dispatch, so their
time shows up inside whatever runs beside them (mostly the layout copies);
YNNPACK's are timed in full. `--conv` times convolutions in isolation.

`--conv=N,H,C,O` times one 3x3 stride-1 convolution of an NxHxHxC batch to O
channels three ways in XLA (forward, input gradient, filter gradient, each
jitted alone), and in PyTorch channels_last with `--torch`: which of the three
is where XLA loses.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resnet_jax  # noqa: E402,F401  (the project's XLA_FLAGS, before JAX starts)
from absl import app, flags  # noqa: E402

import benchmark  # noqa: E402  (its --config flag and JaxBench, the step it times)

flags.DEFINE_integer('trace_steps', 2, 'Traced steps.')
flags.DEFINE_integer('top', 12, 'Slowest operations listed.')
flags.DEFINE_string('conv', None, 'N,H,C,O: time one 3x3 convolution\'s three parts instead.')
flags.DEFINE_bool('torch', False, '--conv: PyTorch (channels_last) too.')
FLAGS = flags.FLAGS

KINDS = ('conv forward', 'conv input gradient', 'conv filter gradient', 'matmul',
         'layout (transpose, copy)', 'elementwise, reductions')


def _instructions(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (output shape, the text that says what it computes)."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r'^%?([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)\n\}', hlo, re.M | re.S)}
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$', hlo, re.M):
    name, shape, op, rest = m.groups()
    text = f'{op}({rest}'
    called = re.search(r'calls=%?([\w.\-]+)', rest)
    if called:
      text += bodies.get(called.group(1), '')
    out[name] = (shape, text)
  return out


def classify(name: str, shape: str, text: str, kernel_shapes: set[tuple[int, ...]]) -> str:
  inside = re.search(r'\[([\d,]*)\]', shape)
  dims = tuple(sorted(int(d) for d in inside.group(1).split(',') if d)) if inside else ()
  if 'convolution(' in text:
    if dims in kernel_shapes:
      return 'conv filter gradient'
    return 'conv input gradient' if 'transpose(jvp' in text else 'conv forward'
  if ' dot(' in text or text.startswith('dot('):
    return 'matmul'
  if 'transpose' in name or name.startswith('copy'):
    return 'layout (transpose, copy)'
  return 'elementwise, reductions'


def profile_step(config, steps: int, top: int) -> dict:
  import jax
  jb = benchmark.JaxBench(config, 10)
  wall = jb.run(steps)
  kernels = {tuple(sorted(leaf.shape)) for leaf in jax.tree.leaves(jb.state)
             if getattr(leaf, 'ndim', 0) == 4}
  instructions = _instructions(jb.step.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    jb.run(steps)
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
    events = json.load(gzip.open(trace[-1]))['traceEvents']
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in instructions:
      per_op[e['name']] += e['dur'] / 1000 / steps
  kinds = collections.Counter({k: 0.0 for k in KINDS})
  rows = []
  for name, ms in per_op.items():
    shape, text = instructions[name]
    kind = classify(name, shape, text, kernels)
    kinds[kind] += ms
    op_names = re.findall(r'op_name="([^"]+)"', text)
    rows.append({'op': name, 'ms': ms, 'kind': kind, 'shape': shape.split('{')[0],
                 'source': op_names[-1] if op_names else ''})
  rows.sort(key=lambda r: -r['ms'])
  return {'model': config.model.name, 'image_size': int(config.dataset.image_size),
          'batch_size': int(config.batch_size), 'dtype': config.model.dtype,
          'step_ms': 1000 * wall, 'traced_ms_by_kind': dict(kinds),
          'traced_ms_total': sum(kinds.values()), 'slowest': rows[:top],
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def _best_ms(fn, rounds: int = 3, repeat: int = 3) -> float:
  fn()
  best = float('inf')
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(repeat):
      out = fn()
    if hasattr(out, 'block_until_ready'):
      out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / repeat)
  return 1000 * best


def profile_conv(n: int, h: int, c: int, o: int, with_torch: bool) -> dict:
  import jax
  import numpy as np
  from jax import lax
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.normal(size=(n, h, h, c)).astype(np.float32))
  w = jax.numpy.asarray(rng.normal(size=(3, 3, c, o)).astype(np.float32) / np.sqrt(9 * c))

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dy = conv(x, w)
  fwd = jax.jit(conv)
  dx = jax.jit(lambda w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0])
  gflop = 2 * n * h * h * c * o * 9 / 1e9
  result = {'shape': [n, h, c, o], 'gflop': gflop,
            'xla_ms': {'forward': _best_ms(lambda: fwd(x, w)),
                       'input_gradient': _best_ms(lambda: dx(w, dy)),
                       'filter_gradient': _best_ms(lambda: dw(x, dy))},
            'xla_flags': os.environ.get('XLA_FLAGS', '')}
  if with_torch:
    import torch
    cl = torch.channels_last
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=cl)
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).contiguous(memory_format=cl)
    tdy = torch.nn.functional.conv2d(tx, tw, padding=1).contiguous(memory_format=cl)

    def back(mask):
      return torch.ops.aten.convolution_backward(tdy, tx, tw, None, [1, 1], [1, 1], [1, 1],
                                                 False, [0, 0], 1, mask)
    result['torch_ms'] = {
        'forward': _best_ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1)),
        'input_gradient': _best_ms(lambda: back([True, False, False])),
        'filter_gradient': _best_ms(lambda: back([False, True, False]))}
  return result


def main(argv):
  del argv
  if FLAGS.conv:
    try:
      n, h, c, o = (int(v) for v in FLAGS.conv.split(','))
    except ValueError:
      print(f'error: --conv: give N,H,C,O as four integers; got {FLAGS.conv!r}', file=sys.stderr)
      sys.exit(2)
    result = profile_conv(n, h, c, o, FLAGS.torch)
    for part in ('forward', 'input_gradient', 'filter_gradient'):
      line = f'{part:16s} XLA {result["xla_ms"][part]:8.1f} ms'
      if 'torch_ms' in result:
        line += f'   PyTorch {result["torch_ms"][part]:8.1f} ms'
      print(line)
  else:
    if FLAGS.config is None:
      print('error: --config: give a config file (or --conv=N,H,C,O)', file=sys.stderr)
      sys.exit(2)
    result = profile_step(FLAGS.config, FLAGS.trace_steps, FLAGS.top)
    print(f'step {result["step_ms"]:.0f} ms (wall); traced operations by kind, ms per step:')
    for kind, ms in sorted(result['traced_ms_by_kind'].items(), key=lambda kv: -kv[1]):
      print(f'  {ms:9.1f}  {kind}')
    print('slowest operations:')
    for r in result['slowest']:
      print(f'  {r["ms"]:9.1f}  {r["kind"]:26s} {r["shape"]:24s} {r["source"][-70:]}')
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
