"""Tests for conditioning: tokenizer, captions, conditioners, dropout, guidance, training."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import coco_text2img, digits_superres, digits_text, imagenet_sr4x
from ldm_jax import builders, conditioning, generate, input_pipeline, optim, sampling
from ldm_jax import stages
from ldm_jax import latent_cache, modes, sharding, superres, text, train
from ldm_jax.datasets import digits_captions
from ldm_jax.errors import UserError
from ldm_jax.models import conditioners
from ldm_jax.validation import validate_config


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl='unsafe_rbg')


# ------------------------------------------------------------------ tokenizer ----


def test_vocabulary_by_frequency_and_encoding():
  vocabulary = text.Vocabulary.build(['a thick seven', 'A thin SEVEN!', 'a two'], vocab_size=6)
  assert vocabulary.tokens == (*text.SPECIAL_TOKENS, 'a', 'seven', 'thick')  # Ties: a-z.
  ids = vocabulary.encode('a seven, a two', 6)  # 'two' did not make the cut: [UNK].
  np.testing.assert_array_equal(ids, [text.CLS, 3, 4, 3, text.UNK, text.PAD])
  np.testing.assert_array_equal(vocabulary.encode('seven seven seven seven seven', 3),
                                [text.CLS, 4, 4])  # Cut to max_length.
  assert vocabulary.decode(ids) == 'a seven a'
  np.testing.assert_array_equal(text.empty_caption(4), [text.CLS, text.PAD, text.PAD, text.PAD])


def test_prompts_are_strict(tmp_path):
  vocabulary = text.Vocabulary.build(['a thick seven', 'a two'], vocab_size=10)
  path = str(tmp_path / 'vocabulary.txt')
  vocabulary.save(path)
  assert text.Vocabulary.load(path).tokens == vocabulary.tokens
  with pytest.raises(UserError, match="unknown word\\(s\\) 'fat' in 'a fat seven'; accepted "
                                      "words: a seven thick two$"):
    vocabulary.encode('a fat seven', 8, strict=True)
  with pytest.raises(UserError, match='at most 2'):
    vocabulary.encode('a thick seven', 3, strict=True)
  with pytest.raises(UserError, match="unknown word\\(s\\) 'cls'"):
    vocabulary.encode('[CLS] seven', 8, strict=True)  # Brackets separate: no special tokens.


def test_tensorflow_tokenizer_matches_python():
  vocabulary = text.Vocabulary.build(['a thick seven', "it's a two", 'large 3'], vocab_size=20)
  encode = vocabulary.tf_encoder(6)
  for caption in ['a thick seven', '  A  two!! seven;', "it's 3 unknown words here x", '', '??']:
    np.testing.assert_array_equal(encode(tf.constant(caption)).numpy(),
                                  vocabulary.encode(caption, 6), err_msg=caption)


# ------------------------------------------------------------------- captions ----


def test_measure_closed_forms():
  image = np.zeros((32, 32, 1), np.uint8)
  image[4:12, 10:14] = 255  # An upright 8x4 bar.
  m = digits_captions.measure(image)
  assert m['thickness'] == pytest.approx(32.0) and m['size'] == 32.0
  assert m['slant'] == pytest.approx(0.0)
  slanted = np.zeros((32, 32, 1), np.uint8)
  for row in range(4, 20):  # Leaning right: the top is further right than the bottom.
    slanted[row, 20 - row // 2] = 255
  assert digits_captions.measure(slanted)['slant'] == pytest.approx(0.5, abs=0.05)


def test_captions_name_digit_and_per_digit_thirds():
  rng = np.random.default_rng(0)
  images = np.zeros((60, 32, 32, 1), np.uint8)
  labels = np.repeat([3, 7], 30)
  for i in range(60):  # Bars of growing width: thickness and size grow with i % 30.
    width = 1 + (i % 30) // 3
    images[i, 8:20, 10:10 + width] = rng.integers(200, 256)
  captions = digits_captions.captions(images, labels)
  assert all(c.startswith('a ') for c in captions)
  assert all(c.endswith(' three') for c in captions[:30]) and captions[30].endswith(' seven')
  for offset in (0, 30):
    words = [c.split() for c in captions[offset:offset + 30]]
    assert sum('thin' in w for w in words) == 10 and sum('thick' in w for w in words) == 10
    assert 'thin' in words[0] and 'thick' in words[-1]


@pytest.fixture(scope='module')
def captions_data_dir(digits_data_dir):
  tfds.builder('digits_captions', data_dir=digits_data_dir).download_and_prepare()
  return digits_data_dir


def test_digits_captions_builder_keeps_digits_and_adds_captions(captions_data_dir):
  read = lambda name: list(tfds.as_numpy(tfds.builder(name, data_dir=captions_data_dir)
                                         .as_dataset(split='test', shuffle_files=False)))
  plain, captioned = read('digits'), read('digits_captions')
  assert len(plain) == len(captioned) == 297
  for a, b in zip(plain[:20], captioned[:20]):
    assert a['index'] == b['index'] and a['label'] == b['label']
    np.testing.assert_array_equal(a['image'], b['image'])
    assert b['caption'].decode().split()[-1] == digits_captions.DIGIT_WORDS[b['label']]


# ---------------------------------------------------------------- conditioners ----


def _encode(module, batch, drop):
  params = jax.jit(module.init)(_key(0), batch, drop)
  return params, module.apply(params, batch, drop)


def test_text_encoder_null_is_the_empty_caption_and_rows_are_independent():
  module = conditioners.TextEncoder(vocab_size=10, max_length=5, context_dim=8, num_heads=2)
  tokens = jnp.array([[1, 4, 5, 0, 0], [1, 6, 0, 0, 0], [1, 7, 8, 9, 4]])
  drop = jnp.array([False, True, False])
  params, out = _encode(module, {'tokens': tokens}, drop)
  np.testing.assert_array_equal(out['context_mask'],
                                [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
  empty = jnp.asarray(text.empty_caption(5))[None]
  null = module.apply(params, {'tokens': empty}, jnp.array([False]))
  np.testing.assert_allclose(out['context'][1], null['context'][0], rtol=1e-6, atol=1e-6)
  # Real positions do not see the padding: changing a padded token's id would be
  # visible only through the mask, so shortening a caption changes only its own row.
  shorter = module.apply(params, {'tokens': tokens.at[2, 4].set(0)}, drop)
  np.testing.assert_allclose(shorter['context'][0], out['context'][0], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(shorter['context'][2, :4] - out['context'][2, :4])).max() > 1e-4


def test_precomputed_context_masks_zero_rows_and_learns_a_null_token():
  module = conditioners.PrecomputedContext(context_dim=3)
  context = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)
  context = context.at[0, 2:].set(0.0).at[1].set(0.0)
  params, out = _encode(module, {'context': context}, jnp.array([False, True]))
  np.testing.assert_array_equal(out['context_mask'], [[1, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(out['context'][0], context[0])
  null_token = params['params']['null_token']
  np.testing.assert_array_equal(out['context'][1], jnp.stack([null_token] + [jnp.zeros(3)] * 3))


def test_concat_condition_resizes_and_flags_presence():
  module = conditioners.ConcatCondition(latent_size=(4, 4))
  image = jnp.full((2, 8, 8, 1), 0.5).at[1].set(-0.25)
  _, out = _encode(module, {'cond_image': image}, jnp.array([False, True]))
  concat = np.asarray(out['concat'])
  assert concat.shape == (2, 4, 4, 2)
  np.testing.assert_allclose(concat[0, ..., 0], 0.5, rtol=1e-6)  # Constant stays constant.
  np.testing.assert_array_equal(concat[0, ..., 1], 1.0)
  np.testing.assert_array_equal(concat[1], 0.0)  # Null: zero image, flag 0.


@pytest.mark.parametrize('prob', [0.1, 0.5])
def test_drop_mask_rate_matches_config(prob):
  n = 200_000
  drop = np.asarray(conditioning.drop_mask(jax.random.PRNGKey(1), n, prob))
  assert abs(drop.mean() - prob) < 5 * np.sqrt(prob * (1 - prob) / n)


# ----------------------------------------------------- model, guidance, training ----


def _tiny(config, **conditioning_fields):
  """`config` (a demo config) shrunk to test size, conditioning fields overridden."""
  config.data.batch_size = 8
  config.autoencoder.model.update(block_out_channels=(8, 16), latent_channels=2,
                                  norm_num_groups=4)
  config.diffusion.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(8,), num_heads=2, norm_num_groups=4)
  config.diffusion.optim.update(learning_rate=3e-3, warmup_steps=1)
  config.diffusion.num_train_steps = 30
  config.diffusion.prediction_type = 'eps'  # Every model starts at loss E[eps^2] = 1.
  config.diffusion.conditioning.update(conditioning_fields)
  return config


def _text_config(data_dir):
  config = _tiny(digits_text.get_config())
  config.data.data_dir = data_dir
  config.diffusion.model.context_dim = 8
  config.diffusion.conditioning.text.update(num_layers=1, num_heads=2, max_length=6)
  return config


def _configs(data_dir):
  text_config = _text_config(data_dir)
  class_config = _text_config(data_dir)
  class_config.data.name = 'digits'
  class_config.diffusion.conditioning.name = 'class'
  class_config.diffusion.model.context_dim = 0  # Labels are the denoiser's own embedding.
  precomputed = _text_config(data_dir)
  precomputed.diffusion.conditioning.name = 'precomputed'
  concat = _tiny(digits_superres.get_config())
  concat.data.data_dir = data_dir
  return {'class': class_config, 'text': text_config, 'precomputed': precomputed,
          'concat': concat}


def _batch(config, vocabulary):
  """A fixed batch with the conditioner's features (precomputed: a random context)."""
  name = config.diffusion.conditioning.name
  if name == 'precomputed':  # The digits carry no context: read them without one.
    config = config.copy_and_resolve_references()
    config.diffusion.conditioning.name = ''
  examples = conditioning.eval_examples(
      config, vocabulary if name == 'text' else None, config.data.batch_size)
  batch = {'image': examples['image'], 'label': examples['label']}
  if name == 'precomputed':
    context = np.random.default_rng(0).standard_normal((config.data.batch_size, 3, 8))
    context[:, 2:] = 0.0  # Padding.
    batch['context'] = context.astype(np.float32)
  else:
    batch.update({k: examples[k] for k in conditioning.batch_keys(config)})
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope='module')
def setups(captions_data_dir, tmp_path_factory):
  """Per conditioner: (config, model, ae, ae_params, vocabulary, batch)."""
  configs = _configs(captions_data_dir)
  workdir = str(tmp_path_factory.mktemp('text_run'))
  vocabulary = conditioning.load_or_build_vocabulary(
      configs['text'], stages.vocabulary_path(workdir), build=True)
  autoencoder = builders.build_autoencoder(configs['text'])
  ae_params = jax.jit(autoencoder.init)(_key(0), jnp.zeros((1, 32, 32, 1)))['params']
  out = {}
  for name, config in configs.items():
    model = builders.build_denoiser(config)
    out[name] = (config, model, autoencoder, ae_params, vocabulary, _batch(config, vocabulary))
  return out


