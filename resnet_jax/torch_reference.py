"""A PyTorch ResNet in torchvision's layout and naming (needs torch).

Used to check converted weights against PyTorch and as the PyTorch side of
`scripts/benchmark.py --compare-torch`. Written here because torchvision has no
CPU wheel on our machines; it follows torchvision.models.resnet: v1.5
bottleneck stride on the 3x3 conv, 1x1 conv + BN `downsample`, and
`conv1/bn1/layerK/fc` names. `build(name, ...)` mirrors `models.create_model`.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):

  def __init__(self, block, layers, widths=(64, 128, 256, 512), num_classes=1000,
               stem='imagenet'):
    super().__init__()
    self.stem = stem
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.relu = nn.ReLU()
    inplanes = widths[0]
    for i, (n, w) in enumerate(zip(layers, widths)):
      blocks = []
      for j in range(n):
        blocks.append(block(inplanes, w, (1 if i == 0 else 2) if j == 0 else 1))
        inplanes = w * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_stages = len(layers)
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_batchnorm(model, seed=0):
  """Non-trivial BN statistics and affine parameters, so their conversion is tested."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
  return model


def build(name: str, num_classes: int, stem: str = '', width_multiplier: float = 1.0) -> ResNet:
  """The PyTorch twin of `models.create_model` for the same name, stem and width."""
  from resnet_jax.models import ARCHS, BottleneckBlock
  arch = ARCHS[name]
  block = Bottleneck if arch.block_cls is BottleneckBlock else BasicBlock
  widths = tuple(max(1, int(round(w * width_multiplier))) for w in arch.widths)
  return ResNet(block, arch.stage_sizes, widths, num_classes, stem or arch.default_stem)
