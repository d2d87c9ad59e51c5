"""ImageNet ResNet-50, the standard 90-epoch recipe (Goyal et al. 2017).

Batch 1024, SGD 0.9, lr 0.4 (0.1 per 256 images) with 5 warmup epochs, decay by
10x at epochs 30, 60 and 80, weight decay 1e-4 (not on BatchNorm or biases),
random-resized 224px crops and flips; eval resizes to 256 and centre-crops 224.
Needs the ImageNet archives in `dataset.manual_dir` (TFDS imagenet2012), or an
image folder (`--config.dataset.name=image_folder --config.dataset.data_dir=...`).
"""

from configs import default

_EPOCH = 1_281_167 // 1024


def get_config():
  c = default.get_config()
  c.model.name = 'resnet50'
  c.model.stem = 'imagenet'
  c.model.zero_init_residual = True
  c.dataset.name = 'imagenet2012'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.dataset.augment = 'random_resized_crop'
  c.dataset.mean = (0.485, 0.456, 0.406)
  c.dataset.std = (0.229, 0.224, 0.225)
  c.dataset.verify_images = False
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 90.0
  c.optimizer.learning_rate = 0.4
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = 'piecewise'
  c.schedule.warmup_steps = 5 * _EPOCH
  c.schedule.boundaries = (30 / 90, 60 / 90, 80 / 90)
  c.schedule.decay_factor = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 5 * _EPOCH
  c.checkpoint_every_steps = _EPOCH
  c.model.dtype = 'bfloat16'
  return c
