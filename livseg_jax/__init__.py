"""livseg_jax: two-stage liver / liver-tumour segmentation of abdominal CT with JAX and Flax."""

__version__ = "0.1.0"
