"""VQ first stage: diffusers `VQModel` parity, folder round trip, quantizer invariants.

tests/fixtures/vq/ comes from tests/fixtures/make_first_stage_fixtures.py.
"""
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import pretrained
from ldm_jax.models import VQModel, autoencoder

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
VQ = str(FIXTURES / 'vq')
sys.path.insert(0, str(FIXTURES))
import first_stage_weights  # noqa: E402


@pytest.fixture(scope='module')
def vq():
  module, params = pretrained.load_autoencoder(VQ)

  def run(p, x):
    h = module.apply({'params': p}, x, method=module.encode_latents)
    z_q, loss, indices = module.apply({'params': p}, h, method=module.quantize_latents)
    return h, z_q, loss, indices, module.apply({'params': p}, h, method=module.decode)

  return module, params, jax.jit(run)


def test_vq_model_matches_diffusers(vq):
  module, params, run = vq
  ref = dict(np.load(FIXTURES / 'vq' / 'reference.npz'))
  images = first_stage_weights.vq_inputs()
  h, z_q, loss, indices, decoded = run(params, images)
  assert isinstance(module, VQModel) and module.embed_dim == 3 and module.latent_channels == 4
  np.testing.assert_allclose(h, ref['latents'], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(indices).reshape(2, -1), ref['indices'])
  np.testing.assert_allclose(z_q, ref['quantized'], atol=1e-4)
  np.testing.assert_allclose(loss, ref['commit_loss'], rtol=1e-4)
  np.testing.assert_allclose(decoded, ref['decoded'], atol=1e-4)
  # Stage 2 sees h (with a negligible logvar), and the decoder quantizes h.
  mean, logvar = module.apply({'params': params}, images, method=module.encode)
  np.testing.assert_allclose(mean, h, atol=1e-6)
  assert np.all(np.exp(0.5 * np.asarray(logvar)) < 1e-6)


def test_vq_folder_round_trip_is_bit_exact(vq, tmp_path):
  module, params, _ = vq
  pretrained.save_autoencoder(module, params, str(tmp_path), scaling_factor=0.7, sample_size=16)
  with open(FIXTURES / 'vq' / 'config.json') as f:
    original = json.load(f)
  with open(tmp_path / 'config.json') as f:
    written = json.load(f)
  for key in ('block_out_channels', 'latent_channels', 'num_vq_embeddings', 'vq_embed_dim',
              'norm_num_groups', 'layers_per_block', 'scaling_factor', '_class_name'):
    assert written[key] == original[key], key
  reference = pretrained.read_weights(VQ)
  written_tensors = pretrained.read_weights(str(tmp_path))
  assert sorted(written_tensors) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(written_tensors[name], value)
  module2, params2 = pretrained.load_autoencoder(str(tmp_path))
  assert module2 == module
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_quantizer_straight_through_gradient_and_loss_closed_form():
  quantizer = autoencoder.VectorQuantizer(num_embeddings=4, embedding_dim=2, beta=0.25)
  codes = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  params = {'embedding': {'embedding': codes}}
  z = jnp.array([[[[0.1, 0.2], [0.9, 0.8]]]])  # [1, 1, 2, 2]: nearest codes 0 and 3.

  def f(z, params):
    z_q, loss, indices = quantizer.apply({'params': params}, z)
    return jnp.sum(z_q * jnp.array([2.0, 3.0])), (z_q, loss, indices)

  (_, (z_q, loss, indices)), (grad_z, grad_params) = jax.value_and_grad(
      f, argnums=(0, 1), has_aux=True)(z, params)
  np.testing.assert_array_equal(indices, [[[0, 3]]])
  np.testing.assert_allclose(z_q, [[[[0.0, 0.0], [1.0, 1.0]]]], atol=1e-7)
  # Straight-through: d(z_q)/dz is the identity; no gradient reaches the codes from z_q.
  np.testing.assert_allclose(grad_z, np.broadcast_to([2.0, 3.0], z.shape))
  squared = np.mean(np.square(np.array([[0.1, 0.2], [-0.1, -0.2]])))
  np.testing.assert_allclose(loss, 1.25 * squared, rtol=1e-6)  # (1 + beta) * mean sq.
  stats = autoencoder.codebook_statistics(indices, 4)
  np.testing.assert_allclose(stats['codebook_usage'], 0.5)
  np.testing.assert_allclose(stats['codebook_perplexity'], 2.0, rtol=1e-6)
  np.testing.assert_array_equal(grad_params['embedding']['embedding'], 0.0)


