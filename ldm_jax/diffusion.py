"""Gaussian diffusion math: noise schedules, the forward process, its posterior, and
conversions between the eps / x0 / v parameterizations.

Everything here is a pure function of arrays. The `Schedule` is a pytree passed as an
argument, so every function can be `jax.jit`-ed with the schedule as an input.

Conventions. Timesteps are 0-based indices: index `t` in [0, T-1] is diffusion step
t+1 of the papers, so `alphas_cumprod[t]` = prod_{k<=t} (1 - betas[k]) and
x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) eps. An integer `t`
indexes the tables directly; a float `t` is a fractional index and is interpolated
(see `alphas_cumprod_at`).
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'scaled_linear', 'cosine', 'sigmoid')
PREDICTION_TYPES = ('eps', 'x0', 'v')

# Default beta ranges: DDPM (Ho et al. 2020) and LDM / Stable Diffusion.
_BETA_RANGES = {'linear': (1e-4, 0.02), 'scaled_linear': (0.00085, 0.012),
                'sigmoid': (1e-4, 0.02)}
# Nichol & Dhariwal 2021: offset of the cosine schedule and the clip on betas that
# keeps the last steps from being singular.
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999


@flax.struct.dataclass
class Schedule:
  """A discrete variance schedule and the tables derived from it.

  All fields are float32 arrays of shape [T], indexed by the 0-based timestep t.
  The `*_prev` and posterior tables use alphas_cumprod[-1] := 1 (i.e. x_{-1} is x0).

  Attributes:
    betas: beta_t, the variance added at step t.
    alphas: 1 - beta_t.
    alphas_cumprod: abar_t = prod_{k<=t} alpha_k.
    alphas_cumprod_prev: abar_{t-1}, with 1 at t=0.
    posterior_variance: variance of q(x_{t-1} | x_t, x0); 0 at t=0.
    posterior_log_variance_clipped: its log, with the t=0 entry replaced by the t=1
      entry so that it is finite (as in DDPM).
    posterior_mean_coef1: coefficient of x0 in the posterior mean.
    posterior_mean_coef2: coefficient of x_t in the posterior mean.
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps (static: taken from the array shape)."""
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray | jax.Array | list[float]) -> Schedule:
  """Builds a `Schedule` from betas; the tables are computed in float64.

  Args:
    betas: [T] variances of the forward steps, T >= 2, each in (0, 1); the last
      may be exactly 1 (zero terminal SNR, see `rescale_zero_terminal_snr`).

  Returns:
    The schedule, with float32 arrays.

  Raises:
    ValueError: if betas is not a 1-D array of at least 2 values in (0, 1).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must be a 1-D array of at least 2 values, got shape '
                     f'{betas.shape}')
  if not (np.all((betas[:-1] > 0.0) & (betas[:-1] < 1.0)) and 0.0 < betas[-1] <= 1.0):
    raise ValueError('betas must lie in the open interval (0, 1) (the last may be 1)')
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  one_minus_alphas_cumprod = 1.0 - alphas_cumprod
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus_alphas_cumprod
  # posterior_variance[0] is 0; DDPM clips its log to the next value.
  posterior_log_variance_clipped = np.log(
      np.append(posterior_variance[1], posterior_variance[1:]))
  posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / one_minus_alphas_cumprod
  posterior_mean_coef2 = ((1.0 - alphas_cumprod_prev) * np.sqrt(alphas)
                          / one_minus_alphas_cumprod)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      posterior_variance=f32(posterior_variance),
      posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
      posterior_mean_coef1=f32(posterior_mean_coef1),
      posterior_mean_coef2=f32(posterior_mean_coef2),
  )


def _cosine_betas(num_timesteps: int) -> np.ndarray:
  """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64 [T]."""
  def alpha_bar(u: np.ndarray) -> np.ndarray:  # u in [0, 1]: continuous time
    return np.cos((u + _COSINE_OFFSET) / (1.0 + _COSINE_OFFSET) * math.pi / 2) ** 2

  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alphas_bar = alpha_bar(u)
  betas = 1.0 - alphas_bar[1:] / alphas_bar[:-1]
  return np.minimum(betas, _COSINE_MAX_BETA)


