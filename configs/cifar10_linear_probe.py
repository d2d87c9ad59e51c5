"""Linear probe: the fine-tuning job with everything but the head frozen.

The backbone runs in inference mode (BatchNorm on running averages) behind a
stop_gradient, so each step costs about one forward pass plus a linear layer.
"""

from configs import cifar10_finetune


def get_config():
  c = cifar10_finetune.get_config()
  c.finetune.freeze = '^(?!head/)'
  c.dataset.augment = 'none'
  c.dataset.flip = False
  c.optimizer.learning_rate = 0.1
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 100
  c.num_train_steps = 2_000
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
