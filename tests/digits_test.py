"""Tests for the embedded `digits` TFDS builder: offline, fixed, faithful to its source."""
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

import ldm_jax.datasets  # pylint: disable=unused-import  # Registers `digits`.
from ldm_jax.datasets import digits


def _prepare(data_dir) -> tfds.core.DatasetBuilder:
  builder = tfds.builder('digits', data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def _read(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
  """Returns a whole split in stored order as stacked NumPy arrays."""
  examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def builder(data_dir):
  return _prepare(data_dir)


@pytest.fixture(scope='module')
def splits(builder):
  return {split: _read(builder, split) for split in ('train', 'test')}


@pytest.fixture(scope='module')
def source():
  return load_digits()


def test_prepares_offline_with_fixed_sizes(builder):
  assert builder.info.splits['train'].num_examples == 1500
  assert builder.info.splits['test'].num_examples == 297
  assert builder.info.features['label'].num_classes == 10
  assert builder.info.version == '1.0.0'


def test_splits_are_disjoint_and_cover_the_source(splits, source):
  train, test = set(splits['train']['index']), set(splits['test']['index'])
  assert len(train) == 1500 and len(test) == 297
  assert not train & test
  assert train | test == set(range(len(source.target)))


def test_splits_are_identical_across_builds(splits, tmp_path):
  again = _prepare(tmp_path)
  for split in ('train', 'test'):
    rebuilt = _read(again, split)
    np.testing.assert_array_equal(rebuilt['index'], splits[split]['index'])
    np.testing.assert_array_equal(rebuilt['label'], splits[split]['label'])


def test_every_label_in_both_splits_in_proportion(splits, source):
  overall = np.bincount(source.target, minlength=10) / len(source.target)
  for split in ('train', 'test'):
    counts = np.bincount(splits[split]['label'], minlength=10)
    assert np.all(counts > 0), split
    # Stratified: each class within one example of its proportional share.
    np.testing.assert_array_less(np.abs(counts - overall * counts.sum()), 1.0 + 1e-9)


def test_labels_match_source(splits, source):
  for split in ('train', 'test'):
    np.testing.assert_array_equal(splits[split]['label'], source.target[splits[split]['index']])


def test_images_are_32x32_gray_uint8_full_range(builder, splits):
  assert builder.info.features['image'].shape == (32, 32, 1)
  images = splits['train']['image']
  assert images.shape == (1500, 32, 32, 1)
  assert images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255


def test_pixels_match_a_direct_resize_of_the_source(splits, source):
  for position in (0, 1, 296):
    index = splits['test']['index'][position]
    pixels = np.round(source.images[index] * 255 / 16).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(splits['test']['image'][position, :, :, 0], expected)


def test_split_indices_is_a_pure_function_of_labels(source):
  train, test = digits.split_indices(source.target)
  train_again, test_again = digits.split_indices(source.target.copy())
  np.testing.assert_array_equal(train, train_again)
  np.testing.assert_array_equal(test, test_again)
  assert len(test) == digits.NUM_TEST
  assert len(np.union1d(train, test)) == len(source.target)


def test_tfds_load_finds_the_registered_builder(builder, data_dir):
  del builder  # Prepared; `tfds.load` must find it by name alone.
  ds = tfds.load('digits', split='test', data_dir=data_dir)
  assert ds.cardinality().numpy() == 297
