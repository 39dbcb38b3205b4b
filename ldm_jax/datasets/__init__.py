"""Embedded TFDS builders that need no download.

Importing this package registers every builder in it with TFDS, after which
`tfds.builder(name)` and `tfds.load(name)` find them like any other dataset:

  digits   scikit-learn's 8x8 handwritten digits, upsampled to 32x32 grayscale.
"""
from ldm_jax.datasets.digits import Digits

__all__ = ['Digits']
