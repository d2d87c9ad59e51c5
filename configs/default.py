"""Base config: every experiment imports this and adjusts it.

Fields are never None and never lists, so every one can be overridden from the
command line (`--config.optimizer.learning_rate=0.05`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.parallelism = 'jit'          # 'jit' (mesh + NamedSharding) or 'pmap'.
  # Cross-device sums in device order (resnet_jax/reductions.py): bit-identical results on
  # any split of the same devices into processes (2 hosts x 4 GPUs = 1 host x 8).
  c.exact_reductions = False

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'      # resnet18..200, resnet20/32/44/56/110 (CIFAR family).
  c.model.stem = ''              # '' = the architecture's own; 'imagenet' or 'cifar'.
  c.model.width_multiplier = 1.0
  c.model.zero_init_residual = False
  c.model.dropout_rate = 0.0
  c.model.dtype = 'float32'      # Compute dtype; parameters stay float32.
  c.model.bn_momentum = 0.9      # Flax convention (PyTorch's 0.1).
  c.model.drop_path_rate = 0.0   # Stochastic depth: 0 at the first block, rising to this.
  c.model.remat = 'none'         # 'blocks': recompute each block's activations in backward.

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'cifar10'     # Any TFDS image classification dataset, or 'image_folder'.
  c.dataset.data_dir = ''        # TFDS data_dir, or the image folder root.
  c.dataset.manual_dir = ''      # TFDS manual downloads (imagenet2012).
  c.dataset.download = True
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.classes = ''         # Comma-separated subset of class names ('' = all).
  c.dataset.image_size = 32
  c.dataset.resize_size = 0      # Eval resize before centre crop, or resize_crop's size.
  c.dataset.eval_crop = True     # Eval: resize to resize_size, centre-crop image_size.
  c.dataset.augment = 'auto'     # auto, pad_crop, random_resized_crop, resize_crop, none.
  c.dataset.crop_padding = 4
  c.dataset.flip = True
  c.dataset.randaugment = ''     # 'N,M', e.g. '2,9' (resnet_jax/augment.py); '' = off.
  c.dataset.random_erasing = 0.0  # Probability of erasing one box per training image.
  c.dataset.mean = (0.4914, 0.4822, 0.4465)
  c.dataset.std = (0.2470, 0.2435, 0.2616)
  c.dataset.verify_images = True  # Decode every image-folder file once at start.
  c.dataset.decode_once = True   # Keep an image folder's pixels in memory if equal-sized and small.
  c.dataset.on_bad_image = 'skip'  # 'skip' (warn, naming the file) or 'error'.
  c.dataset.prefetch = 4         # Batches in flight, on the host and on the devices.
  c.dataset.transfer = 'uint8'   # Host-to-device images: uint8 (normalised in the step) or float32.
  c.dataset.on_device = False    # Keep the training split on the devices; crop/flip in JAX.
  c.dataset.in_memory = 'auto'   # TFDS: hold decoded splits in memory (auto: if < 4 GiB), or stream.
  c.dataset.shuffle_buffer = 16384  # Streaming TFDS only.
  c.dataset.loader = 'tf.data'   # Training input: 'tf.data' or 'grain' (folders, random_resized_crop).
  c.dataset.grain_workers = 0    # loader='grain': worker processes (0: the cores available).

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_train_steps = -1         # Wins when > 0.
  c.num_epochs = 1.0
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0
  c.loss = 'softmax_xent'        # or 'sigmoid_bce' (ResNet strikes back); evaluation: softmax.

  # mixup / CutMix in the train step (resnet_jax/mixing.py), as timm's Mixup, per batch.
  c.mixup = ml_collections.ConfigDict()
  c.mixup.alpha = 0.0            # Beta(alpha, alpha) blend; 0 = off.
  c.mixup.prob = 1.0             # Probability that a batch is mixed at all.
  c.mixup.switch_prob = 0.5      # With both on: probability of CutMix instead of mixup.
  c.cutmix = ml_collections.ConfigDict()
  c.cutmix.alpha = 0.0           # Beta(alpha, alpha) box area; 0 = off.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'       # 'sgd', 'adamw', 'lars' or 'lamb'.
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_regex = r'(^|/)kernel$'  # Skips BatchNorm and biases.
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8          # adamw; lamb uses it too (its paper: 1e-6).
  c.optimizer.trust_coefficient = 0.001  # lars: eta in eta * |w| / |g + wd w|.
  c.optimizer.trust_ratio_regex = r'(^|/)kernel$'  # lars/lamb: layers with a trust ratio.

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'cosine'     # constant, cosine, linear, piecewise.
  c.schedule.warmup_steps = 0
  c.schedule.end_factor = 0.0    # Final lr as a fraction of the peak (cosine, linear).
  c.schedule.boundaries = (0.5, 0.75)  # piecewise: fractions of the run.
  c.schedule.decay_factor = 0.1

  c.finetune = ml_collections.ConfigDict()
  c.finetune.init_from = ''      # '' | workdir or checkpoint dir | *.safetensors/*.pth | torchvision:<arch>
  c.finetune.cache_dir = '~/.cache/resnet_jax'
  c.finetune.dont_load = '^head/'
  c.finetune.reset_head = True
  c.finetune.freeze = ''         # Regex over parameter paths, e.g. '^(stem|stage1)/'.
  c.finetune.freeze_stages = 0   # Freeze the stem and the first N stages.
  c.finetune.head_lr_multiplier = 1.0
  c.finetune.lr_multipliers = ()  # ('regex=mult', ...): first match wins.
  # full, linear_probe, bn_only, bias_only, last_stage (resnet_jax/presets.py); the head
  # always trains; finetune.freeze/freeze_stages freeze more on top (union).
  c.finetune.preset = 'full'

  # Adversarial training and robust evaluation (resnet_jax/adversarial.py), L-inf,
  # epsilon and step sizes in pixels of 0..255.
  c.adversarial = ml_collections.ConfigDict()
  c.adversarial.train = 'none'   # none, fgsm (one step from a random start) or pgd.
  c.adversarial.epsilon = 8.0
  c.adversarial.step_size = 2.0  # Training steps; fgsm: ~1.25 * epsilon (Wong et al. 2020).
  c.adversarial.steps = 7        # pgd training steps.
  c.adversarial.clean_fraction = 0.0  # This part of each batch stays clean.
  c.adversarial.eval_steps = 0   # PGD-k robust accuracy at evaluation; 0 = none.
  c.adversarial.eval_step_size = 2.0

  # Exponential moving average of the weights and BatchNorm statistics (resnet_jax/ema.py);
  # every evaluation scores both (accuracy, ema_accuracy).
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0              # 0 = off; e.g. 0.999 (per step).
  c.ema.warmup = True            # decay_t = min(decay, (1 + t) / (10 + t)).
  c.ema.rank_by = 'raw'          # Which accuracy ranks the best checkpoint: 'raw' or 'ema'.

  c.log_every_steps = 50
  c.eval_every_steps = 0         # 0 = at the end only.
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  # Resume even if seed, batch, length, optimizer, schedule or splits changed (see README).
  c.allow_resume_changes = False
  return c
