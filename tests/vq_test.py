"""VQ first stage: diffusers `VQModel` parity, folder round trip, quantizer invariants.

tests/fixtures/vq/ comes from tests/fixtures/make_first_stage_fixtures.py.
"""
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
