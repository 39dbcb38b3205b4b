"""LPIPS against the `lpips` package (tests/fixtures/make_first_stage_fixtures.py)."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ldm_jax import perceptual
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
sys.path.insert(0, str(FIXTURES))
import first_stage_weights  # noqa: E402


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
  vgg_path = tmp_path_factory.mktemp('lpips') / 'vgg16_features.npz'
  np.savez(vgg_path, **first_stage_weights.vgg16_features_state_dict())
  return perceptual.load_lpips(str(vgg_path), str(FIXTURES / 'lpips_vgg_lin.pth'))


def test_lpips_matches_reference_package_values_and_input_gradient(loaded):
  lpips_fn, params = loaded
  reference = np.load(FIXTURES / 'lpips_reference.npz')
  x, y = first_stage_weights.lpips_inputs()
  distances, grad_x = jax.jit(jax.value_and_grad(
      lambda p, a, b: jnp.sum(lpips_fn(p, a, b)), argnums=1))(params, x, y)
  values = jax.jit(lpips_fn)(params, x, y)
  np.testing.assert_allclose(values[:2], reference['distances'][:2], rtol=1e-4)
  assert abs(values[2]) < 1e-9 and reference['distances'][2] == 0.0  # Identical images.
  np.testing.assert_allclose(float(distances), reference['distances'].sum(), rtol=1e-4)
  scale = np.abs(reference['grad_x']).max()
  np.testing.assert_allclose(grad_x, reference['grad_x'], atol=1e-4 * scale)
  assert np.all(np.isfinite(grad_x))  # Also at the identical pair (zero differences).
  gray = lpips_fn(params, x[:2, ..., :1], y[:2, ..., :1])  # 1 channel is repeated to 3.
  np.testing.assert_allclose(gray, reference['gray_distances'], rtol=1e-4)


def test_load_lpips_reads_the_torch_files_and_refuses_bad_ones(tmp_path):
  lin = perceptual.read_weights(str(FIXTURES / 'lpips_vgg_lin.pth'), 'heads')
  expected = first_stage_weights.lpips_lin_state_dict()
  assert sorted(lin) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(lin[name], value)
  with pytest.raises(UserError, match='no such file'):
    perceptual.load_lpips(str(tmp_path / 'missing.pth'), str(FIXTURES / 'lpips_vgg_lin.pth'))
  vgg = first_stage_weights.vgg16_features_state_dict()
  vgg['features.28.weight'] = vgg['features.28.weight'][:, :, :2]
  np.savez(tmp_path / 'bad.npz', **vgg)
  with pytest.raises(UserError, match=r"'features.28.weight' has shape"):
    perceptual.load_lpips(str(tmp_path / 'bad.npz'), str(FIXTURES / 'lpips_vgg_lin.pth'))


def test_perceptual_term_without_weights_is_refused_not_dropped():
  config = tiny.get_config()
  config.autoencoder.perceptual_weight = 1.0
  config.autoencoder.lpips_vgg_weights = 'vgg16.pth'
  with pytest.raises(UserError, match='perceptual_weight > 0 needs the LPIPS weights'):
    validate_config(config)
