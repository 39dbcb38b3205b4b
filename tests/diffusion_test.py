"""Tests of ldm_jax.diffusion against closed forms computed independently in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion

T = 1000


@pytest.fixture(scope='module', params=diffusion.SCHEDULES)
def schedule(request) -> diffusion.Schedule:
  return diffusion.make_schedule(request.param, T)


def _betas64(s: diffusion.Schedule) -> np.ndarray:
  return np.asarray(s.betas, np.float64)


# --- The worked example: T=2, betas (0.1, 0.2). ---------------------------------------
# x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, so abar = (0.9, 0.9 * 0.8 = 0.72).


@pytest.fixture(scope='module')
def two_step() -> diffusion.Schedule:
  return diffusion.schedule_from_betas([0.1, 0.2])


def test_worked_example_tables(two_step):
  s = two_step
  np.testing.assert_allclose(s.betas, [0.1, 0.2], rtol=1e-6)
  np.testing.assert_allclose(s.alphas, [0.9, 0.8], rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72], rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod_prev, [1.0, 0.9], rtol=1e-6)
  # Index 1 is step 2: beta_2 (1 - abar_1) / (1 - abar_2).
  np.testing.assert_allclose(s.posterior_variance, [0.0, 0.2 * 0.1 / 0.28], rtol=1e-6)
  np.testing.assert_allclose(s.posterior_log_variance_clipped,
                             np.log([0.2 * 0.1 / 0.28] * 2), rtol=1e-6)
  # coef1 = beta_2 sqrt(abar_1) / (1 - abar_2); coef2 = (1 - abar_1) sqrt(alpha_2) / (1 - abar_2).
  np.testing.assert_allclose(s.posterior_mean_coef1, [1.0, 0.2 * np.sqrt(0.9) / 0.28],
                             rtol=1e-6)
  np.testing.assert_allclose(s.posterior_mean_coef2, [0.0, 0.1 * np.sqrt(0.8) / 0.28],
                             rtol=1e-6, atol=1e-7)
  assert s.num_timesteps == 2


def test_worked_example_q_sample(two_step):
  x0 = jnp.array([[1.0, -2.0], [0.5, 0.0]])
  noise = jnp.array([[0.3, 0.7], [-1.0, 2.0]])
  x_t = diffusion.q_sample(two_step, x0, jnp.array([1, 1]), noise)
  np.testing.assert_allclose(x_t, np.sqrt(0.72) * x0 + np.sqrt(0.28) * noise, rtol=1e-6)


def test_worked_example_two_transitions_compose(two_step):
  # Analytically: sqrt(0.8) (sqrt(0.9) x0 + sqrt(0.1) e1) + sqrt(0.2) e2 has mean
  # sqrt(0.72) x0 and variance 0.8 * 0.1 + 0.2 = 0.28. Check it by Monte Carlo.
  n, x0 = 200_000, 1.5
  k1, k2 = jax.random.split(jax.random.key(0))
  e1 = jax.random.normal(k1, (n,))
  e2 = jax.random.normal(k2, (n,))
  x1 = diffusion.q_sample(two_step, jnp.full((n,), x0), jnp.zeros((n,), jnp.int32), e1)
  x2 = jnp.sqrt(two_step.alphas[1]) * x1 + jnp.sqrt(two_step.betas[1]) * e2
  sem = np.sqrt(0.28 / n)  # standard error of the mean
  assert abs(float(jnp.mean(x2)) - np.sqrt(0.72) * x0) < 5 * sem
  assert abs(float(jnp.var(x2)) - 0.28) < 5 * 0.28 * np.sqrt(2 / n)


# --- Schedules. --------------------------------------------------------------------


def test_schedule_invariants(schedule):
  s = schedule
  assert s.num_timesteps == T
  for name, value in vars(s).items():
    assert value.dtype == jnp.float32, name
    assert value.shape == (T,), name
  betas = _betas64(s)
  assert np.all(betas > 0) and np.all(s.betas <= np.float32(0.999))
  abar = np.asarray(s.alphas_cumprod)
  assert np.all(np.diff(abar) < 0), 'abar must decrease strictly'
  assert abar[-1] < 5e-3, 'the last step must be (close to) pure noise'
  # One-step transitions compose: abar_t = alpha_t abar_{t-1} and
  # 1 - abar_t = alpha_t (1 - abar_{t-1}) + beta_t.
  abar64 = np.cumprod(1.0 - betas)
  np.testing.assert_allclose(abar, abar64, rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(s.alphas_cumprod_prev, np.append(1.0, abar64[:-1]), rtol=1e-5)
  np.testing.assert_allclose(s.alphas, 1.0 - betas, rtol=1e-6, atol=1e-7)


def test_linear_endpoints():
  s = diffusion.make_schedule('linear', T)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.diff(_betas64(s)), (0.02 - 1e-4) / (T - 1), rtol=1e-3)


def test_scaled_linear_endpoints():
  s = diffusion.make_schedule('scaled_linear', T)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.00085, 0.012], rtol=1e-6)
  # Linear in sqrt(beta).
  np.testing.assert_allclose(np.diff(np.sqrt(_betas64(s))),
                             (np.sqrt(0.012) - np.sqrt(0.00085)) / (T - 1), rtol=1e-3)


def test_beta_range_override():
  s = diffusion.make_schedule('linear', 10, beta_start=0.001, beta_end=0.1)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.001, 0.1], rtol=1e-6)
  with pytest.raises(ValueError, match='cosine'):
    diffusion.make_schedule('cosine', 10, beta_end=0.1)


def test_cosine_matches_closed_form():
  s = diffusion.make_schedule('cosine', T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  expected = f(np.arange(1, T + 1)) / f(0)
  # Equal until the 0.999 clip on betas takes over at the very end.
  clipped = _betas64(s) >= 0.999 - 1e-6
  assert clipped[-1] and clipped.sum() <= 2
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[~clipped], expected[~clipped],
                             rtol=1e-5, atol=1e-9)


def test_unknown_schedule():
  with pytest.raises(ValueError) as e:
    diffusion.make_schedule('x', 10)
  assert str(e.value) == ("unknown schedule 'x'; accepted: linear, scaled_linear, cosine, "
                          "sigmoid")


def test_bad_betas():
  with pytest.raises(ValueError):
    diffusion.schedule_from_betas([0.1])
  with pytest.raises(ValueError):
    diffusion.schedule_from_betas([1.0, 0.1])  # Only the last beta may be 1.
  with pytest.raises(ValueError):
    diffusion.schedule_from_betas([0.1, 1.5])


def test_sigmoid_closed_form():
  s = diffusion.make_schedule('sigmoid', T, beta_start=1e-4, beta_end=0.02)
  ramp = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T)))
  np.testing.assert_allclose(_betas64(s), 1e-4 + (0.02 - 1e-4) * ramp, rtol=1e-5)
  assert np.all(np.diff(_betas64(s)) > 0)


@pytest.mark.parametrize('name', ['linear', 'scaled_linear', 'cosine'])
def test_rescale_zero_terminal_snr(name):
  s = diffusion.make_schedule(name, T)
  r = diffusion.rescale_zero_terminal_snr(s)
  abar, abar_r = (np.asarray(x.alphas_cumprod, np.float64) for x in (s, r))
  assert abar_r[-1] == 0.0 and float(r.betas[-1]) == 1.0
  np.testing.assert_allclose(abar_r[0], abar[0], rtol=1e-6)
  # sqrt(abar) is an affine function of the original sqrt(abar).
  a, b = np.polyfit(np.sqrt(abar), np.sqrt(abar_r), 1)
  np.testing.assert_allclose(np.sqrt(abar_r), a * np.sqrt(abar) + b, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(r.posterior_variance)))
  # v-prediction stays well defined at the pure-noise step: x0 = -v there.
  x_t, v = jnp.ones((1, 2)), jnp.full((1, 2), 0.5)
  np.testing.assert_allclose(diffusion.x0_from_v(r, x_t, jnp.array([T - 1]), v), -v, atol=1e-6)


def test_schedule_is_a_pytree(schedule):
  leaves = jax.tree.leaves(schedule)
  assert len(leaves) == 8
  t = jnp.array([0, 10, T - 1])
  x0 = jnp.ones((3, 2, 2, 1))
  eager = diffusion.q_sample(schedule, x0, t, x0)
  jitted = jax.jit(diffusion.q_sample)(schedule, x0, t, x0)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)


# --- Forward process and posterior. ------------------------------------------------


@pytest.mark.parametrize('t', [0, 100, 500, T - 1])
def test_q_sample_statistics(schedule, t):
  n, x0 = 100_000, 0.7
  noise = jax.random.normal(jax.random.key(t), (n, 1))
  x_t = diffusion.q_sample(schedule, jnp.full((n, 1), x0), jnp.full((n,), t), noise)
  abar = float(schedule.alphas_cumprod[t])
  var = 1.0 - abar
  # 5 standard errors of the sample mean and of the sample variance.
  assert abs(float(jnp.mean(x_t)) - np.sqrt(abar) * x0) < 5 * np.sqrt(var / n)
  assert abs(float(jnp.var(x_t)) - var) < 5 * var * np.sqrt(2 / n)


def test_q_sample_broadcasts_per_example(schedule):
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  noise = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  t = jnp.array([0, 400, T - 1])
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  for i in range(3):
    a = schedule.alphas_cumprod[t[i]]
    np.testing.assert_allclose(x_t[i], jnp.sqrt(a) * x0[i] + jnp.sqrt(1 - a) * noise[i],
                               rtol=1e-5, atol=1e-6)


def test_q_posterior_is_bayes(schedule):
  # q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): a Gaussian prior
  # N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times a Gaussian likelihood of
  # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps. Precisions add.
  betas = _betas64(schedule)
  abar = np.cumprod(1.0 - betas)
  t = np.array([1, 2, 50, 500, T - 1])
  b = betas[t]
  abar_prev = abar[t - 1]
  precision = 1.0 / (1.0 - abar_prev) + (1.0 - b) / b
  variance = 1.0 / precision
  x0 = np.random.default_rng(0).normal(size=(len(t), 3, 2))
  x_t = np.random.default_rng(1).normal(size=(len(t), 3, 2))
  mean = variance[:, None, None] * (
      (np.sqrt(abar_prev) / (1.0 - abar_prev))[:, None, None] * x0
      + (np.sqrt(1.0 - b) / b)[:, None, None] * x_t)
  got_mean, got_var, got_logvar = diffusion.q_posterior(
      schedule, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_var[:, 0, 0], variance, rtol=1e-4)
  np.testing.assert_allclose(got_logvar[:, 0, 0], np.log(variance), rtol=1e-4, atol=1e-4)
  assert got_var.shape == (len(t), 1, 1)


def test_q_posterior_at_t0_is_x0(schedule):
  x0 = jnp.array([[0.3, -0.2]])
  x_t = jnp.array([[1.0, 2.0]])
  mean, var, _ = diffusion.q_posterior(schedule, x0, x_t, jnp.array([0]))
  np.testing.assert_allclose(mean, x0, rtol=1e-5)
  assert float(var[0, 0]) == 0.0


def test_q_posterior_rejects_float_t(schedule):
  with pytest.raises(TypeError):
    diffusion.q_posterior(schedule, jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.array([1.5]))


def test_snr(schedule):
  t = jnp.arange(T)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  np.testing.assert_allclose(diffusion.snr(schedule, t), abar / (1 - abar), rtol=1e-4)
  assert np.all(np.diff(np.asarray(diffusion.snr(schedule, t))) < 0)


# --- Parameterizations. ------------------------------------------------------------


def _example(s: diffusion.Schedule, seed: int = 0):
  """x0, eps [8, 4, 4, 3], t [8] spread over [0, T-1], and x_t."""
  k0, k1 = jax.random.split(jax.random.key(seed))
  x0 = jax.random.normal(k0, (8, 4, 4, 3))
  eps = jax.random.normal(k1, (8, 4, 4, 3))
  t = jnp.asarray(np.linspace(0, s.num_timesteps - 1, 8).round(), jnp.int32)
  return x0, eps, t, diffusion.q_sample(s, x0, t, eps)


def _tolerance(s: diffusion.Schedule, t: jax.Array) -> np.ndarray:
  """Per-example absolute tolerance [B, 1, 1, 1]: float32 round-off amplified by the
  conversions' divisions by sqrt(abar) and sqrt(1 - abar)."""
  abar = np.asarray(diffusion.alphas_cumprod_at(s, t), np.float64)
  return (2e-5 * (1 / np.sqrt(abar) + 1 / np.sqrt(1 - abar)))[:, None, None, None]


