"""`digits`: scikit-learn's handwritten digits as a TFDS dataset that needs no download.

The 1,797 8x8 grayscale images (values 0..16) that ship with scikit-learn
(`sklearn.datasets.load_digits`, the test part of the UCI "Optical Recognition of
Handwritten Digits" data) are scaled to 0..255 and upsampled to 32x32 with a
bicubic filter, so that a small autoencoder with two downsampling stages has
something to compress. Labels 0..9 are kept.

Splits are fixed forever (they do not depend on the run, the machine or the
library versions beyond NumPy's legacy `RandomState`):

  test   297 images, stratified: each class gets its share of 297 (largest
         remainder), chosen from a `RandomState(0)` permutation of the indices.
  train  the other 1,500 images.

Every example carries `index`, its position in `load_digits()`, which is also its
TFDS example key, so any stored image can be traced back to its source.

Usage:
  import ldm_jax.datasets  # registers the builder
  ds = tfds.load('digits', split='train', data_dir=...)
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_CLASSES = 10
NUM_TEST = 297
# Seeds the permutation that picks the test images; changing it changes the splits.
_SPLIT_SEED = 0
# load_digits stores intensities as counts of set pixels in a 4x4 block: 0..16.
_MAX_SOURCE_VALUE = 16.0

_DESCRIPTION = """\
Handwritten digits 0-9 from the UCI "Optical Recognition of Handwritten Digits"
dataset, as bundled with scikit-learn (1,797 images of 8x8 pixels with values
0..16). Images are rescaled to 0..255 and upsampled to 32x32 grayscale with a
bicubic filter. Fixed stratified splits: 1,500 train and 297 test images. The
feature `index` is the image's position in `sklearn.datasets.load_digits()`.
"""

_CITATION = """\
@misc{alpaydin1998optical,
  author       = {Alpaydin, E. and Kaynak, C.},
  title        = {Optical Recognition of Handwritten Digits},
  year         = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi          = {10.24432/C50P49},
}
"""


def source_to_image(pixels: np.ndarray) -> np.ndarray:
  """Converts one `load_digits` image into the stored 32x32 uint8 image.

  Args:
    pixels: [8, 8] floats in 0..16.

  Returns:
    [32, 32, 1] uint8 in 0..255.
  """
  scaled = np.round(np.asarray(pixels, np.float64) * (255.0 / _MAX_SOURCE_VALUE))
  small = Image.fromarray(scaled.astype(np.uint8), mode='L')
  large = small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
  return np.asarray(large, np.uint8)[:, :, None]


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns the fixed (train, test) indices into `load_digits()`, stratified by label.

  Args:
    labels: [N] int labels in 0..9, in `load_digits` order.

  Returns:
    Sorted train indices ([N - 297]) and sorted test indices ([297]).
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  quotas = counts * NUM_TEST / len(labels)
  per_class = np.floor(quotas).astype(int)
  # Largest remainder: the rounding slack goes to the classes that lost the most to
  # the floor, so the test set has exactly NUM_TEST images; a stable sort breaks
  # ties by class index so the result is unique.
  slack = NUM_TEST - per_class.sum()
  per_class[np.argsort(-(quotas - per_class), kind='stable')[:slack]] += 1

  permutation = np.random.RandomState(_SPLIT_SEED).permutation(len(labels))
  test = []
  for label in range(NUM_CLASSES):
    in_class = permutation[labels[permutation] == label]
    test.append(in_class[: per_class[label]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, upsampled to 32x32; needs no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 32x32 bicubic upsampling, 1,500/297 stratified split.',
  }

  # TFDS derives this from `importlib_resources`, which is an optional dependency that
  # may be missing; the file of this class is the same answer without it.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            'index': np.int64,
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # The data ships with scikit-learn.
    # Imported here so that registering the builder does not import scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    source = load_digits()
    train, test = split_indices(source.target)
    return {
        'train': self._generate_examples(source.images, source.target, train),
        'test': self._generate_examples(source.images, source.target, test),
    }

  def _generate_examples(
      self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    for index in indices:
      index = int(index)
      yield index, {
          'image': source_to_image(images[index]),
          'label': int(labels[index]),
          'index': index,
      }
