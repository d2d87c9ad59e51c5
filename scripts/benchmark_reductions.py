"""Train-step time with exact reductions against XLA's, side by side in one process.

  python scripts/benchmark_reductions.py   # ResNet-20, batch 128, 4 CPU devices, jit and pmap

Best of 4 alternating rounds of 5 steps each; prints JSON step times and the ratios.
"""
import os, sys, time, json
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, numpy as np
from resnet_jax import train
from configs import default
def build(mode, exact):
  c = default.get_config(); c.model.name = 'resnet20'; c.parallelism = mode; c.exact_reductions = exact
  s = train.Setup(c, 10, 50000, 32)
  state = s.par.put_state(s.make_state(s.fresh_variables))
  step, _ = s.steps()
  rng = np.random.default_rng(0)
  b = s.par.put_batch({'image': rng.normal(size=(128, 32, 32, 3)).astype(np.float32), 'label': rng.integers(0, 10, 128).astype(np.int32)})
  state, m = step(state, b); jax.block_until_ready(m)
  return [step, state, b]
runs = {(m, e): build(m, e) for m in ('jit', 'pmap') for e in (False, True)}
times = {k: [] for k in runs}
for r in range(4):
  for k, v in runs.items():
    t = time.perf_counter()
    for _ in range(5):
      v[1], m = v[0](v[1], v[2])
    jax.block_until_ready(m); times[k].append((time.perf_counter() - t) / 5)
best = {k: min(v) for k, v in times.items()}
print(json.dumps({f'{m}{"_exact" if e else ""}_step_s': round(best[(m, e)], 4) for m, e in best}))
print(json.dumps({'jit_exact_over_jit_time': round(best[('jit', True)] / best[('jit', False)], 3), 'pmap_exact_over_pmap_time': round(best[('pmap', True)] / best[('pmap', False)], 3)}))
