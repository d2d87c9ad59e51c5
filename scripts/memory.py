"""Peak memory of the compiled train step from XLA's memory analysis (no step is run).

  python scripts/memory.py --config=configs/imagenet_resnet50.py --config.batch_size=64 \
      --config.model.remat=blocks

Prints one JSON line: the step's temporary buffers (activations kept for the
backward pass and scratch), its arguments and outputs (state and batch), and
their sum less what the donated state lets XLA reuse. The figures are per
device: under SPMD each device holds its share of the batch. Compiles for the
local backend (CPU here); a GPU/TPU compile gives that device's figures.
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
FLAGS = flags.FLAGS


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
  temp, args, out, alias = (int(getattr(m, f'{k}_size_in_bytes')) for k in
                            ('temp', 'argument', 'output', 'alias'))
  return {'model': config.model.name, 'image_size': size, 'batch_per_device': b,
          'dtype': config.model.dtype, 'remat': config.model.get('remat', 'none'),
          'temp_bytes': temp, 'argument_bytes': args, 'output_bytes': out,
          'alias_bytes': alias, 'peak_bytes': temp + args + out - alias,
          'device_kind': jax.devices()[0].device_kind}


def main(argv):
  del argv
  from resnet_jax.errors import UserError
  try:
    print(json.dumps(memory(FLAGS.config, FLAGS.num_classes)), flush=True)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
