"""Embedded TFDS builders that need no download.

Importing this package registers every builder in it with TFDS, after which
`tfds.builder(name)` and `tfds.load(name)` find them like any other dataset:

  digits            scikit-learn's 8x8 handwritten digits, upsampled to 32x32 grayscale.
  digits_captions   the same with a generated caption per image ("a thick seven").
"""
from ldm_jax.datasets.digits import Digits
from ldm_jax.datasets.digits_captions import DigitsCaptions

__all__ = ['Digits', 'DigitsCaptions']
