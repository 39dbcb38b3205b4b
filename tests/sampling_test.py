"""Tests of ldm_jax.sampling with the exact denoiser of Gaussian data.

For data x0 ~ N(MU, SD^2 I) the Bayes-optimal denoiser is known in closed form,
  E[x0 | x_t] = MU + sqrt(abar) SD^2 / (abar SD^2 + 1 - abar) (x_t - sqrt(abar) MU),
so the samplers can be checked against exact answers with no trained network: a
deterministic sampler is an affine map of x_T, and an ancestral sampler's output is
Gaussian with a mean and variance that a scalar recursion gives exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion, sampling

T = 1000
MU, SD = 0.5, 0.3
LINEAR = diffusion.make_schedule('linear', T)
BETAS64 = np.linspace(1e-4, 0.02, T)  # the same schedule, in float64, for references

sample_jit = jax.jit(sampling.sample, static_argnames=sampling.STATIC_ARGNAMES)


def exact_denoiser(x_t: jax.Array, t: jax.Array, *, schedule: diffusion.Schedule,
                   prediction_type: str) -> jax.Array:
  """The optimal model output for x0 ~ N(MU, SD^2 I). x_t: [B, ...]; t: [B] float.

  The model carries the schedule it was trained with, as a network's weights would.
  """
  abar = diffusion.alphas_cumprod_at(schedule, t)
  abar = abar.reshape((-1,) + (1,) * (x_t.ndim - 1))
  x0 = MU + jnp.sqrt(abar) * SD**2 / (abar * SD**2 + 1 - abar) * (x_t - jnp.sqrt(abar) * MU)
  eps = diffusion.eps_from_x0(schedule, x_t, t, x0)
  return diffusion.training_target(schedule, x0, eps, t, prediction_type)


# Module-level models, so that jitted samplers are compiled once per configuration.
MODELS = {p: functools.partial(exact_denoiser, schedule=LINEAR, prediction_type=p)
          for p in diffusion.PREDICTION_TYPES}


# --- Timesteps. --------------------------------------------------------------------


def test_sampling_timesteps():
  np.testing.assert_array_equal(sampling.sampling_timesteps(T, 50, 'leading'),
                                np.arange(0, T, 20))
  trailing = sampling.sampling_timesteps(T, 50, 'trailing')
  np.testing.assert_array_equal(trailing, np.arange(19, T, 20))
  np.testing.assert_array_equal(sampling.sampling_timesteps(T, 3, 'linspace'), [0, 500, 999])
  for spacing in sampling.TIMESTEP_SPACINGS:
    np.testing.assert_array_equal(sampling.sampling_timesteps(T, T, spacing), np.arange(T))
    for n in (1, 7, 30, 333, 999):
      steps = sampling.sampling_timesteps(T, n, spacing)
      assert steps.shape == (n,) and steps.dtype == np.int32
      assert np.all(np.diff(steps) > 0) and steps[0] >= 0 and steps[-1] <= T - 1


def test_sampling_timesteps_errors():
  with pytest.raises(ValueError, match="unknown timestep spacing 'even'; accepted: "
                     'leading, trailing, linspace'):
    sampling.sampling_timesteps(T, 10, 'even')
  for n in (0, T + 1):
    with pytest.raises(ValueError, match='num_steps'):
      sampling.sampling_timesteps(T, n)


# --- Respaced DDPM posterior. ------------------------------------------------------


def _respaced_reference(betas: np.ndarray, timesteps: np.ndarray):
  """Improved-DDPM respacing in float64: new betas 1 - abar_t / abar_prev."""
  abar = np.cumprod(1.0 - betas)[timesteps]
  abar_prev = np.append(1.0, abar[:-1])
  new_betas = 1.0 - abar / abar_prev
  coef1 = new_betas * np.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - new_betas) / (1.0 - abar)
  variance = new_betas * (1.0 - abar_prev) / (1.0 - abar)
  return coef1, coef2, variance


@pytest.mark.parametrize('name', diffusion.SCHEDULES)
def test_full_respacing_is_the_schedule_posterior(name):
  s = diffusion.make_schedule(name, T)
  coef1, coef2, variance = sampling._respaced_posterior(s, np.arange(T))
  np.testing.assert_allclose(coef1, s.posterior_mean_coef1, rtol=1e-5)
  np.testing.assert_allclose(coef2, s.posterior_mean_coef2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(variance, s.posterior_variance, rtol=1e-5)


@pytest.mark.parametrize('spacing', sampling.TIMESTEP_SPACINGS)
def test_respaced_posterior_matches_reference(spacing):
  timesteps = sampling.sampling_timesteps(T, 37, spacing)
  got = sampling._respaced_posterior(LINEAR, timesteps)
  for g, r in zip(got, _respaced_reference(BETAS64, timesteps)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


# --- DDIM: deterministic, an affine map x_T -> m + k x_T. -------------------------


def _ddim_affine_map(num_steps: int, prediction_type: str = 'eps') -> tuple[float, float]:
  out = sample_jit(MODELS[prediction_type], LINEAR, (2, 1), jax.random.key(0),
                   method='ddim', num_steps=num_steps, eta=0.0,
                   prediction_type=prediction_type, x_T=jnp.array([[0.0], [1.0]]))
  m_hat = float(out[0, 0])
  return m_hat, float(out[1, 0]) - m_hat


def _exact_affine_map(num_steps: int) -> tuple[float, float]:
  """The probability-flow ODE map from the first visited timestep to t=0."""
  first = sampling.sampling_timesteps(T, num_steps)[-1]
  abar = np.cumprod(1.0 - BETAS64)[first]
  k = SD / np.sqrt(abar * SD**2 + 1.0 - abar)
  return MU - k * np.sqrt(abar) * MU, k


# Relative errors of k reached by a reference implementation; at least as accurate.
DDIM_REFERENCE_ERRORS = {50: 0.089, 200: 0.023}


def test_ddim_converges_to_the_probability_flow_map():
  errors = {}
  for num_steps in (50, 200, 1000):
    m_hat, k_hat = _ddim_affine_map(num_steps)
    m, k = _exact_affine_map(num_steps)
    errors[num_steps] = abs(k_hat - k) / k
    assert abs(m_hat - m) < 1e-3 * abs(m)
  for num_steps, reference in DDIM_REFERENCE_ERRORS.items():
    assert errors[num_steps] <= 1.1 * reference, errors
  assert errors[1000] < errors[200] < errors[50], errors


@pytest.mark.parametrize('prediction_type', ['x0', 'v'])
def test_ddim_same_for_every_parameterization(prediction_type):
  # The same denoiser in another parameterization is the same sampler.
  m_eps, k_eps = _ddim_affine_map(50, 'eps')
  m, k = _ddim_affine_map(50, prediction_type)
  np.testing.assert_allclose([m, k], [m_eps, k_eps], rtol=1e-4)


# --- DDPM: ancestral, Gaussian output whose law a scalar recursion gives. ----------


def _ancestral_law(timesteps: np.ndarray, *, true_reverse_variance: bool = False):
  """Mean and std of ancestral sampling with the exact denoiser, from x_T ~ N(0, 1).

  Each step is x_prev = A x + b + sigma z with the sampler's posterior variance
  sigma^2. With true_reverse_variance, sigma^2 also gets coef1^2 Var[x0 | x_t], which
  makes every step the exact reverse kernel q(x_{t-1} | x_t) of Gaussian data.
  """
  abar = np.cumprod(1.0 - BETAS64)[timesteps]
  coef1, coef2, variance = _respaced_reference(BETAS64, timesteps)
  mean, var = 0.0, 1.0
  for i in reversed(range(len(timesteps))):
    a = abar[i]
    gain = np.sqrt(a) * SD**2 / (a * SD**2 + 1.0 - a)  # x0_hat = MU + gain (x - sqrt(a) MU)
    slope = coef1[i] * gain + coef2[i]
    mean = slope * mean + coef1[i] * (MU - gain * np.sqrt(a) * MU)
    step_var = variance[i]
    if true_reverse_variance:
      step_var += coef1[i]**2 * SD**2 * (1.0 - a) / (a * SD**2 + 1.0 - a)
    var = slope**2 * var + step_var
  return mean, np.sqrt(var)


@pytest.mark.parametrize('num_steps', [100, 1000])
def test_ancestral_reference_is_exact_with_the_true_reverse_variance(num_steps):
  timesteps = sampling.sampling_timesteps(T, num_steps)
  np.testing.assert_allclose(_ancestral_law(timesteps, true_reverse_variance=True),
                             [MU, SD], rtol=1e-4)


# 1000 steps: the DDPM sampler; its posterior (lower-bound) variance makes the samples
# ~1% too narrow. 100 respaced steps: ~9% too narrow, the law says exactly how much.
@pytest.mark.parametrize('num_steps, max_std_deficit', [(100, 0.12), (1000, 0.02)])
def test_ddpm_samples_follow_the_ancestral_law(num_steps, max_std_deficit):
  n = 8192
  x = sample_jit(MODELS['eps'], LINEAR, (n, 1), jax.random.key(1), method='ddpm',
                 num_steps=num_steps)
  mean, std = float(jnp.mean(x)), float(jnp.std(x))
  law_mean, law_std = _ancestral_law(sampling.sampling_timesteps(T, num_steps))
  # Within 4 standard errors of the law, which itself is close to N(MU, SD^2).
  assert abs(mean - law_mean) < 4 * law_std / np.sqrt(n)
  assert abs(std - law_std) < 4 * law_std / np.sqrt(2 * n)
  assert abs(law_mean - MU) < 1e-4
  assert 0 < 1 - law_std / SD < max_std_deficit


def test_ddim_eta1_is_ddpm():
  kwargs = dict(shape=(64, 1), rng=jax.random.key(2), num_steps=100)
  ddpm = sample_jit(MODELS['eps'], LINEAR, method='ddpm', **kwargs)
  ddim = sample_jit(MODELS['eps'], LINEAR, method='ddim', eta=1.0, **kwargs)
  np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


# --- API. --------------------------------------------------------------------------


def test_sample_is_jittable_and_deterministic():
  kwargs = dict(method='ddim', num_steps=10, eta=0.5, prediction_type='v')
  model = MODELS['v']
  shape = (2, 4, 4, 3)
  a = sample_jit(model, LINEAR, shape, jax.random.key(3), **kwargs)
  b = sample_jit(model, LINEAR, shape, jax.random.key(3), **kwargs)
  c = sample_jit(model, LINEAR, shape, jax.random.key(4), **kwargs)
  assert a.shape == shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_x_T_is_used():
  model = MODELS['eps']
  x_T = jnp.linspace(-2.0, 2.0, 8).reshape(8, 1)
  a = sample_jit(model, LINEAR, (8, 1), jax.random.key(5), num_steps=10, x_T=x_T)
  b = sample_jit(model, LINEAR, (8, 1), jax.random.key(6), num_steps=10, x_T=x_T)
  c = sample_jit(model, LINEAR, (8, 1), jax.random.key(5), num_steps=10, x_T=-x_T)
  np.testing.assert_array_equal(a, b)  # deterministic DDIM: only x_T matters
  assert np.all(np.diff(np.asarray(a[:, 0])) > 0)  # the map is increasing in x_T
  assert not np.allclose(a, c)
  with pytest.raises(ValueError, match='x_T has shape'):
    sampling.sample(model, LINEAR, (8, 1), jax.random.key(5), x_T=jnp.zeros((4, 1)))


def _out_of_range_model(x_t: jax.Array, t: jax.Array) -> jax.Array:
  """Predicts x0 = 3 everywhere, outside the data range [-1, 1]."""
  del t
  return jnp.full_like(x_t, 3.0)


@pytest.mark.parametrize('method', sampling.SAMPLERS)
def test_clip_denoised(method):
  kwargs = dict(method=method, num_steps=5, prediction_type='x0')
  clipped = sample_jit(_out_of_range_model, LINEAR, (4, 2), jax.random.key(0),
                       clip_denoised=True, **kwargs)
  np.testing.assert_allclose(clipped, np.ones((4, 2)), atol=1e-5)
  unclipped = sample_jit(_out_of_range_model, LINEAR, (4, 2), jax.random.key(0), **kwargs)
  np.testing.assert_allclose(unclipped, np.full((4, 2), 3.0), atol=1e-5)


def test_argument_errors():
  model, key = MODELS['eps'], jax.random.key(0)
  with pytest.raises(ValueError, match="unknown sampler 'euler'; accepted: ddpm, ddim"):
    sampling.sample(model, LINEAR, (2, 1), key, method='euler')
  with pytest.raises(ValueError, match='accepted: eps, x0, v'):
    sampling.sample(model, LINEAR, (2, 1), key, prediction_type='score')
  with pytest.raises(ValueError, match='accepted: leading, trailing, linspace'):
    sampling.sample(model, LINEAR, (2, 1), key, timestep_spacing='even')
  with pytest.raises(ValueError, match='num_steps'):
    sampling.sample(model, LINEAR, (2, 1), key, num_steps=T + 1)
