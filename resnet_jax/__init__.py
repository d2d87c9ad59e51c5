"""resnet_jax: train and fine-tune ResNets with JAX, Flax, optax and Orbax."""

from resnet_jax import xla_flags as _xla_flags

# Before any JAX backend starts: XLA reads XLA_FLAGS once (see xla_flags.py).
_xla_flags.apply()
