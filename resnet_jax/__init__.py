"""resnet_jax: train and fine-tune ResNets with JAX, Flax, optax and Orbax."""
