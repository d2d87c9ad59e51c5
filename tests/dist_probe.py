"""Small multi-process jobs for tests/test_distributed.py, run through scripts/launch_local.py.

  python scripts/launch_local.py --module=tests.dist_probe -- TASK ARG...
  (the launcher appends --coordinator_address, --num_processes and --process_id)

Tasks:
  eval_and_checkpoint FOLDER SAVE_DIR RESTORE_DIR [FATE]: prints the identities
    of the examples that the global eval batches (process-local data assembled
    under jit, padding masked) hold, saves `probe_state()` from every process
    into SAVE_DIR, and checks that RESTORE_DIR (written by one process) restores
    to exactly `probe_state()`; then `collectives FATE`, if given.
  collectives FATE: repeats a cross-process reduction; process 1 then meets FATE
    (`die`: SIGKILL itself; `fail`: stop with an error through distributed.abort).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax import distributed  # noqa: E402  (JAX-free)


def _join(argv: list[str], heartbeat: int) -> list[str]:
  """Initialises the job from the launcher's flags; returns the task's own arguments."""
  flags = {a.split('=', 1)[0][2:]: a.split('=', 1)[1] for a in argv if a.startswith('--')}
  distributed.initialize(distributed.Options(
      coordinator_address=flags['coordinator_address'],
      num_processes=int(flags['num_processes']), process_id=int(flags['process_id']),
      init_timeout=60, heartbeat_timeout=heartbeat))
  return [a for a in argv if not a.startswith('--')]


def probe_state():
  """A checkpointable state with the dtypes and shapes of a real one."""
  import numpy as np
  rng = np.random.default_rng(42)
  return {'step': np.asarray(7, np.int32),
          'params': {'conv': {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
                     'head': {'bias': rng.normal(size=(5,)).astype(np.float32)}},
          'batch_stats': {'bn': {'mean': rng.normal(size=(4,)).astype(np.float32)}},
          'opt_state': [{'mu': rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
                        {'count': np.asarray(3, np.int32)}]}


def identity(image, label) -> str:
  import numpy as np
  return f'{int(label)}:{hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]}'


def eval_and_checkpoint(folder: str, save_dir: str, restore_dir: str, fate: str = '') -> None:
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from resnet_jax import checkpointing, input_pipeline, parallel
  from configs import default
  config = default.get_config()   # Not tests.conftest: it would set up JAX for pytest.
  config.dataset.update({'name': 'image_folder', 'data_dir': folder, 'eval_split': 'test',
                         'image_size': 8})
  config.eval_batch_size = 4
  data = input_pipeline.create_data(config)
  par = parallel.Parallel('jit')
  local = par.check_batch('config.eval_batch_size', int(config.eval_batch_size))
  seen = []
  for batch in data.eval_iter(local, jax.process_index(), jax.process_count()):
    glob = par.put_batch(batch)   # What the eval step sums over.
    whole = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
             for k, v in glob.items()}
    seen += [identity(im, l) for im, l, m in zip(whole['image'], whole['label'], whole['mask'])
             if m]
  ckpt = checkpointing.Checkpointer(save_dir)
  ckpt.save(7, probe_state(), {'probe': True})
  ckpt.close()
  reader = checkpointing.Checkpointer(restore_dir, read_only=True)
  restored, _ = reader.restore(7, probe_state())
  reader.close()
  same = all(np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype for a, b in
             zip(jax.tree.leaves(restored), jax.tree.leaves(probe_state())))
  print('RESULT ' + json.dumps({'process': jax.process_index(), 'devices': jax.device_count(),
                                'eval_ids': seen, 'restored_identical': bool(same)}), flush=True)
  if fate:
    collectives(fate)


def collectives(fate: str) -> None:
  import jax
  import numpy as np
  par_sum = jax.jit(lambda x: x.sum())
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('d',)), P('d'))
  for i in range(10_000):
    x = jax.make_array_from_process_local_data(sharding, np.ones(jax.local_device_count()))
    assert float(par_sum(x)) == jax.device_count()
    if i == 20 and jax.process_index() == 1:
      print(f'FATE {fate} at {time.time():.3f}', flush=True)
      if fate == 'die':
        os.kill(os.getpid(), signal.SIGKILL)
      distributed.abort('the probe failed on purpose', 3)
    time.sleep(0.01)


def main(argv: list[str]) -> None:
  task, *args = _join(argv, heartbeat=int(os.environ.get('PROBE_HEARTBEAT', '30')))
  {'eval_and_checkpoint': eval_and_checkpoint, 'collectives': collectives}[task](*args)
  distributed.finish()


if __name__ == '__main__':
  main(sys.argv[1:])
