"""jaxarith: weight and logit arithmetic for pre-trained language models in JAX / Flax NNX."""

__version__ = "0.1.0"
