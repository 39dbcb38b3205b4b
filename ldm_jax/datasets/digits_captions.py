"""`digits_captions`: the embedded `digits` with a caption per image.

Same images, labels, indices and splits as `digits`, plus `caption`, e.g.
"a thick seven", "a small slanted two", "a four". The caption names the digit and
up to three attributes measured from the stored 32x32 image (ink in [0, 1]):

  thickness  ink mass (sum of the ink);
  size       area of the bounding box of the pixels with ink > INK_THRESHOLD;
  slant      the shear -cov(x, y) / var(y) of the ink distribution (second
             moments; y grows downwards, so > 0 means the top leans right).

Each is compared with the other images of the same digit (a "1" always has less
ink than an "8"): the lowest third of thickness is "thin" and the highest "thick";
the lowest third of size "small" and the highest "large"; the highest third of
slant "slanted". Words come in the order thickness, size, slant, digit.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.datasets import digits

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
INK_THRESHOLD = 0.25
# Per-digit quantiles that split an attribute into a low, a middle and a high third.
_LOW, _HIGH = 1 / 3, 2 / 3


def measure(image: np.ndarray) -> dict[str, float]:
  """Thickness, size and slant of one stored image [H, W, 1] uint8 (see module doc)."""
  ink = np.asarray(image, np.float64)[..., 0] / 255.0  # [H, W]
  mass = ink.sum()
  ys, xs = np.nonzero(ink > INK_THRESHOLD)
  size = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)) if len(ys) else 0.0
  grid_y, grid_x = np.mgrid[:ink.shape[0], :ink.shape[1]]
  mean_x, mean_y = (ink * grid_x).sum() / mass, (ink * grid_y).sum() / mass
  cov_xy = (ink * (grid_x - mean_x) * (grid_y - mean_y)).sum() / mass
  var_y = (ink * (grid_y - mean_y) ** 2).sum() / mass
  return {'thickness': float(mass), 'size': size, 'slant': float(-cov_xy / var_y)}


def captions(images: np.ndarray, labels: np.ndarray) -> list[str]:
  """The caption of every image, with attribute thirds taken per digit."""
  measured = [measure(image) for image in images]
  words = [[] for _ in images]
  scales = (('thickness', 'thin', 'thick'), ('size', 'small', 'large'), ('slant', None, 'slanted'))
  for attribute, low_word, high_word in scales:
    values = np.asarray([m[attribute] for m in measured])
    for label in np.unique(labels):
      members = np.flatnonzero(labels == label)
      low, high = np.quantile(values[members], [_LOW, _HIGH])
      for i in members:
        if low_word and values[i] < low:
          words[i].append(low_word)
        elif values[i] > high:
          words[i].append(high_word)
  return [' '.join(['a', *w, DIGIT_WORDS[label]]) for w, label in zip(words, labels)]


class DigitsCaptions(tfds.core.GeneratorBasedBuilder):
  """`digits` with a generated caption per image; needs no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Captions from label, thickness, size and slant.'}

  code_path = digits.Digits.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='The embedded `digits` dataset with a caption per image: the digit '
                    'and its thickness, size and slant relative to other images of it.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1)),
            'label': tfds.features.ClassLabel(num_classes=digits.NUM_CLASSES),
            'index': np.int64,
            'caption': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # The data ships with scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    source = load_digits()
    images = np.stack([digits.source_to_image(pixels) for pixels in source.images])
    texts = captions(images, source.target)
    train, test = digits.split_indices(source.target)
    return {
        'train': self._generate_examples(images, source.target, texts, train),
        'test': self._generate_examples(images, source.target, texts, test),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, texts: list[str],
                         indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    for index in indices:
      index = int(index)
      yield index, {'image': images[index], 'label': int(labels[index]), 'index': index,
                    'caption': texts[index]}