def test_vocabulary_is_built_from_training_captions(setups):
  vocabulary = setups['text'][4]
  assert set(vocabulary.words) == {'a', 'thin', 'thick', 'small', 'large', 'slanted',
                                   *digits_captions.DIGIT_WORDS}


def test_pipeline_tokens_are_the_captions(setups, captions_data_dir):
  config, _, _, _, vocabulary, batch = setups['text']
  captions = [e['caption'].decode() for e in tfds.as_numpy(
      tfds.builder('digits_captions', data_dir=captions_data_dir).as_dataset(
          split='test', shuffle_files=False).take(8))]
  expected = np.stack([vocabulary.encode(c, config.diffusion.conditioning.text.max_length)
                       for c in captions])
  np.testing.assert_array_equal(batch['tokens'], expected)


def test_pipeline_low_resolution_is_the_area_average(setups):
  _, _, _, _, _, batch = setups['concat']
  image = np.asarray(batch['image'])
  expected = image.reshape(8, 8, 4, 8, 4, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(batch['cond_image'], expected, rtol=1e-5, atol=1e-5)


def _randomized(params, seed: int, scale: float = 0.2):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32) for leaf in leaves])


@pytest.mark.parametrize('name', ['text', 'concat'])
def test_guidance_over_conditions(setups, name):
  config, model, _, _, _, batch = setups[name]
  features = {k: batch[k] for k in conditioning.batch_keys(config)}
  shape = (8, *builders.latent_shape(config))
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  t = jnp.linspace(0.0, 900.0, 8)
  params = jax.jit(model.init)(_key(0), x, t, cond=features)['params']
  params = _randomized(params, 2)
  model_fn, cond, null_cond = generate.model_and_conditions(model, params, None, features)
  apply = lambda drop: model.apply({'params': params}, x, t, cond=features, drop=drop)
  conditional, unconditional = apply(jnp.zeros(8, bool)), apply(jnp.ones(8, bool))
  assert np.abs(np.asarray(conditional - unconditional)).max() > 1e-3
  np.testing.assert_allclose(sampling.guided(model_fn, 1.0, cond, null_cond)(x, t), conditional,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sampling.guided(model_fn, 3.0, cond, null_cond)(x, t),
                             unconditional + 3.0 * (conditional - unconditional),
                             rtol=1e-4, atol=1e-4)


