"""Conditioning from config to batches: features, vocabulary, dropout and null conditions.

`config.diffusion.conditioning.name` picks a conditioner of
`ldm_jax.models.conditioners` ('' = none: the U-Net sees at most its own class
labels, `config.diffusion.class_conditional`). This module settles what the
conditioner reads in the input pipeline, so that the jitted steps see one fixed
layout:

  class        label       (already in every batch)
  text         tokens      [L] int32, the caption of `text.caption_key` tokenized
                           with the run's vocabulary (`WORKDIR/diffusion/vocabulary.txt`,
                           built from the training captions on the first run)
  precomputed  context     [L, D] float32, the TFDS feature `precomputed.context_key`
  concat       cond_image  [s, s, C] float32 in [-1, 1], s = image_size / concat.factor:
                           the image itself downsampled (antialiased area average), the
                           low-resolution input of super-resolution
"""
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from ldm_jax import input_pipeline, text
from ldm_jax.errors import UserError

NAMES = ('', 'class', 'text', 'precomputed', 'concat')
# The batch keys each conditioner reads.
BATCH_KEYS = {'': (), 'class': ('label',), 'text': ('tokens',), 'precomputed': ('context',),
              'concat': ('cond_image',)}

Features = Callable[[Mapping, tf.Tensor], dict[str, tf.Tensor]]


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch keys the configured conditioner reads."""
  return BATCH_KEYS[config.diffusion.conditioning.name]


def uses_context(config: ml_collections.ConfigDict) -> bool:
  """Whether the conditioner produces a cross-attention context."""
  return config.diffusion.conditioning.name in ('class', 'text', 'precomputed')


def cond_image_size(config: ml_collections.ConfigDict) -> int:
  return config.data.image_size // config.diffusion.conditioning.concat.factor


def feature_shapes(config: ml_collections.ConfigDict,
                   context_length: int = 1) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Per-example shape and dtype of each conditioning feature (for init and padding)."""
  c = config.diffusion.conditioning
  if c.name == 'text':
    return {'tokens': ((c.text.max_length,), np.int32)}
  if c.name == 'precomputed':
    return {'context': ((context_length, config.diffusion.model.context_dim), np.float32)}
  if c.name == 'concat':
    size = cond_image_size(config)
    return {'cond_image': ((size, size, config.data.num_channels), np.float32)}
  if c.name == 'class':
    return {'label': ((), np.int32)}
  return {}


def example_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
  """Zeros of every conditioning feature, e.g. to initialise the model."""
  return {key: jnp.zeros((batch_size, *shape), dtype)
          for key, (shape, dtype) in feature_shapes(config).items()}


def drop_mask(rng: jax.Array, batch_size: int, prob: float) -> jax.Array:
  """[B] bool, True with probability `prob`: the examples trained on the null condition."""
  return jax.random.uniform(rng, (batch_size,)) < prob


