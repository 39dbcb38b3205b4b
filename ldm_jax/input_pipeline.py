"""TFDS input pipeline: per-process shards of any image dataset, as [-1, 1] NHWC batches.

All format decisions (crop, resize, channels, value range, labels) are settled
here, so that train and sample steps see one fixed layout whatever the dataset.

Fields of `config.data` (all are read; the config supplies the defaults):
  name: TFDS name, with config and version if needed: 'digits' (embedded, no
    download), 'mnist', 'cifar10', 'celeb_a_hq/256', ...; or 'folder' for the
    images under `folder` (see `ldm_jax.datasets.folder`).
  folder: with name='folder', a directory (local or a `gs://` URI) of images.
  data_dir: TFDS data directory; '' or None means TFDS's default
    (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
  image_size: output images are image_size x image_size. A non-square source is
    center-cropped to a square first; a source of another size is resized with
    antialiased bilinear filtering.
  num_channels: 1 or 3. Gray sources are tiled to RGB, RGB sources are reduced
    to luminance; any other mismatch is an error.
  batch_size: GLOBAL batch size, summed over all processes; each process gets
    batch_size // process_count examples per batch.
  train_split: split used for training, e.g. 'train' (TFDS slicing such as
    'train[:90%]' works).
  eval_split: split used for evaluation, e.g. 'test'.
  shuffle_buffer: number of examples in the train shuffle buffer.
  random_flip: whether training images are flipped left-right at random.
  image_key: feature that holds the image, usually 'image'.
  label_key: feature that holds the integer class label, or '' when the dataset
    has none (labels are then all zero).

Batches are dicts of NumPy-convertible tensors:
  image: float32 [b, image_size, image_size, num_channels] in [-1, 1]
  label: int32 [b]
  mask:  float32 [b], eval only: 1 for real examples, 0 for padding.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import math
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import ldm_jax.datasets  # pylint: disable=unused-import  # Registers the embedded builders.
from ldm_jax.datasets import folder
from ldm_jax.errors import UserError

# The input pipeline only needs the host CPU; without this, TensorFlow would reserve
# accelerator memory that JAX needs.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  # TensorFlow was already initialized elsewhere; its device choice stands.
  pass

Batch = dict[str, np.ndarray]
# `data.name` of an image folder (`data.folder`) read through `ldm_jax.datasets.folder`.
FOLDER = 'folder'
# Longest cause quoted in a UserError; TFDS messages can list hundreds of datasets.
_MAX_REASON_CHARS = 200


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a run needs to know about a dataset before building models.

  Attributes:
    num_examples: number of examples per split name, e.g. {'train': 1500, 'test': 297}.
    num_classes: number of classes of the label feature, or 0 when the dataset has
      no class labels (then class-conditioning is not possible).
  """

  num_examples: dict[str, int]
  num_classes: int


def _short_reason(error: BaseException) -> str:
  """Returns the first line of an exception's message, with its type, shortened."""
  lines = str(error).strip().splitlines()
  message = lines[0] if lines else ''
  if len(message) > _MAX_REASON_CHARS:
    message = message[: _MAX_REASON_CHARS - 3] + '...'
  return f'{type(error).__name__}: {message}' if message else type(error).__name__


def source_identity(data_config: Any) -> dict[str, str]:
  """What identifies the data beyond `data.name`, for caches that depend on it: an image
  folder's contents (`folder.identity`: its path and file names); {} for TFDS datasets."""
  if data_config.name == FOLDER:
    return {'folder': folder.identity(data_config.folder)}
  return {}


