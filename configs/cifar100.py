"""CIFAR-100 from scratch: the CIFAR-10 recipe with CIFAR-100's statistics."""

from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.dataset.name = 'cifar100'
  c.dataset.mean = (0.5071, 0.4865, 0.4409)
  c.dataset.std = (0.2673, 0.2564, 0.2762)
  return c