def make_schedule(name: str, num_timesteps: int, *, beta_start: float | None = None,
                  beta_end: float | None = None) -> Schedule:
  """Makes a named variance schedule.

  Args:
    name: one of `SCHEDULES`:
      'linear': DDPM (Ho et al. 2020), betas = linspace(beta_start, beta_end, T),
        default range 1e-4..0.02.
      'scaled_linear': LDM / Stable Diffusion, betas =
        linspace(sqrt(beta_start), sqrt(beta_end), T)**2, default range 0.00085..0.012.
      'cosine': Nichol & Dhariwal 2021, offset s=0.008, betas clipped at 0.999.
      'sigmoid': GeoDiff (Xu et al. 2022), betas = beta_start + (beta_end -
        beta_start) * sigmoid(linspace(-6, 6, T)), default range 1e-4..0.02: few
        steps near the ends of the chain, more in the middle.
    num_timesteps: T, at least 2.
    beta_start: first beta of the linear schedules (default: the paper's value).
    beta_end: last beta of the linear schedules (default: the paper's value).

  Returns:
    The schedule.

  Raises:
    ValueError: for an unknown name, T < 2, or a beta range given for 'cosine'.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule '{name}'; accepted: {', '.join(SCHEDULES)}")
  if num_timesteps < 2:
    raise ValueError(f'num_timesteps must be at least 2, got {num_timesteps}')
  if name == 'cosine':
    if beta_start is not None or beta_end is not None:
      raise ValueError("beta_start/beta_end apply to the 'linear', 'scaled_linear' "
                       "and 'sigmoid' schedules, not to 'cosine'")
    return schedule_from_betas(_cosine_betas(num_timesteps))
  default_start, default_end = _BETA_RANGES[name]
  beta_start = default_start if beta_start is None else beta_start
  beta_end = default_end if beta_end is None else beta_end
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == 'sigmoid':
    ramp = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)))
    betas = beta_start + (beta_end - beta_start) * ramp
  else:  # scaled_linear
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps,
                        dtype=np.float64) ** 2
  return schedule_from_betas(betas)


def rescale_zero_terminal_snr(s: Schedule) -> Schedule:
  """The schedule rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1).

  sqrt(abar) is shifted so that its last value is 0 and scaled so that its first is
  unchanged; the last step is then pure noise, as at sampling time. Pair it with
  `v` (or `x0`) prediction: an eps-predictor cannot recover x0 from pure noise.
  """
  sqrt_abar = np.sqrt(np.asarray(s.alphas_cumprod, np.float64))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar ** 2
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return schedule_from_betas(betas)


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-example values a [B] (or a scalar) to broadcast against x [B, ...]."""
  return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def alphas_cumprod_at(s: Schedule, t: jax.Array | int | float) -> jax.Array:
  """abar_t for integer or fractional timestep indices.

  An integer t indexes `s.alphas_cumprod` directly. A float t in [0, T-1] (clipped to
  that range) is interpolated linearly in log-SNR, log(abar / (1 - abar)), between
  the neighbouring integer steps; at integral values it returns the table entry.

  Args:
    s: the schedule.
    t: timestep indices, any shape (typically [B]), integer or float dtype.

  Returns:
    abar_t, float32, same shape as t.
  """
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    return s.alphas_cumprod[t]
  last = s.num_timesteps - 1
  t = jnp.clip(t.astype(jnp.float32), 0.0, float(last))
  lower = jnp.floor(t)
  frac = t - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, last)
  abar = s.alphas_cumprod
  log_snr = jnp.log(abar) - jnp.log1p(-abar)  # [T]
  interpolated = jax.nn.sigmoid((1.0 - frac) * log_snr[lower] + frac * log_snr[upper])
  # Exact table value at integral t (the sigmoid/log round trip is not bit-exact).
  return jnp.where(frac == 0.0, abar[lower], interpolated)


