"""CIFAR-10 from scratch: ResNet-18 with the CIFAR stem, about 95% test accuracy.

200 epochs of SGD (0.9, Nesterov), lr 0.1 cosine with 2 warmup epochs, weight
decay 5e-4, batch 128, pad-4 crop and flip.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'resnet18'
  c.model.stem = 'cifar'
  c.dataset.name = 'cifar10'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 32
  c.batch_size = 128
  c.num_epochs = 200.0
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 780
  c.eval_every_steps = 3900
  c.checkpoint_every_steps = 3900
  return c
