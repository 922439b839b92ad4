"""mmdit_jax: SD3-style rectified-flow transformers (MM-DiT) in JAX/Flax NNX."""