def test_frozen_conditioner_gets_no_update():
  params = {'denoiser': {'w': jnp.ones((2, 3))}, 'conditioner': {'embedding': jnp.ones((4,))}}
  tx = conditioning.freeze_conditioner(optax.adamw(0.1, weight_decay=0.5))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['conditioner']['embedding'], 0.0)
  assert float(jnp.abs(updates['denoiser']['w']).min()) > 0.05


@pytest.mark.parametrize('name', ['class', 'text', 'precomputed', 'concat'])
def test_each_conditioner_trains(setups, name):
  config, model, autoencoder, ae_params, _, batch = setups[name]
  tx, lr_schedule = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  state = jax.jit(functools.partial(stages.init_diffusion_state, config, model, tx))(1.0)
  step = jax.jit(functools.partial(
      train.diffusion_train_step, denoiser=model, config=config, lr_schedule=lr_schedule))
  schedule = builders.make_schedule(config)
  # The encoder posterior with the conditioning features passed through.
  batch = jax.jit(functools.partial(train.encode_batch, autoencoder=autoencoder))(ae_params, batch)
  assert set(conditioning.batch_keys(config)) <= set(batch)
  initial = state.params.get('conditioner', {})
  losses = []
  for _ in range(config.diffusion.num_train_steps):
    state, metrics = step(state, batch, schedule)
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses
  changes = [float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(initial), jax.tree.leaves(state.params.get('conditioner', {})))]
  if name in ('class', 'concat'):
    assert not changes  # Labels are embedded by the denoiser; resizing has no parameters.
  else:
    assert max(changes) > 0.0  # Trained jointly with the U-Net.


