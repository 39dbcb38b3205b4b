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
                   prediction_type: str, mu: float | jax.Array = MU) -> jax.Array:
  """The optimal model output for x0 ~ N(MU, SD^2 I). x_t: [B, ...]; t: [B] float.

  The model carries the schedule it was trained with, as a network's weights would.
  mu: the data mean, a number or one per example [B].
  """
  expand = lambda a: jnp.reshape(a, (-1,) + (1,) * (x_t.ndim - 1))
  abar = expand(diffusion.alphas_cumprod_at(schedule, t))
  mu = expand(jnp.asarray(mu, jnp.float32)) if jnp.ndim(mu) else mu
  x0 = mu + jnp.sqrt(abar) * SD**2 / (abar * SD**2 + 1 - abar) * (x_t - jnp.sqrt(abar) * mu)
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
  coef1, coef2, variance = sampling.respaced_posterior(s, np.arange(T))
  np.testing.assert_allclose(coef1, s.posterior_mean_coef1, rtol=1e-5)
  np.testing.assert_allclose(coef2, s.posterior_mean_coef2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(variance, s.posterior_variance, rtol=1e-5)


@pytest.mark.parametrize('spacing', sampling.TIMESTEP_SPACINGS)
def test_respaced_posterior_matches_reference(spacing):
  timesteps = sampling.sampling_timesteps(T, 37, spacing)
  got = sampling.respaced_posterior(LINEAR, timesteps)
  for g, r in zip(got, _respaced_reference(BETAS64, timesteps)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


# --- DDIM: deterministic, an affine map x_T -> m + k x_T. -------------------------


def _affine_map(method: str, num_steps: int, prediction_type: str = 'eps', *,
                schedule: diffusion.Schedule = LINEAR, model=None,
                **kwargs) -> tuple[float, float]:
  """(m_hat, k_hat) of a deterministic sampler x_T -> m_hat + k_hat x_T."""
  model = MODELS[prediction_type] if model is None else model
  out = sample_jit(model, schedule, (2, 1), jax.random.key(0),
                   method=method, num_steps=num_steps, prediction_type=prediction_type,
                   x_T=jnp.array([[0.0], [1.0]]), **kwargs)
  m_hat = float(out[0, 0])
  return m_hat, float(out[1, 0]) - m_hat


def _ddim_affine_map(num_steps: int, prediction_type: str = 'eps') -> tuple[float, float]:
  return _affine_map('ddim', num_steps, prediction_type, eta=0.0)


def _exact_map_from(timestep: int) -> tuple[float, float]:
  """(m, k): the probability-flow ODE map from x at `timestep` to x0.

  x_t ~ N(sqrt(abar) MU, abar SD^2 + 1 - abar) is carried monotonically onto
  N(MU, SD^2), so k = SD / std(x_t) and m = MU - k sqrt(abar) MU.
  """
  abar = np.cumprod(1.0 - BETAS64)[timestep]
  k = SD / np.sqrt(abar * SD**2 + 1.0 - abar)
  return MU - k * np.sqrt(abar) * MU, k


def _exact_affine_map(num_steps: int) -> tuple[float, float]:
  """The probability-flow ODE map from DDIM's first visited timestep to t=0."""
  return _exact_map_from(sampling.sampling_timesteps(T, num_steps)[-1])


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


# --- Every deterministic sampler: accuracy and order on the same affine map. ------

# Relative errors of k reached by a reference implementation; ours are at least as
# accurate (within 10%). Its DPM-Solver++ steps uniformly in t (timesteps
# round(linspace(T-1, 0, n+1))[:-1], then to sigma = 0); the steps here are uniform in
# log-SNR, as Lu et al. 2022 recommend, and are about 10x more accurate on this problem.
REFERENCE_ERRORS = {
    'ddim': {50: 0.089, 200: 0.023},
    'euler': {40: 0.080},
    'dpm_solver++': {20: 0.14, 40: 0.034, 80: 0.004},
    'heun': {20: 0.057, 40: 0.012},  # 20 steps: 39 model evaluations.
}
# Doubling the steps divides the error of a first-order sampler by about 2, that of a
# second-order one by at least 4 (more once the first-order first and last steps of
# DPM-Solver++(2M) stop mattering: 4.3 then 8.5).
ORDER_STEPS = {'ddim': (50, 100, 200), 'euler': (20, 40, 80),
               'dpm_solver++': (20, 40, 80), 'heun': (20, 40)}
SECOND_ORDER = ('dpm_solver++', 'heun')
ODE_SOLVERS = ('dpm_solver++', 'euler', 'heun')


def _start_of(method: str, num_steps: int, start_timestep: int = T - 1,
              spacing: str = 'leading') -> int:
  """The timestep at which a sampler takes x_T: DDIM's first visited timestep."""
  if method in ('ddim', 'ddpm'):
    return int(sampling.sampling_timesteps(start_timestep + 1, num_steps, spacing)[-1])
  return start_timestep


def _relative_errors(method: str, prediction_type: str, steps) -> dict[int, float]:
  """{num_steps: relative error of k_hat}, checking m_hat on the way."""
  errors = {}
  for num_steps in steps:
    m_hat, k_hat = _affine_map(method, num_steps, prediction_type)
    m, k = _exact_map_from(_start_of(method, num_steps))
    errors[num_steps] = abs(k_hat - k) / k
    assert abs(m_hat - m) < 1e-3 * abs(m), (num_steps, m_hat, m)
  return errors


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize('method', ['ddim', *ODE_SOLVERS])
def test_deterministic_sampler_accuracy(method, prediction_type):
  errors = _relative_errors(method, prediction_type, REFERENCE_ERRORS[method])
  for num_steps, reference in REFERENCE_ERRORS[method].items():
    assert errors[num_steps] <= 1.1 * reference, errors


# The order is the solver's, whatever the parameterization: it is checked with eps.
@pytest.mark.parametrize('method', ['ddim', *ODE_SOLVERS])
def test_deterministic_sampler_order(method):
  steps = ORDER_STEPS[method]
  errors = _relative_errors(method, 'eps', steps)
  for fewer, more in zip(steps[:-1], steps[1:]):
    ratio = errors[fewer] / errors[more]
    if method in SECOND_ORDER:
      assert ratio >= 4.0, errors
    else:
      assert 1.6 <= ratio <= 2.6, errors


@pytest.mark.parametrize('method', ODE_SOLVERS)
def test_one_step_ode_solvers_return_the_x0_prediction(method):
  # One step: the first-order step from x_T at T-1 to sigma = 0, i.e. the model's x0.
  m_hat, k_hat = _affine_map(method, 1, 'x0')
  abar = np.cumprod(1.0 - BETAS64)[-1]
  gain = np.sqrt(abar) * SD**2 / (abar * SD**2 + 1.0 - abar)
  np.testing.assert_allclose([m_hat, k_hat], [MU - gain * np.sqrt(abar) * MU, gain],
                             rtol=1e-4, atol=1e-7)


# --- DDPM: ancestral, Gaussian output whose law a scalar recursion gives. ----------


def _ancestral_law(timesteps: np.ndarray, *, true_reverse_variance: bool = False,
                   ddpm_variance: str = 'posterior'):
  """Mean and std of ancestral sampling with the exact denoiser, from x_T ~ N(0, 1).

  Each step is x_prev = A x + b + sigma z with the sampler's variance sigma^2: the
  respaced posterior variance, or with ddpm_variance='beta' the respaced beta (none on
  the last step). With true_reverse_variance, sigma^2 also gets coef1^2 Var[x0 | x_t],
  which makes every step the exact reverse kernel q(x_{t-1} | x_t) of Gaussian data.
  """
  abar = np.cumprod(1.0 - BETAS64)[timesteps]
  coef1, coef2, variance = _respaced_reference(BETAS64, timesteps)
  if ddpm_variance == 'beta':
    variance = np.append(0.0, 1.0 - abar[1:] / abar[:-1])
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


# 16k samples: the standard error of the std is 0.55%. At 1000 steps both variances
# give the data law within 3%; the posterior (lower-bound) variance makes the samples
# 1.2% too narrow, the beta (upper-bound) variance 0.3% too wide, which these samples
# cannot resolve but the law gives exactly. At 100 respaced steps the gap is plain:
# -9% (see above) and +3.6%.
@pytest.mark.parametrize('ddpm_variance, num_steps', [
    ('posterior', 1000), ('beta', 1000), ('beta', 100)])
def test_ddpm_variances(ddpm_variance, num_steps):
  n = 16384
  x = sample_jit(MODELS['eps'], LINEAR, (n, 1), jax.random.key(9), method='ddpm',
                 num_steps=num_steps, ddpm_variance=ddpm_variance)
  mean, std = float(jnp.mean(x)), float(jnp.std(x))
  law_mean, law_std = _ancestral_law(sampling.sampling_timesteps(T, num_steps),
                                     ddpm_variance=ddpm_variance)
  assert abs(mean - law_mean) < 4 * law_std / np.sqrt(n)
  assert abs(std - law_std) < 4 * law_std / np.sqrt(2 * n)
  assert abs(law_mean - MU) < 1e-4
  if ddpm_variance == 'posterior':
    assert law_std < SD
  else:
    assert law_std > SD
  if num_steps == T:
    assert abs(mean - MU) < 0.03 * MU and abs(std - SD) < 0.03 * SD
    assert abs(law_std / SD - 1) < 0.013


def test_ddim_eta1_is_ddpm():
  kwargs = dict(shape=(64, 1), rng=jax.random.key(2), num_steps=100)
  ddpm = sample_jit(MODELS['eps'], LINEAR, method='ddpm', **kwargs)
  ddim = sample_jit(MODELS['eps'], LINEAR, method='ddim', eta=1.0, **kwargs)
  np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


# --- Classifier-free guidance. ------------------------------------------------------

# Class-conditional Gaussian data: class y has mean CLASS_MEANS[y]; class 0 is the null
# class. Every output type is affine in the mean, so the guided output of
# (x_t, t, y) is exactly that of the model whose mean is m0 + w (m_y - m0).
CLASS_MEANS = jnp.array([MU, -0.4, 0.9])
LABELS = jnp.array([1, 2, 1, 2], jnp.int32)
NULL_LABELS = jnp.zeros((4,), jnp.int32)


def class_denoiser(x_t: jax.Array, t: jax.Array, y: jax.Array, *,
                   prediction_type: str = 'eps') -> jax.Array:
  return exact_denoiser(x_t, t, schedule=LINEAR, prediction_type=prediction_type,
                        mu=CLASS_MEANS[y])


def _labelled(labels: jax.Array):
  """The class model with its labels fixed: a model of (x_t, t) only."""
  return lambda x_t, t: class_denoiser(x_t, t, labels)


# Guidance wraps the model once for every sampler: one ancestral and one ODE sampler
# with two evaluations per step show it.
@pytest.mark.parametrize('method', ['ddpm', 'heun'])
def test_guidance_scale_1_is_the_conditional_model(method):
  kwargs = dict(method=method, num_steps=5)
  shape, key = (4, 3), jax.random.key(10)
  plain = sample_jit(_labelled(LABELS), LINEAR, shape, key, **kwargs)
  guided = sample_jit(class_denoiser, LINEAR, shape, key, cond=LABELS,
                      null_cond=NULL_LABELS, guidance_scale=1.0, **kwargs)
  np.testing.assert_array_equal(guided, plain)


@pytest.mark.parametrize('method', ['ddpm', 'heun'])
def test_guidance_is_the_closed_form_combination(method):
  scale = 3.0
  kwargs = dict(method=method, num_steps=8, prediction_type='v')
  shape, key = (4, 3), jax.random.key(11)
  guided = sample_jit(functools.partial(class_denoiser, prediction_type='v'), LINEAR,
                      shape, key, guidance_scale=scale, cond=LABELS, null_cond=NULL_LABELS,
                      **kwargs)
  guided_means = CLASS_MEANS[0] + scale * (CLASS_MEANS[LABELS] - CLASS_MEANS[0])
  combined = functools.partial(exact_denoiser, schedule=LINEAR, prediction_type='v',
                               mu=guided_means)
  expected = sample_jit(combined, LINEAR, shape, key, **kwargs)
  np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-5)


# Model evaluations per sample: one per step, Heun two but one on the last step
# (euler shares Heun's code, ddpm DDIM's).
@pytest.mark.parametrize('method, evaluations', [
    ('ddim', 6), ('dpm_solver++', 6), ('heun', 11)])
def test_guidance_evaluates_the_model_once_per_step_on_a_double_batch(method, evaluations):
  traced_batches, evaluated_batches = [], []

  def counting_model(x_t, t, y):
    traced_batches.append((x_t.shape[0], t.shape[0], y.shape[0]))
    jax.debug.callback(lambda t: evaluated_batches.append(t.shape[0]), t)
    return class_denoiser(x_t, t, y)

  out = sample_jit(counting_model, LINEAR, (4, 3), jax.random.key(12), method=method,
                   num_steps=6, guidance_scale=2.0, cond=LABELS, null_cond=NULL_LABELS)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert traced_batches and set(traced_batches) == {(8, 8, 8)}
  assert evaluated_batches == [8] * evaluations


# --- Starting part of the way: SDEdit / img2img. ----------------------------------


def _oracle(x_t: jax.Array, t: jax.Array, *, x0: jax.Array) -> jax.Array:
  """An eps-model that knows the data point x0."""
  return diffusion.eps_from_x0(LINEAR, x_t, t, x0)


@pytest.mark.parametrize('method', sampling.SAMPLERS)
def test_start_timestep_0_with_an_oracle_returns_x0(method):
  start_timestep = 0
  x0 = jax.random.uniform(jax.random.key(13), (8, 3), minval=-1.0, maxval=1.0)
  t = jnp.full((8,), start_timestep, jnp.int32)
  x_start = diffusion.q_sample(LINEAR, x0, t, jax.random.normal(jax.random.key(14), x0.shape))
  out = sample_jit(functools.partial(_oracle, x0=x0), LINEAR, x0.shape, jax.random.key(15),
                   method=method, num_steps=20, x_T=x_start, start_timestep=start_timestep)
  np.testing.assert_allclose(out, x0, atol=2e-4)


# From t=500 with the exact denoiser: the affine map from x at t=500 (ddim with
# 'trailing' spacing, which visits the start). Measured errors of k: ddim 100 steps
# 2.3%, euler 40 steps 3.6%, dpm_solver++ and heun 20 steps 0.5% and 1.0%.
@pytest.mark.parametrize('method, num_steps, max_error', [
    ('ddim', 100, 0.03), ('euler', 40, 0.045), ('dpm_solver++', 20, 0.006),
    ('heun', 20, 0.012)])
def test_start_timestep_follows_the_ode_from_there(method, num_steps, max_error):
  start = 500
  m_hat, k_hat = _affine_map(method, num_steps, start_timestep=start,
                             timestep_spacing='trailing')
  assert _start_of(method, num_steps, start, 'trailing') == start
  m, k = _exact_map_from(start)
  assert abs(k_hat - k) / k < max_error
  assert abs(m_hat - m) < 0.005 * abs(m)


# --- Zero terminal SNR (Lin et al. 2024): abar_{T-1} = 0, sigma_max = inf. ----------

ZERO_SNR = diffusion.rescale_zero_terminal_snr(LINEAR)


# Relative errors of k at 50 steps from pure noise (k = SD, m = MU exactly): ddim 8.4%,
# euler 10.7%, dpm_solver++ 0.35%, heun 2.4%.
ZERO_SNR_MAX_ERRORS = {'ddim': 0.1, 'euler': 0.13, 'dpm_solver++': 0.005, 'heun': 0.03}


@pytest.mark.parametrize('method', sampling.SAMPLERS)
def test_zero_terminal_snr_v_prediction_is_finite(method):
  assert float(ZERO_SNR.alphas_cumprod[-1]) == 0.0
  model = functools.partial(exact_denoiser, schedule=ZERO_SNR, prediction_type='v')
  # Two fixed starting points for the affine map, then 256 standard-normal ones.
  x_T = jnp.concatenate([jnp.array([[0.0], [1.0]]),
                         jax.random.normal(jax.random.key(17), (256, 1))])
  out = sample_jit(model, ZERO_SNR, x_T.shape, jax.random.key(18), method=method,
                   num_steps=50, prediction_type='v', ddpm_variance='beta', x_T=x_T)
  assert np.all(np.isfinite(out))
  # x_T is pure noise, so the samples follow the data law (up to 50-step errors).
  x = out[2:]
  assert abs(float(jnp.mean(x)) - MU) < 0.05
  assert abs(float(jnp.std(x)) / SD - 1.0) < 0.15
  if method in ZERO_SNR_MAX_ERRORS:
    m_hat, k_hat = float(out[0, 0]), float(out[1, 0] - out[0, 0])
    assert abs(k_hat / SD - 1.0) < ZERO_SNR_MAX_ERRORS[method]
    assert abs(m_hat - MU) < 1e-3


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
  with pytest.raises(ValueError, match="unknown sampler 'plms'; accepted: ddpm, ddim, "
                     r'dpm_solver\+\+, euler, heun'):
    sampling.sample(model, LINEAR, (2, 1), key, method='plms')
  with pytest.raises(ValueError, match='accepted: eps, x0, v'):
    sampling.sample(model, LINEAR, (2, 1), key, prediction_type='score')
  with pytest.raises(ValueError, match='accepted: leading, trailing, linspace'):
    sampling.sample(model, LINEAR, (2, 1), key, timestep_spacing='even')
  with pytest.raises(ValueError, match='num_steps'):
    sampling.sample(model, LINEAR, (2, 1), key, num_steps=T + 1)
  with pytest.raises(ValueError, match='num_steps'):
    sampling.sample(model, LINEAR, (2, 1), key, method='heun', num_steps=0)
  with pytest.raises(ValueError, match="unknown DDPM variance 'large'; accepted: posterior, beta"):
    sampling.sample(model, LINEAR, (2, 1), key, method='ddpm', ddpm_variance='large')
  for start in (-1, T):
    with pytest.raises(ValueError, match='start_timestep must be in 0..999'):
      sampling.sample(model, LINEAR, (2, 1), key, start_timestep=start)
  for cond, null_cond in ((None, None), (LABELS, None), (None, NULL_LABELS)):
    with pytest.raises(ValueError, match='guidance_scale=2.0 needs cond and null_cond'):
      sampling.sample(class_denoiser, LINEAR, (4, 1), key, guidance_scale=2.0, cond=cond,
                      null_cond=null_cond)