def test_ema_codebook_update_closed_form_and_commitment_only_loss():
  # Codes 0 and 2 are chosen (by two latents and one); code 1 by none.
  cluster_size = jnp.array([1.0, 2.0, 1.0])
  embed_sum = jnp.array([[0.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
  latents = jnp.array([[[[0.2, 0.0], [0.4, 0.2]], [[0.1, 2.5], [0.3, 3.5]]]])  # [1, 2, 2, 2]
  indices = jnp.array([[[0, 0], [2, 2]]])
  decay, eps = 0.9, 1e-3
  n, e, codes = autoencoder.ema_codebook_update(cluster_size, embed_sum, latents, indices,
                                                decay, eps)
  counts = np.array([2.0, 0.0, 2.0])
  sums = np.array([[0.6, 0.2], [0.0, 0.0], [0.4, 6.0]])
  n_expected = 0.9 * np.array([1.0, 2.0, 1.0]) + 0.1 * counts
  e_expected = 0.9 * np.asarray(embed_sum) + 0.1 * sums
  smoothed = (n_expected + eps) / (n_expected.sum() + 3 * eps) * n_expected.sum()
  np.testing.assert_allclose(n, n_expected, rtol=1e-6)
  np.testing.assert_allclose(e, e_expected, rtol=1e-6)
  np.testing.assert_allclose(codes, e_expected / smoothed[:, None], rtol=1e-5)
  # The unchosen code keeps its place (2 / 2 = 1 before, 1.8 / 1.8 after, up to smoothing).
  np.testing.assert_allclose(codes[1], [1.0, 1.0], rtol=1e-3)

  # With 'ema' the quantizer's loss is the commitment term alone, beta * mean sq.
  quantizer = autoencoder.VectorQuantizer(num_embeddings=4, embedding_dim=2, beta=0.25,
                                          codebook_update='ema')
  grid = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  z = jnp.array([[[[0.1, 0.2], [0.9, 0.8]]]])
  _, loss, _ = quantizer.apply({'params': {'embedding': {'embedding': grid}}}, z)
  np.testing.assert_allclose(loss, 0.25 * np.mean(np.square([[0.1, 0.2], [-0.1, -0.2]])),
                             rtol=1e-6)


def test_ema_codebook_trains_toward_encoder_outputs_and_is_checkpointed(tmp_path):
  import ml_collections
  import optax

  from ldm_jax import checkpointing, first_stage

  model = VQModel(out_channels=1, block_out_channels=(8,), layers_per_block=1,
                  latent_channels=2, num_vq_embeddings=8, norm_num_groups=4,
                  codebook_update='ema', codebook_ema_decay=0.8)
  config = ml_collections.ConfigDict(dict(
      seed=0, data=dict(image_size=8, num_channels=1),
      autoencoder=dict(kl_weight=0.0, perceptual_weight=0.0, codebook_weight=1.0,
                       learn_logvar=False, logvar_init=0.0, ema_decay=0.5,
                       compute_dtype='float32', num_train_steps=10,
                       model=dict(name='vq', codebook_update='ema'),
                       disc=dict(weight=0.0, start=0, factor=1.0, loss='hinge', ndf=4,
                                 num_layers=1, optim=dict(
                                     learning_rate=1e-3, warmup_steps=0, lr_schedule='constant',
                                     end_lr_factor=1.0, b1=0.5, b2=0.9, weight_decay=0.0,
                                     grad_clip_norm=0.0)))))
  assert first_stage.uses_ema_codebook(config)
  disc = first_stage.build_discriminator(config)
  disc_tx, _ = first_stage.make_disc_optimizer(config)
  tx = optax.adam(1e-2)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(2), images)['params']
  state = first_stage.create_state(config, params, tx, jax.random.PRNGKey(3), disc, disc_tx)
  step = jax.jit(functools.partial(
      first_stage.train_step, lpips_params=None, model=model, disc=disc, disc_tx=disc_tx,
      spec=first_stage.LossSpec.from_config(config), lr_schedule=optax.constant_schedule(0.0)))
  encode = jax.jit(lambda p: model.apply({'params': p}, images, method=model.encode_latents))

  def code_error(state):  # Mean squared distance of the latents to their codes.
    h = encode(state.params)
    codes = first_stage.codebook(state.params)
    return float(np.mean(np.square(h - codes[model.apply(
        {'params': state.params}, h, method=lambda m, h: m.quantize.nearest(h))])))

  errors = [code_error(state)]
  first, metrics = step(state, {'image': images})
  # One step: the codebook is the closed-form EMA of the latents of the forward pass.
  h = encode(state.params)
  _, _, indices = model.apply({'params': state.params}, h, method=model.quantize_latents)
  n, e, codes = autoencoder.ema_codebook_update(
      state.codebook_cluster_size, state.codebook_embed_sum, h, indices, 0.8, 1e-5)
  np.testing.assert_allclose(first_stage.codebook(first.params), codes, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(first.codebook_cluster_size, n, rtol=1e-6)
  np.testing.assert_allclose(first.codebook_embed_sum, e, rtol=1e-6)
  np.testing.assert_allclose(  # The parameter EMA follows (warmed-up decay 1/10 at step 0).
      first_stage.codebook(first.ema_params),
      0.1 * first_stage.codebook(state.params) + 0.9 * codes, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(  # Commitment only: beta * mean((sg[z_q] - h)^2).
      metrics['codebook_loss'],
      0.25 * np.mean(np.square(h - first_stage.codebook(state.params)[indices])), rtol=1e-5)
  state = first
  for _ in range(5):
    state, _ = step(state, {'image': images})
    errors.append(code_error(state))
  assert errors[-1] < 0.5 * errors[0], errors

  # The statistics are state fields: a checkpoint carries them and restores them exactly.
  manager = checkpointing.make_manager(str(tmp_path), keep=1)
  checkpointing.save(manager, state)
  checkpointing.finish(manager)
  abstract = checkpointing.abstract_like(jax.eval_shape(lambda: state),
                                         jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  restored = checkpointing.restore(manager, abstract)
  for field in ('codebook_cluster_size', 'codebook_embed_sum', 'params'):
    jax.tree.map(np.testing.assert_array_equal, getattr(restored, field), getattr(state, field))