# -------------------------------------------------------------- sampling inputs ----


def test_sample_conditions_from_prompts_and_from_the_eval_split(setups):
  config, _, _, _, vocabulary, batch = setups['text']
  conditions, ncols = conditioning.sample_conditions(config, vocabulary, 5,
                                                     ['a thick three', 'a two'])
  assert ncols == 3
  expected = [vocabulary.encode(p, 6) for p in ['a thick three'] * 3 + ['a two'] * 2]
  np.testing.assert_array_equal(conditions['tokens'], expected)
  with pytest.raises(UserError, match="unknown word\\(s\\) 'fat'.*accepted words: a eight"):
    conditioning.sample_conditions(config, vocabulary, 2, ['a fat three'])
  from_eval, ncols = conditioning.sample_conditions(config, vocabulary, 8)
  assert ncols is None
  np.testing.assert_array_equal(from_eval['tokens'], batch['tokens'])
  concat_config = setups['concat'][0]
  with pytest.raises(UserError, match="--prompt needs a text-conditioned model"):
    conditioning.sample_conditions(concat_config, None, 2, ['a two'])


# --------------------------------------------------------------------- configs ----


@pytest.mark.parametrize('module', [digits_text, digits_superres, coco_text2img, imagenet_sr4x])
def test_conditioning_configs_validate(module):
  config = module.get_config()
  validate_config(config)
  assert builders.latent_shape(config)[0] == config.data.image_size // (
      2 ** (len(config.autoencoder.model.block_out_channels) - 1))
  if config.diffusion.conditioning.name == 'concat':  # The low-res grid is the latent grid.
    assert conditioning.cond_image_size(config) == builders.latent_shape(config)[0]