def test_eps_x0_round_trip(schedule):
  x0, eps, t, x_t = _example(schedule)
  tol = _tolerance(schedule, t)
  assert np.all(np.abs(diffusion.x0_from_eps(schedule, x_t, t, eps) - x0) < tol)
  assert np.all(np.abs(diffusion.eps_from_x0(schedule, x_t, t, x0) - eps) < tol)
  x0_back = diffusion.x0_from_eps(
      schedule, x_t, t, diffusion.eps_from_x0(schedule, x_t, t, x0))
  assert np.all(np.abs(x0_back - x0) < tol)


def test_v_round_trip(schedule):
  x0, eps, t, x_t = _example(schedule)
  v = diffusion.v_from_x0_eps(schedule, x0, eps, t)
  abar = schedule.alphas_cumprod[t][:, None, None, None]
  np.testing.assert_allclose(v, jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diffusion.x0_from_v(schedule, x_t, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_v(schedule, x_t, t, v), eps, atol=1e-5)
  # (x_t, v) is a rotation of (x0, eps) by the angle arctan(sqrt((1 - abar) / abar)).
  np.testing.assert_allclose(x_t**2 + v**2, x0**2 + eps**2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_training_target_inverts(schedule, prediction_type):
  x0, eps, t, x_t = _example(schedule)
  target = diffusion.training_target(schedule, x0, eps, t, prediction_type)
  x0_hat, eps_hat = diffusion.model_output_to_x0_eps(schedule, x_t, t, target,
                                                     prediction_type)
  tol = _tolerance(schedule, t)
  assert np.all(np.abs(x0_hat - x0) < tol)
  assert np.all(np.abs(eps_hat - eps) < tol)
  # And the pair is consistent with x_t.
  np.testing.assert_allclose(diffusion.q_sample(schedule, x0_hat, t, eps_hat), x_t,
                             atol=1e-4)


def test_unknown_prediction_type(schedule):
  x0, eps, t, x_t = _example(schedule)
  with pytest.raises(ValueError, match="unknown prediction type 'score'; accepted: eps, x0, v"):
    diffusion.training_target(schedule, x0, eps, t, 'score')
  with pytest.raises(ValueError, match='accepted: eps, x0, v'):
    diffusion.model_output_to_x0_eps(schedule, x_t, t, eps, 'score')


# --- Fractional timesteps. ---------------------------------------------------------


def test_fractional_t_matches_integers(schedule):
  t = jnp.arange(T)
  np.testing.assert_array_equal(
      diffusion.alphas_cumprod_at(schedule, t.astype(jnp.float32)),
      schedule.alphas_cumprod)
  np.testing.assert_array_equal(diffusion.alphas_cumprod_at(schedule, t),
                                schedule.alphas_cumprod)
  assert float(diffusion.alphas_cumprod_at(schedule, 3)) == float(schedule.alphas_cumprod[3])


def test_fractional_t_interpolates_log_snr(schedule):
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  half = np.asarray(diffusion.alphas_cumprod_at(schedule, jnp.arange(T - 1) + 0.5),
                    np.float64)
  assert np.all(half < abar[:-1]) and np.all(half > abar[1:])
  logit = lambda a: np.log(a) - np.log1p(-a)
  np.testing.assert_allclose(logit(half), (logit(abar[:-1]) + logit(abar[1:])) / 2,
                             rtol=1e-4, atol=1e-4)
  # Clipped to the valid range.
  ends = diffusion.alphas_cumprod_at(schedule, jnp.array([-3.0, T + 3.0]))
  np.testing.assert_array_equal(ends, schedule.alphas_cumprod[jnp.array([0, T - 1])])


def test_functions_accept_fractional_t(schedule):
  x0, eps, t, _ = _example(schedule)
  tf = t.astype(jnp.float32)
  np.testing.assert_array_equal(diffusion.q_sample(schedule, x0, tf, eps),
                                diffusion.q_sample(schedule, x0, t, eps))
  x_half = diffusion.q_sample(schedule, x0, tf + 0.5, eps)
  x0_back = diffusion.x0_from_eps(schedule, x_half, tf + 0.5, eps)
  assert np.all(np.abs(x0_back - x0) < _tolerance(schedule, tf + 0.5))
