"""ImageNet ResNet-50, "ResNet strikes back" procedure A3 (Wightman, Touvron and Jegou 2021).

arXiv:2110.00476, Table 1 (procedure A3) and Table 2: 100 epochs at 160px
(test at 224px, crop ratio 0.95), batch 2048, LAMB with lr 8e-3 and weight
decay 0.02, cosine schedule with 5 warmup epochs, binary cross-entropy, no
label smoothing, mixup alpha 0.1 and CutMix alpha 1.0 (switch probability
0.5), random-resized crops and flips, mixed precision, no stochastic depth, no
EMA, no repeated augmentation. The paper reports 78.1% top-1 on ImageNet-val at
224px for A3 (79.8% for A2, 80.4% for A1, against 76.1% for torchvision's
recipe).

RandAugment: A3 uses timm's rand-m6-mstd0.5-inc1 (2 operations at magnitude
6, with magnitude noise of std 0.5 and the 'increasing' operation variants);
this config uses `dataset.randaugment='2,6'`, the plain Cubuk et al. form at
the same N and M (resnet_jax/augment.py has no magnitude noise, and applies
every drawn operation where timm applies each with probability 0.5, so this is
somewhat stronger than A3's). Evaluating at
224px after training at 160px: `--mode=eval --config.dataset.image_size=224
--config.dataset.resize_size=236`.
"""

from configs import imagenet_resnet50

_EPOCH = 1_281_167 // 2048


def get_config():
  c = imagenet_resnet50.get_config()
  c.dataset.image_size = 160
  c.dataset.resize_size = 168          # 160 / 0.95: the eval crop ratio of the paper.
  c.batch_size = 2048
  c.num_epochs = 100.0
  c.optimizer.name = 'lamb'
  c.optimizer.learning_rate = 8e-3
  c.optimizer.weight_decay = 0.02
  c.optimizer.eps = 1e-6
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 5 * _EPOCH
  c.loss = 'sigmoid_bce'
  c.label_smoothing = 0.0
  c.mixup.alpha = 0.1
  c.cutmix.alpha = 1.0
  c.mixup.switch_prob = 0.5
  c.dataset.randaugment = '2,6'
  c.model.zero_init_residual = True
  c.model.dtype = 'bfloat16'
  c.eval_every_steps = 5 * _EPOCH
  c.checkpoint_every_steps = _EPOCH
  return c
