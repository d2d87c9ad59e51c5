"""scripts/profile_step.py: the train step's trace by op kind, and one convolution's three parts."""

import json

from tests.conftest import import_script, tiny_config


def test_step_profile_attributes_traced_time_to_op_kinds():
  profile = import_script('profile_step')
  result = profile.profile_step(tiny_config(), steps=1, top=5)
  json.dumps(result)
  kinds = result['traced_ms_by_kind']
  assert set(kinds) == set(profile.KINDS)
  assert result['step_ms'] > 0 and result['traced_ms_total'] > 0
  assert result['traced_ms_total'] == sum(kinds.values())
  # A train step has convolutions forward and backward, and BatchNorm/ReLU around them.
  assert kinds['conv forward'] > 0 and kinds['elementwise, reductions'] > 0
  assert kinds['conv filter gradient'] + kinds['conv input gradient'] > 0
  assert 0 < len(result['slowest']) <= 5
  assert [r['ms'] for r in result['slowest']] == sorted(
      (r['ms'] for r in result['slowest']), reverse=True)


def test_classify_tells_filter_gradients_by_the_kernel_shape():
  profile = import_script('profile_step')
  kernels = {(3, 3, 16, 16)}
  conv = 'convolution(%a, %b) metadata={op_name="transpose(jvp(ResNet))/conv"}'
  assert profile.classify('c.1', 'f32[16,3,3,16]{3,2,1,0}', conv, kernels) == (
      'conv filter gradient')
  assert profile.classify('c.2', 'f32[8,4,4,16]{3,2,1,0}', conv, kernels) == (
      'conv input gradient')
  assert profile.classify('c.3', 'f32[8,4,4,16]', 'convolution(%a, %b)', kernels) == (
      'conv forward')
  assert profile.classify('transpose_copy_fusion.1', 'f32[8]', 'fusion(%a)', kernels) == (
      'layout (transpose, copy)')


def test_conv_profile_times_three_parts():
  profile = import_script('profile_step')
  result = profile.profile_conv(2, 4, 8, 8, with_torch=False)
  assert set(result['xla_ms']) == {'forward', 'input_gradient', 'filter_gradient'}
  assert all(v > 0 for v in result['xla_ms'].values())
  assert 'torch_ms' not in result
