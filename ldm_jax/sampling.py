"""Samplers of the reverse diffusion process.

One entry point, `sample`, runs a whole sampling loop as a single `jax.lax.scan`.
It is a pure function of (model_fn, schedule, shape, rng) and options; jit it with
the Python-level options static:

  sample_fn = jax.jit(sample, static_argnames=STATIC_ARGNAMES)
  images = sample_fn(model_fn, schedule, (16, 32, 32, 4), rng, method='ddim')

Methods:
  'ddpm': ancestral sampling (Ho et al. 2020) with the posterior variance. With fewer
    steps than T it samples the respaced process of improved DDPM (Nichol & Dhariwal
    2021): betas recomputed for the visited subsequence, 1 - abar_t / abar_prev.
  'ddim': Song et al. 2021, with noise scale eta (0: deterministic; 1 on the same
    timesteps: the same update as 'ddpm').

Both take steps t -> t_prev over the visited timesteps, descending, the last one to
"t = -1" where abar := 1, i.e. the final step returns the x0 prediction (DDPM's last
step is the posterior mean with zero variance, DDIM's is x0 itself).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion

SAMPLERS = ('ddpm', 'ddim')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
# Arguments of `sample` that must be static under `jax.jit`.
STATIC_ARGNAMES = ('model_fn', 'shape', 'method', 'num_steps', 'prediction_type',
                   'clip_denoised', 'timestep_spacing')

# model_fn(x_t [B, ...], t [B] float32 timestep indices) -> model output [B, ...].
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def sampling_timesteps(num_timesteps: int, num_steps: int,
                       spacing: str = 'leading') -> np.ndarray:
  """The timestep indices a sampler visits, ascending.

  Args:
    num_timesteps: T of the schedule.
    num_steps: how many steps to take, 1..T.
    spacing: one of `TIMESTEP_SPACINGS`:
      'leading': arange(num_steps) * (T // num_steps) (DDIM, Stable Diffusion);
        starts at 0, may stop short of T-1.
      'trailing': round(T - i * T / num_steps) - 1 for i < num_steps; always
        includes T-1 (Lin et al. 2024).
      'linspace': round(linspace(0, T-1, num_steps)); includes 0 and T-1.
    All three give arange(T) for num_steps == T.

  Returns:
    [num_steps] int32 distinct timestep indices in [0, T-1], ascending.

  Raises:
    ValueError: for an unknown spacing or num_steps outside 1..T.
  """
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"unknown timestep spacing '{spacing}'; accepted: "
                     f"{', '.join(TIMESTEP_SPACINGS)}")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in 1..{num_timesteps} (the number of '
                     f'timesteps), got {num_steps}')
  i = np.arange(num_steps)
  if spacing == 'leading':
    steps = i * (num_timesteps // num_steps)
  elif spacing == 'trailing':
    steps = np.floor(num_timesteps - i * num_timesteps / num_steps + 0.5) - 1
  else:  # linspace
    steps = np.floor(np.linspace(0, num_timesteps - 1, num_steps) + 0.5)
  return np.sort(steps.astype(np.int32))


def _respaced_posterior(s: diffusion.Schedule, timesteps: np.ndarray
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Posterior tables of the process restricted to `timesteps` (improved DDPM).

  Step i goes from timesteps[i] to timesteps[i-1] (to x0 for i=0), with
  beta'_i = 1 - abar[timesteps[i]] / abar[timesteps[i-1]]. Products of alphas are
  taken as sums of log1p(-betas) over each window, and 1 - abar as -expm1 of the
  log-cumsum, so that small betas keep full float32 precision: with all T steps the
  tables equal the schedule's posterior tables.

  Args:
    s: the schedule.
    timesteps: [n] ascending static timestep indices.

  Returns:
    (coef1, coef2, variance), each [n]: posterior mean = coef1 x0 + coef2 x_t.
  """
  num_timesteps = s.num_timesteps
  n = timesteps.shape[0]
  # Window i holds steps k with timesteps[i-1] < k <= timesteps[i]; steps after the
  # last visited one go to a discarded extra segment.
  segment_ids = np.searchsorted(timesteps, np.arange(num_timesteps), side='left')
  log_alphas = jnp.log1p(-s.betas)  # [T]
  log_alpha_window = jax.ops.segment_sum(
      log_alphas, jnp.asarray(segment_ids), num_segments=n + 1)[:n]  # [n]
  betas = -jnp.expm1(log_alpha_window)
  alphas = jnp.exp(log_alpha_window)
  one_minus_abar_all = -jnp.expm1(jnp.cumsum(log_alphas))  # [T]
  abar_prev = jnp.concatenate([jnp.ones((1,)), s.alphas_cumprod[timesteps[:-1]]])
  one_minus_abar = one_minus_abar_all[timesteps]
  one_minus_abar_prev = jnp.concatenate(
      [jnp.zeros((1,)), one_minus_abar_all[timesteps[:-1]]])
  coef1 = betas * jnp.sqrt(abar_prev) / one_minus_abar
  coef2 = one_minus_abar_prev * jnp.sqrt(alphas) / one_minus_abar
  variance = betas * one_minus_abar_prev / one_minus_abar
  return coef1, coef2, variance


def sample(model_fn: ModelFn, schedule: diffusion.Schedule, shape: tuple[int, ...],
           rng: jax.Array, *, method: str = 'ddim', num_steps: int = 50,
           eta: float | jax.Array = 0.0, prediction_type: str = 'eps',
           x_T: jax.Array | None = None, clip_denoised: bool = False,
           timestep_spacing: str = 'leading') -> jax.Array:
  """Draws samples x0 by running the reverse process from noise.

  Args:
    model_fn: the denoiser, model_fn(x_t [B, ...], t [B] float32 timestep indices in
      [0, T-1]) -> output [B, ...] of the given prediction_type.
    schedule: the schedule the model was trained with.
    shape: [B, ...] shape of the samples.
    rng: PRNG key for the starting noise and the per-step noise.
    method: one of `SAMPLERS`.
    num_steps: number of model evaluations, 1..T.
    eta: DDIM noise scale (ignored by 'ddpm'); may be traced.
    prediction_type: one of `diffusion.PREDICTION_TYPES`.
    x_T: optional [B, ...] starting point replacing the initial noise.
    clip_denoised: clip each x0 prediction to [-1, 1] (pixel-space data only).
    timestep_spacing: one of `TIMESTEP_SPACINGS`; see `sampling_timesteps`.

  Returns:
    [B, ...] float32 samples.

  Raises:
    ValueError: for an unknown method, prediction type or spacing, a bad num_steps,
      or x_T of the wrong shape.
  """
  if method not in SAMPLERS:
    raise ValueError(f"unknown sampler '{method}'; accepted: {', '.join(SAMPLERS)}")
  if prediction_type not in diffusion.PREDICTION_TYPES:
    raise ValueError(f"unknown prediction type '{prediction_type}'; accepted: "
                     f"{', '.join(diffusion.PREDICTION_TYPES)}")
  shape = tuple(shape)
  timesteps = sampling_timesteps(schedule.num_timesteps, num_steps, timestep_spacing)
  noise_rng, steps_rng = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(noise_rng, shape, jnp.float32)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f'x_T has shape {tuple(x_T.shape)}, expected {shape}')

  # Per-step tables, in the order the steps are taken (t descending).
  abar = schedule.alphas_cumprod[timesteps]  # [n]
  abar_prev = jnp.concatenate([jnp.ones((1,)), abar[:-1]])
  coef1, coef2, variance = _respaced_posterior(schedule, timesteps)
  xs = {
      't': jnp.asarray(timesteps, jnp.int32),
      'abar_prev': abar_prev,
      'coef1': coef1,
      'coef2': coef2,
      'variance': variance,
      'rng': jax.random.split(steps_rng, num_steps),
  }
  xs = jax.tree.map(lambda a: a[::-1], xs)
  batch_size = shape[0]
  eta = jnp.asarray(eta, jnp.float32)

  def step(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
    t = jnp.full((batch_size,), p['t'], jnp.int32)  # [B]
    output = model_fn(x, t.astype(jnp.float32))
    x0, eps = diffusion.model_output_to_x0_eps(schedule, x, t, output, prediction_type)
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = diffusion.eps_from_x0(schedule, x, t, x0)
    noise = jax.random.normal(p['rng'], shape, jnp.float32)
    if method == 'ddpm':
      mean = p['coef1'] * x0 + p['coef2'] * x
      x_prev = mean + jnp.sqrt(p['variance']) * noise
    else:  # ddim, Song et al. 2021, eq. 12 and 16
      # sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev) is
      # eta^2 times the respaced posterior variance.
      a_prev = p['abar_prev']
      sigma = eta * jnp.sqrt(p['variance'])
      direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
      x_prev = jnp.sqrt(a_prev) * x0 + direction + sigma * noise
    return x_prev.astype(jnp.float32), None

  x0, _ = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
  return x0