@pytest.mark.parametrize('override,message', [
    (dict(name='texts'), 'conditioning.name'),
    (dict(name='text', context_dim=0), 'context_dim=0 .*positive integer'),
    (dict(name='concat', context_dim=8), 'context_dim=8 .*0 for conditioning.name'),
    (dict(name='text', context_dim=8, num_heads=3), 'num_heads=3 .*divisor of .*context_dim=8'),
    (dict(name='concat', context_dim=0, factor=5), 'factor=5 .*divisor of data.image_size=32'),
])
def test_bad_conditioning_is_one_line(override, message):
  config = digits_text.get_config()
  c = config.diffusion.conditioning
  c.name = override.get('name', c.name)
  config.diffusion.model.context_dim = override.get('context_dim', 64)
  if 'num_heads' in override:
    c.text.num_heads = override['num_heads']
  if 'factor' in override:
    c.concat.factor = override['factor']
  config.diffusion.cache_latents = override.get('cache_latents', False)
  with pytest.raises(UserError, match=message):
    validate_config(config)


def test_latent_cache_keeps_the_conditioning_features(setups, tmp_path):
  config, _, autoencoder, ae_params, vocabulary, batch = setups['text']
  config = config.copy_and_resolve_references()
  config.data.train_split = 'test[:16]'  # The examples of `batch` first, in order.
  config.diffusion.cache_latents = True
  validate_config(config)
  workdir = str(tmp_path)
  os.makedirs(os.path.dirname(stages.vocabulary_path(workdir)))
  vocabulary.save(stages.vocabulary_path(workdir))
  directory = latent_cache.build(config, workdir, sharding.make_mesh(), autoencoder, ae_params)
  arrays = latent_cache.load(directory)
  np.testing.assert_array_equal(arrays['tokens'][:8], batch['tokens'])
  np.testing.assert_array_equal(arrays['label'][:8], batch['label'])
  first = next(latent_cache.batches(arrays, 8, seed=0))
  assert set(first) == {'latent_mean', 'latent_logvar', 'label', 'tokens'}
  # Rows stay together: each batch row's tokens are those of its label's example.
  rows = [int(np.flatnonzero((arrays['latent_mean'] == m).all(axis=(1, 2, 3)))[0])
          for m in first['latent_mean']]
  np.testing.assert_array_equal(first['tokens'], arrays['tokens'][rows])


def test_edit_mode_refuses_a_conditioner(tmp_path):
  config = digits_superres.get_config()
  config.edit.update(task='img2img', input=str(tmp_path / 'image.png'))
  with pytest.raises(UserError, match="--mode=edit conditions on class labels or a text prompt, "
                                      "not on config.diffusion.conditioning.name='concat'"):
    modes.run('edit', config, str(tmp_path))


