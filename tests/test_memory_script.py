"""scripts/memory.py: XLA's memory and cost analysis of the train step, and the roofline."""

import json

import pytest

from tests.conftest import import_script, tiny_config


def test_memory_reports_the_peak_per_batch_size_and_a_roofline_from_the_flops(capsys):
  memory = import_script('memory')
  small = memory.memory(tiny_config(**{'batch_size': 32}), 10)
  large = memory.memory(tiny_config(**{'batch_size': 128}), 10)
  for r in (small, large):
    assert r['peak_bytes'] == (r['temp_bytes'] + r['argument_bytes'] + r['output_bytes'] -
                               r['alias_bytes'])
    assert r['flops_per_image'] > 0 and r['bytes_accessed_per_image'] > 0
  assert large['batch_per_device'] == 4 * small['batch_per_device']
  # Activations grow with the batch; the work per image does not (but for the update's,
  # shared by the batch).
  assert large['temp_bytes'] > 2 * small['temp_bytes']
  assert large['flops_per_image'] == pytest.approx(small['flops_per_image'], rel=0.1)
  # The roofline is the smaller of the compute and the memory bound of each accelerator.
  for name, spec in memory.ACCELERATORS.items():
    compute = spec['float32'] / large['flops_per_image']
    bandwidth = spec['bytes_per_sec'] / large['bytes_accessed_per_image']
    assert large['roofline'][name]['images_per_sec'] == round(min(compute, bandwidth))
    assert large['roofline'][name]['bound'] == ('compute' if compute < bandwidth else 'memory')


def test_bad_batch_sizes_are_one_line(capsys):
  memory = import_script('memory')
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS(['memory', '--config=configs/default.py', '--batch_sizes=64,x'])
  with pytest.raises(SystemExit) as info:
    memory.main([])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: --batch_sizes: expected comma-separated integers, got '64,x'"
  flags.FLAGS.unparse_flags()
