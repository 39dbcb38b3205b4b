"""Tests of ldm_jax.losses against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion, losses

T = 1000


@pytest.fixture(scope='module', params=diffusion.SCHEDULES)
def schedule(request) -> diffusion.Schedule:
  return diffusion.make_schedule(request.param, T)


# --- Diffusion loss. ---------------------------------------------------------------


def test_diffusion_loss_zero_for_equal_inputs():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  loss, per_example = losses.diffusion_loss(x, x)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(per_example, np.zeros(4))


def test_diffusion_loss_simple_case():
  prediction = jnp.zeros((2, 3, 4))
  target = jnp.stack([jnp.ones((3, 4)), 2.0 * jnp.ones((3, 4))])
  loss, per_example = losses.diffusion_loss(prediction, target)
  np.testing.assert_allclose(per_example, [1.0, 4.0])
  np.testing.assert_allclose(loss, 2.5)
  loss, per_example = losses.diffusion_loss(prediction, target, jnp.array([1.0, 0.5]))
  np.testing.assert_allclose(per_example, [1.0, 4.0])  # unweighted
  np.testing.assert_allclose(loss, (1.0 * 1.0 + 0.5 * 4.0) / 2)


# --- Loss weightings. --------------------------------------------------------------


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_uniform_weighting(schedule, prediction_type):
  t = jnp.array([0, 10, T - 1])
  w = losses.loss_weighting(schedule, t, 'uniform', prediction_type=prediction_type)
  np.testing.assert_array_equal(w, np.ones(3))
  assert w.dtype == jnp.float32


@pytest.mark.parametrize('gamma', [1.0, 5.0])
@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_min_snr_closed_form(schedule, prediction_type, gamma):
  t = jnp.arange(0, T, 37)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = abar / (1.0 - abar)
  clipped = np.minimum(snr, gamma)
  expected = {'eps': clipped / snr, 'v': clipped / (snr + 1.0), 'x0': clipped}
  w = losses.loss_weighting(schedule, t, 'min_snr', prediction_type=prediction_type,
                            min_snr_gamma=gamma)
  np.testing.assert_allclose(w, expected[prediction_type], rtol=1e-4)


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_min_snr_is_the_same_loss_in_every_parameterization(schedule, prediction_type):
  # Min-SNR weights the x0-space error by min(SNR, gamma). An error in the model's
  # own parameterization, converted at fixed x_t, must give that same weighted loss.
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  t = jnp.array([5, 100, 300, 600, 900])
  x0 = jax.random.normal(k0, (5, 4, 4, 2))
  eps = jax.random.normal(k1, (5, 4, 4, 2))
  x0_hat = x0 + 0.1 * jax.random.normal(k2, (5, 4, 4, 2))
  x_t = diffusion.q_sample(schedule, x0, t, eps)
  eps_hat = diffusion.eps_from_x0(schedule, x_t, t, x0_hat)
  prediction = diffusion.training_target(schedule, x0_hat, eps_hat, t, prediction_type)
  target = diffusion.training_target(schedule, x0, eps, t, prediction_type)
  w = losses.loss_weighting(schedule, t, 'min_snr', prediction_type=prediction_type)
  loss, _ = losses.diffusion_loss(prediction, target, w)
  _, x0_error = losses.diffusion_loss(x0_hat, x0)
  expected = jnp.mean(jnp.minimum(diffusion.snr(schedule, t), 5.0) * x0_error)
  np.testing.assert_allclose(loss, expected, rtol=2e-3)


@pytest.mark.parametrize('gamma, k', [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0)])
def test_p2_closed_form_on_the_eps_loss(schedule, gamma, k):
  t = jnp.arange(0, T, 37)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = abar / (1.0 - abar)
  w = losses.loss_weighting(schedule, t, 'p2', prediction_type='eps', p2_gamma=gamma, p2_k=k)
  np.testing.assert_allclose(w, 1.0 / (k + snr) ** gamma, rtol=1e-4)


@pytest.mark.parametrize('prediction_type', ['x0', 'v'])
def test_p2_is_the_same_objective_in_every_parameterization(schedule, prediction_type):
  # At fixed x_t, eps error = SNR x0 error and v error = (SNR + 1) x0 error.
  t = jnp.arange(0, T, 37)
  snr = diffusion.snr(schedule, t)
  w_eps = losses.loss_weighting(schedule, t, 'p2', prediction_type='eps')
  w = losses.loss_weighting(schedule, t, 'p2', prediction_type=prediction_type)
  factor = {'x0': 1.0, 'v': snr + 1.0}[prediction_type]
  np.testing.assert_allclose(w * factor, w_eps * snr, rtol=1e-4)


def test_unknown_weighting(schedule):
  with pytest.raises(ValueError, match="unknown loss weighting 'p3'; accepted: uniform, min_snr, p2"):
    losses.loss_weighting(schedule, jnp.array([1]), 'p3')
  with pytest.raises(ValueError, match='accepted: eps, x0, v'):
    losses.loss_weighting(schedule, jnp.array([1]), 'min_snr', prediction_type='score')


# --- Autoencoder loss. -------------------------------------------------------------


def test_kl_closed_form():
  mean = jnp.array([[[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.0], [0.0, 0.0]]])  # [2, 2, 2]
  logvar = jnp.array([[[0.0, 0.0], [np.log(4.0), 1.0]], [[0.0, -2.0], [0.0, 0.0]]])
  # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2 per dim, summed.
  m, lv = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  per_dim = 0.5 * (m**2 + np.exp(lv) - 1.0 - lv)
  expected = per_dim.reshape(2, -1).sum(axis=1)
  np.testing.assert_allclose(losses.kl_to_standard_normal(mean, logvar), expected, rtol=1e-6)
  # Spot check of one term: m=2, v=4 gives (4 + 4 - 1 - log 4) / 2.
  np.testing.assert_allclose(per_dim[0, 1, 0], (7.0 - np.log(4.0)) / 2)
  zero = losses.kl_to_standard_normal(jnp.zeros((3, 4)), jnp.zeros((3, 4)))
  np.testing.assert_array_equal(zero, np.zeros(3))


@pytest.mark.parametrize('reconstruction_loss', ['l1', 'l2'])
def test_autoencoder_loss(reconstruction_loss):
  images = jnp.zeros((2, 4, 4, 3))
  reconstruction = jnp.concatenate([jnp.full((1, 4, 4, 3), 0.5),
                                    jnp.full((1, 4, 4, 3), -1.0)])
  mean = jnp.ones((2, 2, 2, 4))
  logvar = jnp.zeros((2, 2, 2, 4))
  loss, metrics = losses.autoencoder_loss(reconstruction, images, mean, logvar,
                                          kl_weight=0.01,
                                          reconstruction_loss=reconstruction_loss)
  rec = (0.5 + 1.0) / 2 if reconstruction_loss == 'l1' else (0.25 + 1.0) / 2
  kl = 16 * 0.5  # 16 latent dims of KL(N(1, 1) || N(0, 1)) = 1/2, same for both examples
  np.testing.assert_allclose(metrics['reconstruction_loss'], rec)
  np.testing.assert_allclose(metrics['kl'], kl)
  np.testing.assert_allclose(loss, rec + 0.01 * kl)
  assert set(metrics) == {'reconstruction_loss', 'kl', 'loss'}
  assert float(metrics['loss']) == float(loss)


def test_autoencoder_loss_unknown_reconstruction_loss():
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'; accepted: l1, l2"):
    losses.autoencoder_loss(x, x, x, x, kl_weight=1.0, reconstruction_loss='l3')


# --- PSNR. -------------------------------------------------------------------------


def test_psnr_closed_form():
  a = jnp.zeros((3, 8, 8, 3))
  b = jnp.stack([jnp.full((8, 8, 3), c) for c in (0.1, 0.5, 2.0)])
  # MSE = c^2, so PSNR = 10 log10(2^2 / c^2).
  np.testing.assert_allclose(losses.psnr(a, b), 10 * np.log10(4.0 / np.array([0.1, 0.5, 2.0])**2),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.psnr(a, b, data_range=1.0),
                             10 * np.log10(1.0 / np.array([0.1, 0.5, 2.0])**2), rtol=1e-5)
  assert np.isinf(losses.psnr(a, a)).all()


@pytest.mark.parametrize('name', ['min_snr', 'p2'])
def test_weights_are_finite_at_zero_terminal_snr(name):
  zero_snr = diffusion.rescale_zero_terminal_snr(diffusion.make_schedule('scaled_linear', 1000))
  t = jnp.array([0, 500, 999])
  assert float(diffusion.snr(zero_snr, 999)) == 0.0
  for prediction_type in diffusion.PREDICTION_TYPES:
    weights = losses.loss_weighting(zero_snr, t, name, prediction_type=prediction_type,
                                    min_snr_gamma=5.0, p2_gamma=1.0, p2_k=2.0)
    assert np.all(np.isfinite(weights)), (prediction_type, weights)
  # The limits at SNR -> 0 on the eps loss: min(SNR, gamma) / SNR -> 1, 1 / (k + SNR) -> 1 / k.
  eps = losses.loss_weighting(zero_snr, t, name, prediction_type='eps', min_snr_gamma=5.0,
                              p2_gamma=1.0, p2_k=2.0)
  assert float(eps[-1]) == (1.0 if name == 'min_snr' else 0.5)