def test_superres_outputs_cover_the_eval_split(setups, tmp_path):
  config, model, autoencoder, ae_params, _, _ = setups['concat']
  config = config.copy_and_resolve_references()
  config.sample.update(num_steps=2, batch_size=99)
  tx, _ = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  state = jax.jit(functools.partial(stages.init_diffusion_state, config, model, tx))(1.0)
  sampler = generate.Sampler(config, sharding.make_mesh(), model, autoencoder)
  outputs = superres.superres_outputs(config, str(tmp_path), sampler, state, ae_params)
  examples = conditioning.eval_examples(config, None, 297)
  np.testing.assert_array_equal(outputs['originals'], input_pipeline.postprocess(examples['image']))
  low = examples['image'].reshape(297, 8, 4, 8, 4, 1).mean(axis=(2, 4))
  bicubic = input_pipeline.postprocess(conditioning.bicubic_upsample(low, 32))
  # Rounding to 8 bits may differ by one level where the float paths differ by ulps.
  assert np.abs(outputs['bicubic'].astype(int) - bicubic.astype(int)).max() <= 1
  assert outputs['superres'].shape == (297, 32, 32, 1) and outputs['superres'].dtype == np.uint8
  grid = np.asarray(Image.open(tmp_path / 'samples' / 'superres_0.png'))
  assert grid.shape == (8 * 34 + 2, 3 * 34 + 2)  # Rows of (bicubic | model | original).
  np.testing.assert_array_equal(grid[2:34, 2 + 34:34 + 34], outputs['superres'][0, ..., 0])


def test_bicubic_upsample_keeps_constants_and_range():
  flat = np.full((2, 4, 4, 1), 0.3, np.float32)
  np.testing.assert_allclose(conditioning.bicubic_upsample(flat, 16), 0.3, rtol=1e-5)
  edges = np.where(np.arange(16).reshape(1, 4, 4, 1) % 2, 1.0, -1.0).astype(np.float32)
  up = conditioning.bicubic_upsample(edges, 16)
  assert up.min() >= -1.0 and up.max() <= 1.0  # Overshoot clipped to the image range.


def test_text_run_end_to_end(captions_data_dir, tmp_path):
  """Both stages from the command-line modes; the vocabulary file; prompts, rows and errors."""
  config = _text_config(captions_data_dir)
  config.autoencoder.num_train_steps = 2
  config.diffusion.num_train_steps = 2
  config.train.update(log_every=1, checkpoint_every=2)
  config.sample.update(num_steps=2, num_samples=4, batch_size=8)
  workdir = str(tmp_path)
  modes.run('train', config, workdir)
  vocabulary = text.Vocabulary.load(stages.vocabulary_path(workdir))
  assert 'seven' in vocabulary.words
  modes.run('sample', config, workdir,
            modes.Options(num_samples=6, prompts=('a thick three', 'a two')))
  grid = np.asarray(Image.open(tmp_path / 'samples' / 'grid_2_sample1.png'))
  assert grid.shape == (2 * 34 + 2, 3 * 34 + 2)  # One row per prompt.
  with pytest.raises(UserError, match="unknown word\\(s\\) 'fat'"):
    modes.run('sample', config, workdir, modes.Options(prompts=('a fat three',)))
  # img2img of a sample towards a prompt.
  image = np.load(tmp_path / 'samples' / 'samples_2.npz')['images'][0, ..., 0]
  Image.fromarray(image).save(tmp_path / 'input.png')
  config.edit.update(task='img2img', input=str(tmp_path / 'input.png'), num_samples=2,
                     strength=0.5)
  png, npz = modes.run('edit', config, workdir, modes.Options(prompts=('a thick three',)))
  assert np.load(npz)['images'].shape == (2, 32, 32, 1)
  with pytest.raises(UserError, match='--mode=edit takes one --prompt, got 2'):
    modes.run('edit', config, workdir, modes.Options(prompts=('a two', 'a three')))
