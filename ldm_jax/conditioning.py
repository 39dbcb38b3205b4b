"""Conditioning from config to batches: one spec per conditioner, and the dispatch over it.

`config.diffusion.conditioning.name` picks a `ConditionerSpec` of `CONDITIONERS`
('' = unconditional). A spec says, in one place, everything the layer above the
models needs to know about a conditioner: the features it reads from a batch and
how the input pipeline builds them, its config fields and their checks, and the
module that encodes the features for the denoiser (with its null condition, see
`ldm_jax.models.conditioners`). The jitted steps then see one fixed layout:

  class        label       the dataset label, embedded by the denoiser itself
                           (`num_classes` rows + the null class)
  text         tokens      [L] int32, the caption of `text.caption_key` tokenized
                           with the run's vocabulary (`stages.vocabulary_path`,
                           built from the training captions on the first run)
  precomputed  context     [L, D] float32, the TFDS feature `precomputed.context_key`
  concat       cond_image  [s, s, C] float32 in [-1, 1], s = image_size / concat.factor:
                           the image itself downsampled (antialiased area average), the
                           low-resolution input of super-resolution

A new conditioner: its module in `ldm_jax/models/conditioners.py`, one
`ConditionerSpec` entry here, and its config fields under
`config.diffusion.conditioning.<name>` in `configs/default.py`.
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from flax import linen as nn

from ldm_jax import fileio, input_pipeline, text
from ldm_jax.errors import UserError
from ldm_jax.models import conditioners

Features = Callable[[Mapping, tf.Tensor], dict[str, tf.Tensor]]
FeatureShapes = dict[str, tuple[tuple[int, ...], Any]]


@dataclasses.dataclass(frozen=True)
class ConditionerSpec:
  """What a conditioner is to the layer above the models.

  Attributes:
    feature_shapes: config -> {batch key: (per-example shape, dtype)} of the
      features it reads (for init, padding and the latent cache).
    pipeline_features: (config, vocabulary, train) -> a tf.data function
      (raw example, preprocessed image) -> {batch key: tensor}; None when the
      features are already in every batch (the label).
    check: config -> None; raises `UserError` for a field of its own section
      (`config.diffusion.conditioning.<name>`) or a model width that cannot work.
    module: (config, context_dim, latent_size) -> the Flax conditioner that maps
      the features and a drop mask to denoiser inputs (null condition where
      dropped), given the denoiser's context width and the latents' (h, w); None
      when the denoiser takes the features itself (class labels as `y`).
    uses_context: whether the module's output is a cross-attention context, so
      that the denoiser needs `context_dim > 0`.
    uses_vocabulary: whether it reads the run's text vocabulary.
    denoiser_labels: whether the denoiser embeds the features itself, as class
      labels `y` (its `num_classes` = the dataset's label count).
    from_eval_split: whether samples are conditioned on eval-split examples'
      features (a class model samples class rows instead).
    super_resolution: the features are the image at low resolution; evaluation
      then also super-resolves the eval split (`ldm_jax.superres`).
  """
  feature_shapes: Callable[[ml_collections.ConfigDict], FeatureShapes]
  pipeline_features: Callable[..., Features | None] = lambda config, vocabulary, train: None
  check: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  module: Callable[[ml_collections.ConfigDict, int, tuple[int, int]], nn.Module] | None = None
  uses_context: bool = False
  uses_vocabulary: bool = False
  denoiser_labels: bool = False
  from_eval_split: bool = True
  super_resolution: bool = False


def _read_feature(example: Mapping, key: str):
  """example[key], where 'a/b' reads a nested feature."""
  for part in key.split('/'):
    example = example[part]
  return example


def _check(config: ml_collections.ConfigDict, field: str, ok: bool, accepted: str) -> None:
  if not ok:
    value = config.diffusion.conditioning
    for key in field.split('.'):
      value = value[key]
    raise UserError(f'config.diffusion.conditioning.{field}={value!r} is not valid; '
                    f'accepted: {accepted}')


_positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0


# -------------------------------------------------------------------- class ----


# The dataset's labels are checked when the denoiser is built (`builders.num_classes`).
CLASS = ConditionerSpec(feature_shapes=lambda config: {'label': ((), np.int32)},
                        denoiser_labels=True, from_eval_split=False)


# --------------------------------------------------------------------- text ----


def _text_features(config, vocabulary: text.Vocabulary, train: bool) -> Features:
  """Multi-caption datasets (a list of captions per image, e.g. coco_captions) give a
  random caption per training example and the first one for evaluation."""
  c = config.diffusion.conditioning.text
  encode = vocabulary.tf_encoder(c.max_length)

  def features(example, image):
    del image
    caption = _read_feature(example, c.caption_key)
    if caption.shape.rank == 1:
      index = (tf.random.uniform([], 0, tf.shape(caption)[0], tf.int32) if train
               else tf.constant(0))
      caption = caption[index]
    return {'tokens': encode(caption)}
  return features


def _check_text(config: ml_collections.ConfigDict) -> None:
  c = config.diffusion.conditioning.text
  _check(config, 'text.caption_key', isinstance(c.caption_key, str) and c.caption_key,
         'the name of a TFDS text feature')
  _check(config, 'text.vocab_size',
         isinstance(c.vocab_size, int) and c.vocab_size > len(text.SPECIAL_TOKENS),
         f'an integer > {len(text.SPECIAL_TOKENS)} (the special tokens)')
  _check(config, 'text.max_length', isinstance(c.max_length, int) and c.max_length >= 2,
         'an integer >= 2 ([CLS] and at least one word)')
  _check(config, 'text.num_layers', _positive(c.num_layers), 'a positive integer')
  context_dim = denoiser_context_dim(config)
  _check(config, 'text.num_heads', _positive(c.num_heads) and context_dim % c.num_heads == 0,
         f'a positive divisor of diffusion.model.context_dim={context_dim}')


TEXT = ConditionerSpec(
    feature_shapes=lambda config: {
        'tokens': ((config.diffusion.conditioning.text.max_length,), np.int32)},
    pipeline_features=_text_features, check=_check_text,
    module=lambda config, context_dim, latent_size: conditioners.TextEncoder(
        vocab_size=config.diffusion.conditioning.text.vocab_size,
        max_length=config.diffusion.conditioning.text.max_length, context_dim=context_dim,
        num_layers=config.diffusion.conditioning.text.num_layers,
        num_heads=config.diffusion.conditioning.text.num_heads),
    uses_context=True, uses_vocabulary=True)


# -------------------------------------------------------------- precomputed ----


def _precomputed_features(config, vocabulary, train: bool) -> Features:
  del vocabulary, train
  key = config.diffusion.conditioning.precomputed.context_key

  def features(example, image):
    del image
    return {'context': tf.cast(_read_feature(example, key), tf.float32)}
  return features


PRECOMPUTED = ConditionerSpec(
    # The context length is the dataset's; 1 is what init and padding need.
    feature_shapes=lambda config: {'context': ((1, denoiser_context_dim(config)), np.float32)},
    pipeline_features=_precomputed_features,
    check=lambda config: _check(
        config, 'precomputed.context_key',
        isinstance(config.diffusion.conditioning.precomputed.context_key, str)
        and config.diffusion.conditioning.precomputed.context_key,
        'the name of a TFDS feature [L, context_dim]'),
    module=lambda config, context_dim, latent_size: conditioners.PrecomputedContext(
        context_dim=context_dim),
    uses_context=True)


# ------------------------------------------------------------------- concat ----


def cond_image_size(config: ml_collections.ConfigDict) -> int:
  return config.data.image_size // config.diffusion.conditioning.concat.factor


def _concat_features(config, vocabulary, train: bool) -> Features:
  del vocabulary, train
  size = cond_image_size(config)

  def features(example, image):
    del example
    return {'cond_image': downsample(image, size)}
  return features


CONCAT = ConditionerSpec(
    feature_shapes=lambda config: {'cond_image': (
        (cond_image_size(config), cond_image_size(config), config.data.num_channels),
        np.float32)},
    pipeline_features=_concat_features,
    check=lambda config: _check(
        config, 'concat.factor', _positive(config.diffusion.conditioning.concat.factor)
        and config.data.image_size % config.diffusion.conditioning.concat.factor == 0,
        f'a positive divisor of data.image_size={config.data.image_size}'),
    module=lambda config, context_dim, latent_size: conditioners.ConcatCondition(
        latent_size=latent_size),
    super_resolution=True)


NONE = ConditionerSpec(feature_shapes=lambda config: {}, from_eval_split=False)

CONDITIONERS: dict[str, ConditionerSpec] = {
    '': NONE,
    'class': CLASS,
    'text': TEXT,
    'precomputed': PRECOMPUTED,
    'concat': CONCAT,
}


# ----------------------------------------------------------------- dispatch ----


def spec(config: ml_collections.ConfigDict) -> ConditionerSpec:
  """The spec of `config.diffusion.conditioning.name`."""
  name = config.diffusion.conditioning.name
  if name not in CONDITIONERS:
    raise UserError(f'config.diffusion.conditioning.name={name!r} is not valid; accepted: '
                    f'{", ".join(repr(n) for n in CONDITIONERS)}')
  return CONDITIONERS[name]


def denoiser_context_dim(config: ml_collections.ConfigDict) -> int:
  """The context width of the configured denoiser (0 without cross-attention)."""
  return config.diffusion.model.get('context_dim', 0)


def has_module(config: ml_collections.ConfigDict) -> bool:
  """Whether the conditioner is a module of its own (trained with the denoiser)."""
  return spec(config).module is not None


def check(config: ml_collections.ConfigDict) -> None:
  """Raises `UserError` for a conditioning field, or a context width, that cannot work."""
  s = spec(config)
  name = config.diffusion.conditioning.name
  context_dim = denoiser_context_dim(config)
  if s.uses_context and not (isinstance(context_dim, int) and context_dim > 0):
    raise UserError(f'config.diffusion.model.context_dim={context_dim!r} is not valid; '
                    f'accepted: a positive integer (the context width) for '
                    f'conditioning.name={name}')
  if not s.uses_context and context_dim != 0:
    context_names = ', '.join(n for n, c in CONDITIONERS.items() if c.uses_context)
    raise UserError(f'config.diffusion.model.context_dim={context_dim!r} is not valid; '
                    f'accepted: 0 for conditioning.name={name!r} (no context); a context '
                    f'needs name {context_names}')
  s.check(config)


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch keys the configured conditioner reads."""
  return tuple(spec(config).feature_shapes(config))


def feature_shapes(config: ml_collections.ConfigDict) -> FeatureShapes:
  """Per-example shape and dtype of each conditioning feature (for init and padding)."""
  return spec(config).feature_shapes(config)


def build_module(config: ml_collections.ConfigDict,
                 latent_size: tuple[int, int]) -> nn.Module | None:
  """The conditioner module for latents of (h, w) `latent_size` (None for none or labels)."""
  s = spec(config)
  return s.module(config, denoiser_context_dim(config), latent_size) if s.module else None


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


def training_captions(config: ml_collections.ConfigDict) -> list[str]:
  """Every caption of the training split (all of them for multi-caption datasets)."""
  builder = input_pipeline.prepared_builder(config.data)  # Prepares the dataset if needed.
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
  if not spec(config).uses_vocabulary:
    return None
  if fileio.exists(path):
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
  """A tf.data function (raw example, preprocessed image) -> conditioning features."""
  return spec(config).pipeline_features(config, vocabulary, train)


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
  up). Otherwise the conditions of the first eval-split examples (their captions,
  low-resolution images, contexts). None, None without a conditioner module (class
  labels are the sampler's, `config.sample.class_label`).

  Raises:
    UserError: prompts for a model that is not text-conditioned, or a bad prompt.
  """
  s = spec(config)
  if prompts and not s.uses_vocabulary:
    raise UserError(f'--prompt needs a text-conditioned model '
                    f'(config.diffusion.conditioning.name=text), got '
                    f'{config.diffusion.conditioning.name!r}')
  if prompts:
    per_prompt = -(-num_samples // len(prompts))
    tokens = prompt_tokens(prompts, vocabulary, config.diffusion.conditioning.text.max_length,
                           per_prompt)
    return {'tokens': tokens[:num_samples]}, per_prompt
  if not s.from_eval_split:
    return None, None
  return eval_conditions(config, vocabulary, num_samples)[0], None


def eval_conditions(config: ml_collections.ConfigDict, vocabulary: text.Vocabulary | None,
                    num_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The conditions of the first `num_samples` eval-split examples, and their labels.

  The labels say what a sample should show when the condition names it (a
  caption's digit), for measuring agreement with a classifier.
  """
  examples = eval_examples(config, vocabulary, num_samples)
  return {k: examples[k] for k in batch_keys(config)}, examples['label']
