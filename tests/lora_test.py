"""LoRA: adapter sizes, zero start, merge parity, training only adapters, merge_lora."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax import builders, diffusion, finetune, input_pipeline, lora, modes, models, pretrained
from ldm_jax import stages
from ldm_jax import sharding, train
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
VAE, UNET = os.path.join(FIXTURES, 'vae'), os.path.join(FIXTURES, 'unet_cond')
TARGETS = lora.ATTENTION_TARGETS + ('conv1',)


@pytest.fixture(scope='module')
def base():
  module, params = pretrained.load_unet(UNET)
  apply = jax.jit(lambda p, x, t, y: module.apply({'params': p}, x, t, y))
  ref = np.load(os.path.join(UNET, 'reference.npz'))
  return module, params, apply, (ref['x'], ref['t'], ref['y'])


def _random_adapters(params, rank, targets=TARGETS):
  """Adapters with B drawn at random too, so that they change the model."""
  adapters = lora.init_adapters(jax.random.PRNGKey(0), params, rank=rank, targets=targets)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize('rank', [1, 3])
def test_adapter_sizes_follow_the_formula(base, rank):
  _, params, _, _ = base
  adapters = lora.init_adapters(jax.random.PRNGKey(0), params, rank=rank, targets=TARGETS)
  flat_params = traverse_util.flatten_dict(params)
  flat = traverse_util.flatten_dict(adapters)
  paths = lora.target_kernels(params, TARGETS)
  assert {p[:-1] for p in flat} == {p[:-1] for p in paths}
  total = 0
  for path in paths:
    shape = flat_params[path].shape
    size_in = int(np.prod(shape[:-1]))  # in, or in·kh·kw for a conv.
    expected = rank * (size_in + shape[-1])
    a, b = flat[path[:-1] + ('lora_a',)], flat[path[:-1] + ('lora_b',)]
    assert a.shape == (size_in, rank) and b.shape == (rank, shape[-1])
    assert a.size + b.size == expected == lora.num_adapter_params(shape, rank)
    total += expected
  # A 3x3 conv 8 -> 8 and an attention projection 16 -> 16, written out.
  conv = flat[('down_blocks_0', 'resnets_0', 'conv1', 'lora_a')].size + flat[
      ('down_blocks_0', 'resnets_0', 'conv1', 'lora_b')].size
  attention = flat[('mid_block', 'attentions_0', 'to_q', 'lora_a')].size + flat[
      ('mid_block', 'attentions_0', 'to_q', 'lora_b')].size
  assert (conv, attention) == (rank * (8 * 3 * 3 + 8), rank * (16 + 16))
  assert models.count_params(adapters) == total


def test_fresh_adapters_leave_the_model_unchanged(base):
  _, params, _, _ = base
  adapters = lora.init_adapters(jax.random.PRNGKey(0), params, rank=2, targets=TARGETS)
  merged = lora.merge(params, adapters, scale=2.0)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)


def test_merge_adds_the_low_rank_product(base):
  _, params, _, _ = base
  adapters = _random_adapters(params, rank=2)
  merged = traverse_util.flatten_dict(lora.merge(params, adapters, scale=0.5))
  flat, flat_adapters = traverse_util.flatten_dict(params), traverse_util.flatten_dict(adapters)
  # Dense: x W' = x W + s (x A) B, the unmerged LoRA branch.
  path = ('mid_block', 'attentions_0', 'to_v')
  x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
  unmerged = x @ flat[path + ('kernel',)] + 0.5 * (x @ flat_adapters[path + ('lora_a',)]) @ (
      flat_adapters[path + ('lora_b',)])
  np.testing.assert_allclose(x @ merged[path + ('kernel',)], unmerged, atol=1e-5)
  # Conv: tap (i, j) from input channel c is row (i * kw + j) * in + c of A.
  path = ('down_blocks_0', 'resnets_0', 'conv1')
  delta = flat_adapters[path + ('lora_a',)] @ flat_adapters[path + ('lora_b',)]  # [72, 8]
  np.testing.assert_allclose(merged[path + ('kernel',)][1, 2, 5] - flat[path + ('kernel',)][1, 2, 5],
                             0.5 * delta[(1 * 3 + 2) * 8 + 5], atol=1e-6)


def test_merged_export_matches_base_plus_adapters(base, tmp_path):
  module, params, apply, inputs = base
  adapters = _random_adapters(params, rank=3)
  adapted = lora.Adapted(module, params, 0.75)
  through_adapters = jax.jit(lambda a, *xs: adapted.apply({'params': a}, *xs))(adapters, *inputs)
  assert np.max(np.abs(through_adapters - apply(params, *inputs))) > 1e-2  # Adapters matter.
  pretrained.save_unet(module, jax.device_get(lora.merge(params, adapters, 0.75)), str(tmp_path))
  _, merged = pretrained.load_unet(str(tmp_path))
  assert np.max(np.abs(apply(merged, *inputs) - through_adapters)) <= 1e-5


def _lora_config(data_dir):
  from configs import tiny

  config = tiny.get_config()
  config.data.update(data_dir=data_dir, num_channels=3)
  config.autoencoder.pretrained = VAE
  config.diffusion.init_from = UNET
  config.diffusion.lora.update(rank=4, alpha=4.0, targets=TARGETS)
  config.diffusion.optim.update(learning_rate=1e-2, warmup_steps=0, lr_schedule='constant')
  config.diffusion.update(num_train_steps=40, ema_decay=0.0)
  config.train.update(log_every=20, checkpoint_every=20)
  return config


@pytest.fixture
def lora_config(digits_data_dir):
  return _lora_config(digits_data_dir)


@pytest.fixture(scope='module')
def trained(digits_data_dir, tmp_path_factory):
  """A tiny LoRA run through the real stage loop: (config, workdir, U-Net, final state)."""
  config = _lora_config(digits_data_dir)
  workdir = str(tmp_path_factory.mktemp('lora_run'))
  mesh = sharding.make_mesh(jax.devices()[:1])
  autoencoder, ae_params = train.train_autoencoder(config, workdir, mesh)
  unet, state = train.train_diffusion(config, workdir, mesh, autoencoder, ae_params)
  return config, workdir, unet, state, (autoencoder, ae_params)


def test_training_changes_only_adapters_and_lowers_the_loss(trained, base):
  config, workdir, unet, state, (autoencoder, ae_params) = trained
  _, base_params, apply, _ = base
  assert float(state.scale_factor) == 0.5  # The VAE's scaling_factor.
  # The checkpointed state holds the adapters alone: r·(in + out) per adapted layer.
  abstract = stages.diffusion_setup(config, sharding.make_mesh(jax.devices()[:1]))[3]
  flat_base = traverse_util.flatten_dict(base_params)
  expected = sum(lora.num_adapter_params(flat_base[p].shape, 4)
                 for p in lora.target_kernels(base_params, TARGETS))
  assert models.count_params(abstract.params) == expected
  assert {p[-1] for p in traverse_util.flatten_dict(abstract.params)} == {'lora_a', 'lora_b'}
  assert os.path.exists(os.path.join(workdir, 'diffusion', 'checkpoints', finetune.BASE_POINTER))
  # Weights outside the adapted kernels are the base's, bit for bit.
  adapted = set(lora.target_kernels(base_params, TARGETS))
  for path, value in traverse_util.flatten_dict(jax.device_get(state.params)).items():
    if path not in adapted:
      np.testing.assert_array_equal(value, flat_base[path])
  # A fixed evaluation batch: the denoising loss of the fine-tuned U-Net beats the base's.
  schedule = builders.make_schedule(config)
  rng = np.random.default_rng(0)
  batch = next(input_pipeline.create_dataset(config.data, config.data.eval_split, train=False,
                                             seed=0).as_numpy_iterator())
  images, labels = jnp.asarray(batch['image']), jnp.asarray(batch['label'])
  z0 = 0.5 * autoencoder.apply({'params': ae_params}, images, method=autoencoder.encode)[0]
  t = jnp.asarray(rng.integers(0, config.diffusion.num_timesteps, z0.shape[0]))
  noise = jax.random.normal(jax.random.PRNGKey(2), z0.shape)
  x_t = diffusion.q_sample(schedule, z0, t, noise)

  def loss(params):
    return float(jnp.mean((apply(params, x_t, t.astype(jnp.float32), labels) - noise) ** 2))

  before, after = loss(base_params), loss(state.ema_params)
  assert after < 0.9 * before, (before, after)


def test_merge_lora_mode_writes_the_trained_merge(trained, tmp_path, capsys):
  config, workdir, unet, state, _ = trained
  modes.run('merge_lora', config, workdir)
  assert 'merged_unet' in capsys.readouterr().out
  module, merged = pretrained.load_unet(os.path.join(workdir, 'merged_unet'))
  assert module == unet
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(jax.device_get(state.ema_params))):
    np.testing.assert_array_equal(x, y)
  # The adapters refuse another base: the config stored with the checkpoints names it.
  config = config.copy_and_resolve_references()
  config.diffusion.init_from = str(tmp_path / 'other')
  pretrained.save_unet(module, jax.tree.map(lambda p: p + 1, merged), config.diffusion.init_from)
  with pytest.raises(UserError, match=r'config differs .*diffusion\.init_from: .*unet_cond" → .*other"'):
    modes.run('merge_lora', config, workdir)


def test_lora_config_errors(lora_config):
  config = lora_config
  config.diffusion.lora.targets = ('to_q', 'attention')
  with pytest.raises(UserError, match=r"config.diffusion.lora.targets=.*accepted: a non-empty"):
    validate_config(config)
  config.diffusion.lora.targets = ('to_q',)
  config.diffusion.init_from = ''
  with pytest.raises(UserError, match='lora.rank > 0 needs a base U-Net'):
    validate_config(config)
  config.autoencoder.workdir = '/elsewhere'
  with pytest.raises(UserError, match='pretrained and config.autoencoder.workdir'):
    validate_config(config)