def prepared_builder(data_config: Any) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder for `data_config.name`, downloading and preparing it once.

  Raises:
    UserError: the name is unknown, or the data cannot be downloaded or prepared.
  """
  name = data_config.name
  folder_path = data_config.get('folder', '')
  if folder_path and name != FOLDER:
    raise UserError(f'config.data.folder={folder_path!r} is set but config.data.name={name!r}; '
                    f'accepted: data.name={FOLDER!r} with a folder, or data.folder=\'\'')
  try:
    if name == FOLDER:
      builder = folder.builder(folder_path, data_dir=data_config.data_dir or None)
    else:
      builder = tfds.builder(name, data_dir=data_config.data_dir or None)
  except folder.FolderError as e:
    raise UserError(str(e)) from None
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'dataset {name!r} not found in TFDS (check data.name)') from None
  except Exception as e:  # pylint: disable=broad-except
    # Bad config or version suffixes, unreadable data_dir, ...: all are the user's to fix.
    raise UserError(f'could not load dataset {name!r}: {_short_reason(e)}') from e
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      # Network failures, manual-download datasets and missing optional packages all
      # surface here with unrelated exception types; the cause is what the user needs.
      raise UserError(
          f'could not download or prepare dataset {name!r} '
          f'(no network, or a manual download missing?): {_short_reason(e)}'
      ) from e
  return builder


def _check_split(builder: tfds.core.DatasetBuilder, name: str, split: str) -> None:
  """Raises a UserError naming the available splits when `split` cannot be read."""
  try:
    builder.info.splits[split]  # Also validates slices such as 'train[:10%]'.
  except Exception:  # pylint: disable=broad-except
    available = ', '.join(sorted(builder.info.splits))
    raise UserError(
        f'split {split!r} not in dataset {name!r} '
        f'(available splits: {available})'
    ) from None


def _source_channels(builder: tfds.core.DatasetBuilder, data_config: Any) -> int:
  """Returns the channel count of the image feature, checked against the config."""
  features = builder.info.features
  name = data_config.name
  for key in (data_config.image_key, data_config.label_key):
    if key and key not in features and name == FOLDER and key == data_config.label_key:
      raise UserError(f'the images in data.folder={data_config.folder!r} are not all in class '
                      f'directories, so there are no labels; accepted: '
                      f"data.label_key='' and diffusion.conditioning.name other than 'class'")
    if key and key not in features:
      raise UserError(
          f'dataset {name!r} has no feature {key!r} (features: {", ".join(sorted(features))})'
      )
  shape = features[data_config.image_key].shape
  source = shape[-1] if shape else None
  target = data_config.num_channels
  if target not in (1, 3):
    raise UserError(f'data.num_channels must be 1 or 3, got {target}')
  if source not in (1, 3):
    raise UserError(
        f'dataset {name!r} has images of shape {shape}; only 1 or 3 channels are supported'
    )
  return source


def _preprocess_image(
    image: tf.Tensor, *, source_channels: int, num_channels: int, image_size: int
) -> tf.Tensor:
  """Maps one decoded image [h, w, c] to float32 [image_size, image_size, num_channels] in [-1, 1]."""
  # Integer images span their dtype's range (uint8 and uint16 in TFDS); float images
  # are taken to be in [0, 1].
  max_value = image.dtype.max if image.dtype.is_integer else 1.0
  image = tf.cast(image, tf.float32) * (2.0 / max_value) - 1.0
  if source_channels == 1 and num_channels == 3:
    image = tf.tile(image, [1, 1, 3])
  elif source_channels == 3 and num_channels == 1:
    image = tf.image.rgb_to_grayscale(image)

  height, width = image.shape[0], image.shape[1]
  if height is None or width is None or height != width:
    dynamic_shape = tf.shape(image)
    side = tf.minimum(dynamic_shape[0], dynamic_shape[1])
    top = (dynamic_shape[0] - side) // 2
    left = (dynamic_shape[1] - side) // 2
    image = image[top : top + side, left : left + side]
  if height != image_size or width != image_size:
    image = tf.image.resize(image, [image_size, image_size], method='bilinear', antialias=True)
  image = tf.ensure_shape(image, [image_size, image_size, num_channels])
  # Resizing can land a rounding error outside the range the models assume.
  return tf.clip_by_value(image, -1.0, 1.0)


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(
        f'data.batch_size={batch_size} must be a positive multiple of the number of '
        f'processes ({process_count})'
    )
  return batch_size // process_count


def create_dataset(
    data_config: Any,
    split: str,
    *,
    train: bool,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    features: Callable[[Mapping[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]] | None = None,
) -> tf.data.Dataset:
  """Builds this process's stream of batches of one split.

  Each process reads its own contiguous part of the split, so together the
  processes see every example once per epoch.

  With `train=True` the stream is infinite and a pure function of `seed`: epoch
  `e` is the process's part of the split in file order, shuffled through a
  `shuffle_buffer`-sized buffer seeded by (`seed`, `e`); images are optionally
  flipped, keyed by (`seed`, position in the stream); batches are always full and
  may straddle epochs. `start_step=k` starts at the k-th batch of that stream, so a
  resumed run sees exactly the batches an uninterrupted one would; it reads (but
  does not decode) at most one epoch to get there. With `train=False` it is one pass in a fixed order; the last batch
  is padded to full size and `mask` marks the real examples. All processes get the
  same number of eval batches, so collective eval steps stay in lockstep.

  Args:
    data_config: the `config.data` fields documented in this module.
    split: TFDS split, e.g. `data_config.train_split`.
    train: training stream (shuffled, repeated) or eval pass.
    seed: seeds the shuffling and augmentation of the training stream.
    start_step: number of training batches to pass over (a resumed run's step).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    features: optional (raw example, preprocessed image) -> dict of extra
      fixed-shape tensors to add to each example, e.g. conditioning features.

  Returns:
    A dataset of dicts: 'image' float32 [b, H, W, C] in [-1, 1], 'label' int32 [b],
    the keys of `features` and, for eval, 'mask' float32 [b];
    b = batch_size // process_count. Eval padding examples are all zeros.

  Raises:
    UserError: unknown dataset or split, unsupported channels, or a batch size that
      does not divide by the number of processes.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_batch_size = _local_batch_size(data_config.batch_size, process_count)

  builder = prepared_builder(data_config)
  _check_split(builder, data_config.name, split)
  source_channels = _source_channels(builder, data_config)

  process_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count
  )
  image_key, label_key = data_config.image_key, data_config.label_key
  image_size, num_channels = data_config.image_size, data_config.num_channels
  if train:
    first_example = start_step * local_batch_size
    ds = _train_examples(builder, process_split, data_config, seed, first_example)
    decode = builder.info.features[image_key].decode_example
  else:
    ds = builder.as_dataset(split=process_split, shuffle_files=False)
    decode = lambda image: image

  def preprocess(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = _preprocess_image(
        decode(example[image_key]),
        source_channels=source_channels,
        num_channels=num_channels,
        image_size=image_size,
    )
    label = tf.cast(example[label_key], tf.int32) if label_key else tf.zeros([], tf.int32)
    extra = features(example, image) if features else {}
    return {'image': image, 'label': label, **extra}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)

  if train:
    if data_config.random_flip:
      # Stateless flips keyed by (seed, position in the stream): reproducible, different
      # in every epoch, and the same after a resume.
      positions = tf.data.Dataset.counter(first_example)

      def flip(example: dict[str, tf.Tensor], position: tf.Tensor) -> dict[str, tf.Tensor]:
        flip_seed = tf.stack([tf.constant(seed, tf.int64), position])
        image = tf.image.stateless_random_flip_left_right(example['image'], flip_seed)
        return {**example, 'image': image}

      ds = tf.data.Dataset.zip(ds, positions).map(flip, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True)
  else:
    ds = ds.map(lambda example: {**example, 'mask': tf.ones([], tf.float32)})
    num_batches = _num_eval_batches(builder, split, local_batch_size, process_count)
    padding = tf.data.Dataset.from_tensors({
        key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()
    }).repeat()
    ds = ds.concatenate(padding).take(num_batches * local_batch_size)
    ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _train_examples(builder: tfds.core.DatasetBuilder, process_split: str, data_config: Any,
                    seed: int, first_example: int) -> tf.data.Dataset:
  """The infinite shuffled example stream of one process, from example `first_example`.

  Images stay encoded (decoded later by the caller), so passing over examples to
  reach `first_example` costs reading, not decoding.
  """
  num_examples = builder.info.splits[process_split].num_examples
  if num_examples == 0:
    raise UserError(f'split {process_split!r} of dataset {data_config.name!r} has no '
                    f'examples for this process; accepted: a split with at least one '
                    f'example per process')
  examples = builder.as_dataset(split=process_split, shuffle_files=False,
                                decoders={data_config.image_key: tfds.decode.SkipDecoding()})
  first_epoch, offset = divmod(first_example, num_examples)

  def epoch(index: tf.Tensor) -> tf.data.Dataset:
    # TF reduces op seeds modulo 2**31 - 1; a prime multiplier below that keeps the
    # (seed, epoch) pairs of any realistic run apart.
    epoch_seed = tf.constant(seed, tf.int64) * 1_000_003 + index
    return examples.shuffle(data_config.shuffle_buffer, seed=epoch_seed,
                            reshuffle_each_iteration=False)

  return tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)


