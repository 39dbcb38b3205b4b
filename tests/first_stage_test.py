"""PatchGAN discriminator parity with taming, GAN losses, and the stage-1 objective's step."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ldm_jax import builders, evaluation, first_stage, losses, sharding, train
from ldm_jax.models import AutoencoderKL, VQModel
from ldm_jax.models import discriminator
from ldm_jax.validation import validate_config

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
sys.path.insert(0, str(FIXTURES))
import first_stage_weights  # noqa: E402


def test_discriminator_matches_taming():
  params = discriminator.params_from_taming(first_stage_weights.discriminator_state_dict())
  images = first_stage_weights.discriminator_inputs()
  logits = jax.jit(discriminator.NLayerDiscriminator().apply)({'params': params}, images)
  reference = np.load(FIXTURES / 'discriminator_reference.npz')['logits']
  assert logits.shape == reference.shape == (2, 6, 6, 1)
  np.testing.assert_allclose(logits, reference, atol=1e-4)
  # The Flax init has exactly taming's parameter set.
  init = jax.eval_shape(discriminator.NLayerDiscriminator().init, jax.random.PRNGKey(0),
                        images[:1])['params']
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)))


def test_gan_losses_closed_forms():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  hinge = 0.5 * (np.mean([0.0, 0.5, 2.0]) + np.mean([0.0, 1.0, 2.0]))
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, 'hinge'), hinge, rtol=1e-6)
  vanilla = 0.5 * (np.mean(np.log1p(np.exp(-np.asarray(real))))
                   + np.mean(np.log1p(np.exp(np.asarray(fake)))))
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, 'vanilla'), vanilla, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(fake), 1 / 3, rtol=1e-6)
  assert [float(losses.adopt_weight(0.5, jnp.array(s), 5)) for s in (4, 5)] == [0.0, 0.5]
  np.testing.assert_allclose(losses.adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0])),
                             5.0 / (2.0 + 1e-4), rtol=1e-6)
  assert float(losses.adaptive_weight(jnp.ones(3), jnp.zeros(3))) == 1e4  # Clipped.
  error = jnp.full((2, 2, 2, 1), 0.5)
  np.testing.assert_allclose(losses.gaussian_nll(error, jnp.log(2.0)),
                             4 * (0.25 + np.log(2.0)), rtol=1e-6)


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      seed=0, data=dict(image_size=8, num_channels=3),
      autoencoder=dict(kl_weight=1e-2, perceptual_weight=0.0, codebook_weight=1.0,
                       learn_logvar=True, logvar_init=0.0, ema_decay=0.0,
                       compute_dtype='float32', num_train_steps=10, model=dict(name='x'),
                       disc=dict(weight=0.5, start=1, factor=1.0, loss='hinge', ndf=8,
                                 num_layers=1, optim=dict(
                                     learning_rate=1e-3, warmup_steps=0, lr_schedule='constant',
                                     end_lr_factor=1.0, b1=0.5, b2=0.9, weight_decay=0.0,
                                     grad_clip_norm=0.0)))))
  config.update_from_flattened_dict(overrides)
  return config


def _setup(model, config):
  disc = first_stage.build_discriminator(config)
  tx, schedule = optax.adam(1e-3), optax.constant_schedule(1e-3)
  disc_tx, _ = first_stage.make_disc_optimizer(config)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(2), images)['params']
  state = first_stage.create_state(config, params, tx, jax.random.PRNGKey(3), disc, disc_tx)
  spec = first_stage.LossSpec.from_config(config)
  step = jax.jit(lambda s, b: first_stage.train_step(s, b, None, model=model, disc=disc,
                                                     disc_tx=disc_tx, spec=spec,
                                                     lr_schedule=schedule))
  return state, step, {'image': images}, disc, spec


def test_adaptive_weight_and_generator_gradient_equal_their_closed_forms():
  model = AutoencoderKL(out_channels=3, block_out_channels=(8,), layers_per_block=1,
                        latent_channels=2, norm_num_groups=4)
  config = _config()
  state, step, batch, disc, spec = _setup(model, config)
  images = batch['image']
  state = state.replace(step=jnp.array(1))  # disc.start = 1: adversarial terms on.
  rng = jax.random.fold_in(state.rng, state.step)

  def terms(params):
    reconstruction, mean, logvar = model.apply({'params': params}, images, rng)
    nll = jnp.sum(jnp.abs(images - reconstruction) / jnp.exp(state.logvar) + state.logvar) / 2
    kl = jnp.mean(losses.kl_to_standard_normal(mean, logvar))
    g = -jnp.mean(disc.apply({'params': state.disc_params}, reconstruction))
    return nll, kl, g

  last = lambda g: g['decoder']['conv_out']['kernel']
  nll_grad = jax.grad(lambda p: terms(p)[0])(state.params)
  g_grad = jax.grad(lambda p: terms(p)[2])(state.params)
  expected_weight = 0.5 * np.clip(np.linalg.norm(last(nll_grad)) / (
      np.linalg.norm(last(g_grad)) + 1e-4), 0, 1e4)
  total = jax.grad(lambda p: (lambda n, k, g: n + 1e-2 * k + expected_weight * g)(*terms(p)))(
      state.params)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(metrics['d_weight'], expected_weight, rtol=1e-4)
  np.testing.assert_allclose(metrics['grad_norm'], optax.global_norm(total), rtol=1e-4)
  nll, kl, g = terms(state.params)
  np.testing.assert_allclose(metrics['loss'], nll + 1e-2 * kl + expected_weight * g, rtol=1e-5)
  assert float(metrics['disc_factor']) == 1.0 and float(metrics['disc_loss']) > 0


def test_before_disc_start_only_the_reconstruction_objective_trains():
  model = VQModel(out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=2,
                  num_vq_embeddings=4, norm_num_groups=4)
  config = _config(**{'autoencoder.disc.start': 5})
  state, step, batch, _, _ = _setup(model, config)
  new_state, metrics = step(state, batch)
  assert float(metrics['d_weight']) == 0.0 and float(metrics['g_loss']) == 0.0
  assert float(metrics['disc_loss']) == 0.0
  for a, b in zip(jax.tree.leaves(state.disc_params), jax.tree.leaves(new_state.disc_params)):
    np.testing.assert_array_equal(a, b)  # Zero gradients: Adam leaves the weights.
  assert 0 < float(metrics['codebook_usage']) <= 1 and float(metrics['codebook_perplexity']) >= 1
  assert int(new_state.step) == 1 and not np.array_equal(
      new_state.params['decoder']['conv_out']['kernel'],
      state.params['decoder']['conv_out']['kernel'])


def test_identity_first_stage_is_pixel_space_and_skips_stage_1(tiny_config, tmp_path):
  tiny_config.autoencoder.model.name = 'identity'
  tiny_config.diffusion.model.attention_resolutions = (16,)  # 32x32 latents: pixels.
  validate_config(tiny_config)
  assert builders.latent_shape(tiny_config) == (32, 32, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  model, params = train.train_autoencoder(tiny_config, str(tmp_path), mesh)
  assert params == {} and not (tmp_path / 'autoencoder').exists()
  images = jnp.linspace(-1, 1, 2 * 32 * 32).reshape(2, 32, 32, 1)
  mean, logvar = model.apply({'params': params}, images, method=model.encode)
  np.testing.assert_array_equal(mean, images)
  assert float(jnp.max(jnp.exp(0.5 * logvar))) < 1e-6
  metrics, _ = evaluation.reconstruction_metrics(tiny_config, mesh, model, params)
  assert metrics['ae_psnr'] == np.inf and metrics['ae_ssim'] == pytest.approx(1.0)


def test_vq_eval_metrics_report_codebook_usage(tiny_config):
  model = VQModel(out_channels=1, block_out_channels=(8,), layers_per_block=1, latent_channels=2,
                  num_vq_embeddings=16, norm_num_groups=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))['params']
  mesh = sharding.make_mesh(jax.devices()[:1])
  metrics, recon = evaluation.reconstruction_metrics(tiny_config, mesh, model, params)
  codes = recon['codes'].ravel()
  assert len(recon['psnr']) == 297  # The whole eval split, padding dropped.
  np.testing.assert_allclose(metrics['ae_codebook_usage'], len(np.unique(codes)) / 16)
  counts = np.bincount(codes, minlength=16) / codes.size
  entropy = -np.sum(counts[counts > 0] * np.log(counts[counts > 0]))
  np.testing.assert_allclose(metrics['ae_codebook_perplexity'], np.exp(entropy), rtol=1e-5)
