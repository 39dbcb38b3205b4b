"""Tests for the TFDS input pipeline on the embedded `digits` data (no network needed)."""
import collections
import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ldm_jax import input_pipeline
from ldm_jax.errors import UserError

NUM_TRAIN, NUM_TEST = 1500, 297


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=path).download_and_prepare()
  return path


def _config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  fields = dict(
      name='digits',
      data_dir=data_dir,
      image_size=32,
      num_channels=1,
      batch_size=32,
      train_split='train',
      eval_split='test',
      shuffle_buffer=2_000,
      random_flip=False,
      image_key='image',
      label_key='label',
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _batches(config, split='test', *, train=False, seed=0, num_batches=None, **kwargs):
  ds = input_pipeline.create_dataset(config, split, train=train, seed=seed, **kwargs)
  return list(itertools.islice(input_pipeline.as_numpy_iterator(ds), num_batches))


def _real_images(batches) -> list[bytes]:
  """Returns the unpadded images of eval batches as raw bytes, in order."""
  return [
      image.tobytes()
      for batch in batches
      for image, mask in zip(batch['image'], batch['mask'])
      if mask == 1.0
  ]


def test_train_batches_are_nhwc_float_in_unit_range(data_dir):
  (batch,) = _batches(_config(data_dir), 'train', train=True, num_batches=1, process_count=1)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (32, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  # Digits have black background and saturated strokes: both ends of the range occur.
  assert batch['image'].min() == pytest.approx(-1.0)
  assert batch['image'].max() == pytest.approx(1.0)
  assert set(batch['label']) <= set(range(10))


def test_batch_size_is_global_over_processes(data_dir):
  (batch,) = _batches(
      _config(data_dir), 'train', train=True, num_batches=1, process_index=1, process_count=2
  )
  assert batch['image'].shape == (16, 32, 32, 1)


def test_defaults_to_jax_process_layout(data_dir):
  (batch,) = _batches(_config(data_dir), num_batches=1)
  assert batch['image'].shape[0] == 32  # One process under test.


def test_batch_size_not_divisible_by_processes_is_a_user_error(data_dir):
  with pytest.raises(UserError, match='batch_size=33'):
    input_pipeline.create_dataset(
        _config(data_dir, batch_size=33), 'train', train=True, seed=0, process_count=2
    )


def test_eval_pass_covers_every_example_once_with_mask(data_dir):
  batches = _batches(_config(data_dir, batch_size=64), process_count=1)
  assert len(batches) == 5  # ceil(297 / 64)
  assert all(b['image'].shape == (64, 32, 32, 1) for b in batches)
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.dtype == np.float32
  np.testing.assert_array_equal(masks, np.arange(5 * 64) < NUM_TEST)  # Padding last.

  # The real examples are exactly the stored test images, each once, in stored order.
  stored = tfds.load('digits', split='test', data_dir=data_dir, shuffle_files=False)
  stored_images = [e['image'].tobytes() for e in tfds.as_numpy(stored)]
  images = np.concatenate([b['image'] for b in batches])[masks == 1.0]
  assert [p.tobytes() for p in input_pipeline.postprocess(images)] == stored_images

  assert _real_images(_batches(_config(data_dir, batch_size=64), process_count=1)) == (
      _real_images(batches)
  )


@pytest.mark.parametrize('train', [False, True])
def test_process_shards_are_disjoint_and_cover_the_split(data_dir, train):
  config = _config(data_dir, batch_size=64)
  split = 'train' if train else 'test'
  size = NUM_TRAIN if train else NUM_TEST
  shards = []
  for process_index in range(2):
    if train:
      # The first epoch of a shard comes before any repeat: 23 full batches of 32
      # hold 736 distinct examples out of the shard's 750.
      batches = _batches(
          config, split, train=True, num_batches=23, process_index=process_index, process_count=2
      )
      shards.append([image.tobytes() for b in batches for image in b['image']])
    else:
      batches = _batches(config, split, process_index=process_index, process_count=2)
      assert len(batches) == 5  # ceil(149 / 32), the same on both processes.
      shards.append(_real_images(batches))
  counts = [collections.Counter(shard) for shard in shards]
  assert all(max(c.values()) == 1 for c in counts)  # No repeats within a shard.
  assert not set(counts[0]) & set(counts[1])
  if not train:
    whole = collections.Counter(_real_images(_batches(config, split, process_count=1)))
    assert counts[0] + counts[1] == whole
    assert sum(whole.values()) == size


def test_shuffling_is_seeded(data_dir):
  config = _config(data_dir)

  def first_labels(seed):
    batches = _batches(config, 'train', train=True, seed=seed, num_batches=2, process_count=1)
    return np.concatenate([b['label'] for b in batches]), batches[0]['image']

  labels_a, images_a = first_labels(0)
  labels_b, images_b = first_labels(0)
  labels_c, images_c = first_labels(1)
  np.testing.assert_array_equal(labels_a, labels_b)
  np.testing.assert_array_equal(images_a, images_b)
  assert not np.array_equal(images_a, images_c)
  assert not np.array_equal(labels_a, labels_c)


def test_random_flip_mirrors_some_images_and_keeps_others(data_dir):
  def first_batch(random_flip):
    (batch,) = _batches(
        _config(data_dir, batch_size=64, random_flip=random_flip),
        'train',
        train=True,
        seed=3,
        num_batches=1,
        process_count=1,
    )
    return batch['image']

  plain, flipped = first_batch(False), first_batch(True)
  same = np.all(plain == flipped, axis=(1, 2, 3))
  mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert same.any() and mirrored.any()


def test_three_channels_tile_the_gray_image(data_dir):
  (gray,) = _batches(_config(data_dir), num_batches=1, process_count=1)
  (rgb,) = _batches(_config(data_dir, num_channels=3), num_batches=1, process_count=1)
  assert rgb['image'].shape == (32, 32, 32, 3)
  for channel in range(3):
    np.testing.assert_array_equal(rgb['image'][..., channel], gray['image'][..., 0])


def test_resize_keeps_range_and_brightness(data_dir):
  (full,) = _batches(_config(data_dir), num_batches=1, process_count=1)
  (small,) = _batches(_config(data_dir, image_size=16), num_batches=1, process_count=1)
  assert small['image'].shape == (32, 16, 16, 1)
  assert small['image'].min() >= -1.0 and small['image'].max() <= 1.0
  # An antialiased downsample averages, so each image's mean brightness survives.
  np.testing.assert_allclose(
      small['image'].mean(axis=(1, 2, 3)), full['image'].mean(axis=(1, 2, 3)), atol=0.02
  )


def test_unsupported_num_channels_is_a_user_error(data_dir):
  with pytest.raises(UserError, match='num_channels'):
    input_pipeline.create_dataset(_config(data_dir, num_channels=2), 'test', train=False, seed=0)


def test_without_label_key_labels_are_zero(data_dir):
  (batch,) = _batches(_config(data_dir, label_key=''), num_batches=1, process_count=1)
  np.testing.assert_array_equal(batch['label'], np.zeros(32, np.int32))


def test_unknown_dataset_is_a_one_line_user_error(data_dir):
  with pytest.raises(UserError) as error:
    input_pipeline.create_dataset(_config(data_dir, name='mnistt'), 'train', train=True, seed=0)
  message = str(error.value)
  assert "'mnistt'" in message and 'data.name' in message
  assert '\n' not in message


def test_unknown_split_is_a_one_line_user_error_naming_the_splits(data_dir):
  with pytest.raises(UserError) as error:
    input_pipeline.create_dataset(_config(data_dir), 'validation', train=False, seed=0)
  message = str(error.value)
  assert "'validation'" in message and "'digits'" in message
  assert 'test' in message and 'train' in message
  assert '\n' not in message


def test_dataset_info_counts_examples_and_classes(data_dir):
  info = input_pipeline.dataset_info(_config(data_dir))
  assert info.num_examples == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert info.num_classes == 10
  assert input_pipeline.dataset_info(_config(data_dir, label_key='')).num_classes == 0


def test_postprocess_inverts_the_scaling_and_clips():
  images = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 5, 1)
  pixels = input_pipeline.postprocess(images)
  assert pixels.dtype == np.uint8 and pixels.shape == images.shape
  np.testing.assert_array_equal(pixels.ravel(), [0, 0, 128, 255, 255])
  every_value = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(
      input_pipeline.postprocess(every_value.astype(np.float32) / 127.5 - 1.0), every_value
  )
