"""CIFAR-10 from scratch with modern regularisers: ResNet-18 (CIFAR stem), EMA, mixup + CutMix.

configs/cifar10.py (200 epochs, SGD 0.9 Nesterov, lr 0.1 cosine, 2 warmup
epochs, weight decay 5e-4, batch 128, pad-4 crop and flip) plus:
  * mixup alpha 1.0 (Zhang et al. 2018 used 1.0 on CIFAR-10) and CutMix alpha 1.0
    (Yun et al. 2019), one of the two per batch (switch_prob 0.5), as timm's Mixup;
  * an EMA of the weights with decay 0.999 (a horizon of ~1,000 of the 78,000
    steps), reported beside the raw weights; the best checkpoint is ranked by it.
Mixing regularises strongly: expect the raw training accuracy to stay well
below the test accuracy, and a gain over configs/cifar10.py (about 95%) only
near the end of the 200 epochs.
"""

from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.mixup.alpha = 1.0
  c.cutmix.alpha = 1.0
  c.mixup.switch_prob = 0.5
  c.ema.decay = 0.999
  c.ema.rank_by = 'ema'
  return c
