"""MNIST: ResNet-20 (CIFAR stem) on 32px 3-channel copies of the digits, no flip."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'resnet20'
  c.dataset.name = 'mnist'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 32
  c.dataset.flip = False
  c.dataset.crop_padding = 2
  c.dataset.mean = (0.1307, 0.1307, 0.1307)
  c.dataset.std = (0.3081, 0.3081, 0.3081)
  c.batch_size = 128
  c.num_epochs = 10.0
  c.optimizer.learning_rate = 0.05
  c.schedule.warmup_steps = 200
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  return c