def freeze_conditioner(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the U-Net's parameters; the conditioner's stay as they are."""
  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: 'frozen' if k == 'conditioner' else 'train', v)
            for k, v in params.items()}
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


# ------------------------------------------------------------- vocabulary ----


def _read_feature(example: Mapping, key: str):
  """example[key], where 'a/b' reads a nested feature."""
  for part in key.split('/'):
    example = example[part]
  return example


def training_captions(config: ml_collections.ConfigDict) -> list[str]:
  """Every caption of the training split (all of them for multi-caption datasets)."""
  input_pipeline.dataset_info(config.data)  # Prepares the dataset if needed.
  builder = tfds.builder(config.data.name, data_dir=config.data.data_dir or None)
  ds = builder.as_dataset(split=config.data.train_split, shuffle_files=False)
  key = config.diffusion.conditioning.text.caption_key
  captions = []
  for example in ds.map(lambda e: {'caption': _read_feature(e, key)}).as_numpy_iterator():
    values = np.atleast_1d(example['caption'])
    captions.extend(v.decode('utf-8') for v in values)
  return captions


def load_or_build_vocabulary(config: ml_collections.ConfigDict, path: str, *,
                             build: bool) -> text.Vocabulary | None:
  """The run's vocabulary (text conditioning only; None otherwise).

  Args:
    config: the run's config.
    path: the vocabulary file (`stages.vocabulary_path` of the run).
    build: build it from the training captions when the file is missing (training);
      otherwise a missing file is an error (sampling).
  """
  if config.diffusion.conditioning.name != 'text':
    return None
  if os.path.exists(path):
    return text.Vocabulary.load(path)
  if not build:
    raise UserError(f'no vocabulary at {path}; run --mode=train first')
  vocabulary = text.Vocabulary.build(training_captions(config),
                                     config.diffusion.conditioning.text.vocab_size)
  if jax.process_index() == 0:
    vocabulary.save(path)
  logging.info('text: vocabulary of %d tokens saved to %s', len(vocabulary), path)
  return vocabulary


# ---------------------------------------------------------------- pipeline ----


def pipeline_features(config: ml_collections.ConfigDict,
                      vocabulary: text.Vocabulary | None, *, train: bool) -> Features | None:
  """A tf.data function (raw example, preprocessed image) -> conditioning features.

  Multi-caption datasets (a list of captions per image, e.g. coco_captions) give
  a random caption per training example and the first one for evaluation.
  """
  c = config.diffusion.conditioning
  if c.name == 'text':
    encode = vocabulary.tf_encoder(c.text.max_length)

    def features(example, image):
      del image
      caption = _read_feature(example, c.text.caption_key)
      if caption.shape.rank == 1:
        index = (tf.random.uniform([], 0, tf.shape(caption)[0], tf.int32) if train
                 else tf.constant(0))
        caption = caption[index]
      return {'tokens': encode(caption)}
  elif c.name == 'precomputed':
    def features(example, image):
      del image
      return {'context': tf.cast(_read_feature(example, c.precomputed.context_key), tf.float32)}
  elif c.name == 'concat':
    size = cond_image_size(config)

    def features(example, image):
      del example
      return {'cond_image': downsample(image, size)}
  else:
    return None
  return features


def downsample(image, size: int):
  """[H, W, C] in [-1, 1] -> [size, size, C] by area averaging (antialiased)."""
  return tf.image.resize(image, [size, size], method='area', antialias=True)


def bicubic_upsample(images: np.ndarray, size: int) -> np.ndarray:
  """[N, s, s, C] in [-1, 1] -> [N, size, size, C], bicubic (the super-resolution baseline)."""
  images = jnp.asarray(images, jnp.float32)
  n, _, _, c = images.shape
  return np.asarray(jnp.clip(jax.image.resize(images, (n, size, size, c), method='cubic'),
                             -1.0, 1.0))


# ---------------------------------------------------------------- sampling ----


def eval_examples(config: ml_collections.ConfigDict, vocabulary: text.Vocabulary | None,
                  num_examples: int) -> dict[str, np.ndarray]:
  """The first `num_examples` examples of the eval split, with conditioning features.

  Fewer examples than asked for are repeated in order.
  """
  ds = input_pipeline.create_dataset(
      config.data, config.data.eval_split, train=False, seed=config.seed,
      process_index=0, process_count=1,
      features=pipeline_features(config, vocabulary, train=False))
  batches, count = [], 0
  for batch in ds.as_numpy_iterator():
    real = batch['mask'] > 0
    batches.append({k: v[real] for k, v in batch.items()})
    count += int(real.sum())
    if count >= num_examples:
      break
  examples = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return {k: np.take(v, np.arange(num_examples) % len(v), axis=0) for k, v in examples.items()}


def prompt_tokens(prompts: list[str], vocabulary: text.Vocabulary, max_length: int,
                  samples_per_prompt: int) -> np.ndarray:
  """[len(prompts) * samples_per_prompt, max_length] tokens, prompt by prompt.

  Raises:
    UserError: a prompt has a word outside the vocabulary (the message lists it)
      or more words than fit.
  """
  tokens = np.stack([vocabulary.encode(p, max_length, strict=True) for p in prompts])
  return np.repeat(tokens, samples_per_prompt, axis=0)


def sample_conditions(config: ml_collections.ConfigDict, vocabulary: text.Vocabulary | None,
                      num_samples: int, prompts: list[str] | None = None
                      ) -> tuple[dict[str, np.ndarray] | None, int | None]:
  """What each of `num_samples` samples is conditioned on, and the grid's columns.

  Text with `prompts`: one grid row per prompt, num_samples split evenly (rounded
  up). Class context: one row per class, as for class labels. Otherwise the
  conditions of the first eval-split examples (their captions, low-resolution
  images, contexts). None, None without a conditioner.

  Raises:
    UserError: prompts for a model that is not text-conditioned, or a bad prompt.
  """
  name = config.diffusion.conditioning.name
  if prompts and name != 'text':
    raise UserError(f'--prompt needs a text-conditioned model '
                    f'(config.diffusion.conditioning.name=text), got {name!r}')
  if not name:
    return None, None
  if prompts:
    per_prompt = -(-num_samples // len(prompts))
    tokens = prompt_tokens(prompts, vocabulary, config.diffusion.conditioning.text.max_length,
                           per_prompt)
    return {'tokens': tokens[:num_samples]}, per_prompt
  if name == 'class':
    num_classes = input_pipeline.dataset_info(config.data).num_classes
    per_class = -(-num_samples // num_classes)
    return {'label': (np.arange(num_samples) // per_class).astype(np.int32)}, per_class
  return eval_conditions(config, vocabulary, num_samples)[0], None


def eval_conditions(config: ml_collections.ConfigDict, vocabulary: text.Vocabulary | None,
                    num_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The conditions of the first `num_samples` eval-split examples, and their labels.

  The labels say what a sample should show when the condition names it (a
  caption's digit), for measuring agreement with a classifier.
  """
  examples = eval_examples(config, vocabulary, num_samples)
  keys = BATCH_KEYS[config.diffusion.conditioning.name]
  return {k: examples[k] for k in keys}, examples['label']
