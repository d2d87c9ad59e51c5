"""XLA's analysis of the compiled train step: peak memory, FLOPs and bytes (no step is run).

  python scripts/memory.py --config=configs/imagenet_resnet50.py --config.batch_size=64 \
      --config.model.remat=blocks
  python scripts/memory.py --config=configs/imagenet_resnet50.py --batch_sizes=32,64,128,256

Prints one JSON line per batch size: the step's temporary buffers (activations
kept for the backward pass and scratch), its arguments and outputs (state and
batch), and their sum less what the donated state lets XLA reuse; the FLOPs and
bytes accessed per training image (XLA's cost analysis: forward, backward and
update); and a roofline projection for accelerators this project has no access
to: images/s = min(peak FLOP/s / FLOPs, memory bandwidth / bytes) per device,
with the input rate a host must then deliver. Memory figures are per device:
under SPMD each device holds its share of the batch. Compiles for the local
backend (CPU here): its fusion decisions, hence its bytes, differ from a GPU's
or TPU's, so the projection is an estimate on paper, not a measurement.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
flags.DEFINE_string('batch_sizes', '', 'Comma-separated global batch sizes to analyse '
                    "('' = the config's batch_size).")

# Dense peak FLOP/s per dtype and memory bandwidth (bytes/s) per device, from the vendors'
# data sheets: H100 SXM (bf16 989 TFLOP/s dense, fp32 67 TFLOP/s without TF32, 3.35 TB/s
# HBM3) and TPU v5e (197 TFLOP/s bf16, 819 GB/s HBM2e).
ACCELERATORS = {
    'H100 SXM': {'bfloat16': 989e12, 'float32': 67e12, 'bytes_per_sec': 3.35e12},
    'TPU v5e': {'bfloat16': 197e12, 'float32': 197e12, 'bytes_per_sec': 819e9},
}
FLAGS = flags.FLAGS


def roofline(flops_per_image: float, bytes_per_image: float, dtype: str) -> dict:
  """Images/s per device on each accelerator at its roofline, and what bounds it."""
  out = {}
  for name, spec in ACCELERATORS.items():
    compute = spec.get(dtype, spec['float32']) / flops_per_image
    memory = spec['bytes_per_sec'] / bytes_per_image
    out[name] = {'images_per_sec': round(min(compute, memory)),
                 'bound': 'compute' if compute < memory else 'memory'}
  return out


def memory(config, num_classes: int) -> dict:
  import jax
  import numpy as np

  from resnet_jax import models, optim, train
  size = int(config.dataset.image_size)
  setup = train.Setup(config, num_classes, 1_281_167, size)
  state = jax.eval_shape(lambda: setup.make_state(setup.fresh_variables))
  step = train.make_train_step(
      setup.model, setup.tx, setup.schedule, num_classes,
      trainable=optim.trainable_mask(setup.spec, setup.fresh_variables['params']))
  b = int(config.batch_size) // len(setup.par.devices)
  batch = {'image': jax.ShapeDtypeStruct((b, size, size, 3), np.float32),
           'label': jax.ShapeDtypeStruct((b,), np.int32)}
  # Compiled as training compiles it (remat on CPU needs an XLA option).
  options = models.compiler_options(config.model, jax.devices()[0].platform)
  compiled = jax.jit(step, donate_argnums=0, compiler_options=options).lower(
      state, batch).compile()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops = float(cost.get('flops', 0.0)) / b             # Per device's share: per image.
  bytes_accessed = float(cost.get('bytes accessed', 0.0)) / b
  temp, args, out, alias = (int(getattr(m, f'{k}_size_in_bytes')) for k in
                            ('temp', 'argument', 'output', 'alias'))
  return {'model': config.model.name, 'image_size': size, 'batch_per_device': b,
          'dtype': config.model.dtype, 'remat': config.model.get('remat', 'none'),
          'temp_bytes': temp, 'argument_bytes': args, 'output_bytes': out,
          'alias_bytes': alias, 'peak_bytes': temp + args + out - alias,
          'flops_per_image': flops, 'bytes_accessed_per_image': bytes_accessed,
          'roofline': roofline(flops, bytes_accessed, config.model.dtype) if flops else None,
          'device_kind': jax.devices()[0].device_kind}


def main(argv):
  del argv
  from resnet_jax.errors import UserError
  config = FLAGS.config
  try:
    sizes = [int(x) for x in FLAGS.batch_sizes.split(',') if x.strip()] or [config.batch_size]
  except ValueError:
    print(f'error: --batch_sizes: expected comma-separated integers, got {FLAGS.batch_sizes!r}',
          file=sys.stderr)
    sys.exit(2)
  try:
    for size in sizes:
      with config.unlocked():
        config.batch_size = size
      print(json.dumps(memory(config, FLAGS.num_classes)), flush=True)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