def _num_eval_batches(
    builder: tfds.core.DatasetBuilder, split: str, local_batch_size: int, process_count: int
) -> int:
  """Returns the eval batches per process: enough for the largest process's part."""
  largest = max(
      builder.info.splits[
          tfds.split_for_jax_process(split, process_index=i, process_count=process_count)
      ].num_examples
      for i in range(process_count)
  )
  return max(1, math.ceil(largest / local_batch_size))


def as_numpy_iterator(ds: tf.data.Dataset) -> Iterator[Batch]:
  """Iterates over a dataset from `create_dataset` as dicts of NumPy arrays."""
  return ds.as_numpy_iterator()


def dataset_info(data_config: Any) -> DatasetInfo:
  """Returns split sizes and class count of `data_config.name`, preparing it if needed.

  Raises:
    UserError: the dataset cannot be found or prepared, or lacks a configured feature.
  """
  builder = prepared_builder(data_config)
  _source_channels(builder, data_config)  # Validates the feature keys.
  num_examples = {name: info.num_examples for name, info in builder.info.splits.items()}
  num_classes = 0
  if data_config.label_key:
    label_feature = builder.info.features[data_config.label_key]
    if isinstance(label_feature, tfds.features.ClassLabel):
      num_classes = label_feature.num_classes
  return DatasetInfo(num_examples=num_examples, num_classes=num_classes)


def postprocess(images: np.ndarray | jax.Array) -> np.ndarray:
  """Maps model-space images back to pixels for saving.

  Args:
    images: float [..., H, W, C] in [-1, 1]; values outside are clipped.

  Returns:
    uint8 [..., H, W, C] in [0, 255], the inverse of the pipeline's scaling.
  """
  pixels = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
