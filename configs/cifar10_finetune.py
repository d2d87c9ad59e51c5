"""The headline job: fine-tune ImageNet-pretrained ResNet-50 on CIFAR-10 (BiT-style).

torchvision's ImageNet weights under a new 10-class head; stem and stage1
frozen (their BatchNorm statistics too); 128px random crops of 160px upsampled
images, flips; SGD 0.9 at lr 0.003 for batch 512, 500 warmup steps, 10k steps,
decay by 10x at 30/60/90% (BiT-HyperRule). No weight decay, as in BiT.

From scratch instead: --config.finetune.init_from='' --config.finetune.freeze=''
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'resnet50'
  c.model.stem = 'imagenet'
  c.model.dtype = 'bfloat16'
  c.dataset.name = 'cifar10'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 128
  c.dataset.resize_size = 160
  c.dataset.augment = 'resize_crop'
  c.dataset.eval_crop = False         # Evaluate on the whole image, resized to 128.
  c.dataset.mean = (0.485, 0.456, 0.406)  # The pretrained network's statistics.
  c.dataset.std = (0.229, 0.224, 0.225)
  c.batch_size = 512
  c.eval_batch_size = 500
  c.num_train_steps = 10_000
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.003
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.schedule.name = 'piecewise'
  c.schedule.warmup_steps = 500
  c.schedule.boundaries = (0.3, 0.6, 0.9)
  c.schedule.decay_factor = 0.1
  c.finetune.init_from = 'torchvision:resnet50'
  c.finetune.dont_load = '^head/'
  c.finetune.reset_head = True
  c.finetune.freeze = '^(stem|stage1)/'
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  return c