def snr(s: Schedule, t: jax.Array | int | float) -> jax.Array:
  """Signal-to-noise ratio abar_t / (1 - abar_t), same shape as t."""
  abar = alphas_cumprod_at(s, t)
  return abar / (1.0 - abar)


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I).

  Args:
    s: the schedule.
    x0: [B, ...] clean data.
    t: [B] timestep indices (int32, or float for fractional steps).
    noise: [B, ...] standard normal noise, same shape as x0.

  Returns:
    x_t, [B, ...].
  """
  abar = _expand(alphas_cumprod_at(s, t), x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior(s: Schedule, x0: jax.Array, x_t: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean and variance of the forward posterior q(x_{t-1} | x_t, x0).

  Args:
    s: the schedule.
    x0: [B, ...] clean data (or a prediction of it).
    x_t: [B, ...] noisy data at step t.
    t: [B] integer timestep indices (the posterior tables are defined per step).

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]); the log variance
    is clipped at t=0 as in `Schedule.posterior_log_variance_clipped`.

  Raises:
    TypeError: if t is not an integer array.
  """
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f'q_posterior needs integer timesteps, got dtype {t.dtype}')
  mean = (_expand(s.posterior_mean_coef1[t], x_t) * x0
          + _expand(s.posterior_mean_coef2[t], x_t) * x_t)
  variance = _expand(s.posterior_variance[t], x_t)
  log_variance = _expand(s.posterior_log_variance_clipped[t], x_t)
  return mean, variance, log_variance


def x0_from_eps(s: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). Shapes: [B, ...], t [B]."""
  abar = _expand(alphas_cumprod_at(s, t), x_t)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def eps_from_x0(s: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Shapes: [B, ...], t [B]."""
  abar = _expand(alphas_cumprod_at(s, t), x_t)
  return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def v_from_x0_eps(s: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022). [B, ...]."""
  abar = _expand(alphas_cumprod_at(s, t), x0)
  return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


def x0_from_v(s: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v. Shapes: [B, ...], t [B]."""
  abar = _expand(alphas_cumprod_at(s, t), x_t)
  return jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * v


def eps_from_v(s: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v. Shapes: [B, ...], t [B]."""
  abar = _expand(alphas_cumprod_at(s, t), x_t)
  return jnp.sqrt(1.0 - abar) * x_t + jnp.sqrt(abar) * v


def check_prediction_type(prediction_type: str) -> None:
  """Raises ValueError naming the accepted types for an unknown `prediction_type`."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"unknown prediction type '{prediction_type}'; accepted: "
                     f"{', '.join(PREDICTION_TYPES)}")


def training_target(s: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str) -> jax.Array:
  """What the model should output for x_t = q_sample(s, x0, t, noise).

  Args:
    s: the schedule.
    x0: [B, ...] clean data.
    noise: [B, ...] the noise used to make x_t.
    t: [B] timestep indices.
    prediction_type: one of `PREDICTION_TYPES`.

  Returns:
    [B, ...]: noise for 'eps', x0 for 'x0', v for 'v'.

  Raises:
    ValueError: for an unknown prediction type.
  """
  check_prediction_type(prediction_type)
  if prediction_type == 'eps':
    return noise
  if prediction_type == 'x0':
    return x0
  return v_from_x0_eps(s, x0, noise, t)


def model_output_to_x0_eps(s: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array,
                           prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """Converts a model output of the given type to the (x0, eps) it implies.

  Inverse of `training_target`: for x_t = q_sample(s, x0, t, noise), feeding
  output = training_target(s, x0, noise, t, prediction_type) returns (x0, noise).

  Args:
    s: the schedule.
    x_t: [B, ...] the model input.
    t: [B] timestep indices.
    output: [B, ...] the model output.
    prediction_type: one of `PREDICTION_TYPES`.

  Returns:
    (x0 [B, ...], eps [B, ...]).

  Raises:
    ValueError: for an unknown prediction type.
  """
  check_prediction_type(prediction_type)
  if prediction_type == 'eps':
    return x0_from_eps(s, x_t, t, output), output
  if prediction_type == 'x0':
    return output, eps_from_x0(s, x_t, t, output)
  return x0_from_v(s, x_t, t, output), eps_from_v(s, x_t, t, output)
