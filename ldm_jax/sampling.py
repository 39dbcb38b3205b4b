"""Samplers of the reverse diffusion process.

One entry point, `sample`, runs a whole sampling loop as a single `jax.lax.scan`
(followed, for the ODE solvers, by their closing first-order step).
It is a pure function of (model_fn, schedule, shape, rng) and options; jit it with
the Python-level options static:

  sample_fn = jax.jit(sample, static_argnames=STATIC_ARGNAMES)
  images = sample_fn(model_fn, schedule, (16, 32, 32, 4), rng, method='ddim')

Methods (`num_steps` is the number of steps; every step evaluates the model once,
except Heun's, which evaluate it twice):
  'ddpm': ancestral sampling (Ho et al. 2020). With fewer steps than T it samples the
    respaced process of improved DDPM (Nichol & Dhariwal 2021): betas recomputed for
    the visited subsequence, 1 - abar_t / abar_prev. The per-step variance is the
    posterior variance beta-tilde (the lower bound) or that beta (the upper bound).
  'ddim': Song et al. 2021, with noise scale eta (0: deterministic; 1 on the same
    timesteps: the same update as 'ddpm').
  'dpm_solver++': DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order
    solver of the probability-flow ODE in data prediction, with steps uniform in
    log-SNR; the first step is first order.
  'euler', 'heun': deterministic Euler / Heun (2nd order) on the probability-flow ODE
    in sigma = sqrt((1 - abar) / abar) with the noise levels of Karras et al. 2022
    (rho = 7) from the schedule's sigma at t = T-1 (capped, see MIN_ALPHAS_CUMPROD)
    down to its sigma at t = 0.

'ddpm' and 'ddim' take steps t -> t_prev over the visited integer timesteps (see
`sampling_timesteps`), descending, the last one to "t = -1" where abar := 1, i.e. the
final step returns the x0 prediction (DDPM's last step is the posterior mean with zero
variance, DDIM's is x0 itself). The three ODE solvers visit fractional timesteps
(the schedule interpolated in log-sigma, `diffusion.alphas_cumprod_at`) from the start
down to t = 0, and their last step, from t = 0 to sigma = 0, is first order: it
returns the x0 prediction at t = 0 (with num_steps = 1, the x0 prediction at the
start). So 'euler' and 'dpm_solver++' evaluate the model num_steps times and 'heun'
2 num_steps - 1 times.

Conventions for every method: x_T is a standard-normal draw, the state x_t of the VP
process (Ho et al. 2020) at t = T-1 (or at `start_timestep`), and the result is x0.
The sigma-space solvers carry the variance-exploding state x / sqrt(abar) internally.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver++', 'euler', 'heun')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
DDPM_VARIANCES = ('posterior', 'beta')
# Arguments of `sample` that must be static under `jax.jit`.
STATIC_ARGNAMES = ('model_fn', 'shape', 'method', 'num_steps', 'prediction_type',
                   'guidance_scale', 'clip_denoised', 'timestep_spacing', 'ddpm_variance',
                   'start_timestep')
# Karras et al. 2022, eq. 5: noise levels uniform in sigma^(1/rho).
KARRAS_RHO = 7.0
# The ODE solvers start at sigma_max = sigma(max(abar_start, this)): finite for a
# zero-terminal-SNR schedule (abar_{T-1} = 0, sigma = inf), at most about 3162 (this
# also caps the cosine schedule's 2e4). The part of the path it cuts carries a signal
# fraction sqrt(abar) < 3.2e-4, and x_T, pure noise there, is taken as x at sigma_max.
MIN_ALPHAS_CUMPROD = 1e-7

# model_fn(x_t [B, ...], t [B] float32 timestep indices) -> model output [B, ...], or
# model_fn(x_t, t, cond) with a conditioning pytree of leading dimension B.
ModelFn = Callable[..., jax.Array]
# The model as the samplers call it, guidance applied: (x_t, t) -> output.
_Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


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


def first_timestep(method: str, num_steps: int, start_timestep: int,
                   timestep_spacing: str = 'leading') -> int:
  """The timestep at which `sample(..., start_timestep=...)` takes x_T to be.

  The ODE solvers start at `start_timestep` itself; 'ddpm' and 'ddim' at the
  largest timestep they visit, which 'leading' spacing puts below it.
  """
  if method not in ('ddpm', 'ddim'):
    return start_timestep
  num_steps = min(num_steps, start_timestep + 1)
  return int(sampling_timesteps(start_timestep + 1, num_steps, timestep_spacing)[-1])


def respaced_log_alphas(s: diffusion.Schedule, timesteps: np.ndarray) -> jax.Array:
  """log(1 - beta'_i) = log(abar[timesteps[i]] / abar[timesteps[i-1]]), [n].

  Taken as sums of log1p(-betas) over each window, so that small betas keep full
  float32 precision. Window i holds steps k with timesteps[i-1] < k <= timesteps[i];
  steps after the last visited one go to a discarded extra segment.
  """
  n = timesteps.shape[0]
  segment_ids = np.searchsorted(timesteps, np.arange(s.num_timesteps), side='left')
  return jax.ops.segment_sum(jnp.log1p(-s.betas), jnp.asarray(segment_ids),
                             num_segments=n + 1)[:n]


def respaced_posterior(s: diffusion.Schedule, timesteps: np.ndarray
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
  log_alpha_window = respaced_log_alphas(s, timesteps)  # [n]
  betas = -jnp.expm1(log_alpha_window)
  alphas = jnp.exp(log_alpha_window)
  one_minus_abar_all = -jnp.expm1(jnp.cumsum(jnp.log1p(-s.betas)))  # [T]
  abar_prev = jnp.concatenate([jnp.ones((1,)), s.alphas_cumprod[timesteps[:-1]]])
  one_minus_abar = one_minus_abar_all[timesteps]
  one_minus_abar_prev = jnp.concatenate(
      [jnp.zeros((1,)), one_minus_abar_all[timesteps[:-1]]])
  coef1 = betas * jnp.sqrt(abar_prev) / one_minus_abar
  coef2 = one_minus_abar_prev * jnp.sqrt(alphas) / one_minus_abar
  variance = betas * one_minus_abar_prev / one_minus_abar
  return coef1, coef2, variance


def check_ddpm_variance(ddpm_variance: str) -> None:
  """Raises ValueError naming the accepted values for an unknown `ddpm_variance`."""
  if ddpm_variance not in DDPM_VARIANCES:
    raise ValueError(f"unknown DDPM variance '{ddpm_variance}'; accepted: "
                     f"{', '.join(DDPM_VARIANCES)}")


def respaced_tables(s: diffusion.Schedule, timesteps: np.ndarray,
                    ddpm_variance: str = 'posterior') -> dict[str, jax.Array]:
  """Per-step tables of the reverse process over `timesteps` (ascending), [n] each.

  Step i goes from timesteps[i] to timesteps[i-1] (to x0 for i=0): `t`, `abar_prev`,
  the posterior `coef1`, `coef2` and `variance` (`respaced_posterior`), the step's
  `alpha` = abar[t_i] / abar[t_{i-1}] and `beta` = 1 - alpha, and `step_variance`,
  the noise variance of an ancestral DDPM step with `ddpm_variance`: the posterior
  variance, or beta (Ho et al. 2020) except on the last step, which adds no noise.
  """
  coef1, coef2, variance = respaced_posterior(s, timesteps)
  abar = s.alphas_cumprod[timesteps]
  log_alpha = respaced_log_alphas(s, timesteps)
  betas = -jnp.expm1(log_alpha)
  return {
      't': jnp.asarray(timesteps, jnp.int32),
      'abar_prev': jnp.concatenate([jnp.ones((1,)), abar[:-1]]),
      'coef1': coef1,
      'coef2': coef2,
      'variance': variance,
      'step_variance': variance if ddpm_variance == 'posterior' else betas.at[0].set(0.0),
      'alpha': jnp.exp(log_alpha),
      'beta': betas,
  }


def guided(model_fn: ModelFn, guidance_scale: float, cond: Any,
            null_cond: Any) -> _Denoiser:
  """model_fn as a function of (x_t, t) only, with classifier-free guidance.

  Ho & Salimans 2022: out = out_null + scale (out_cond - out_null), on the raw model
  output. Both branches come from one call on the batch [x, x] with [cond, null_cond],
  so that a network runs once per step. A scale of 1 evaluates the conditional
  branch only: the result is the conditional model exactly.
  """
  if guidance_scale == 1.0:
    if cond is None:
      return model_fn
    return lambda x, t: model_fn(x, t, cond)
  if cond is None or null_cond is None:
    raise ValueError(f'guidance_scale={guidance_scale} needs cond and null_cond (the '
                     'conditioning and its null value, e.g. labels and the null class)')
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)

  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)  # [2B, ...]
    out_cond, out_null = jnp.split(out, 2)
    return out_null + guidance_scale * (out_cond - out_null)

  return guided


def _denoise(model: _Denoiser, schedule: diffusion.Schedule, x: jax.Array, t: jax.Array, *,
             prediction_type: str, clip_denoised: bool) -> tuple[jax.Array, jax.Array]:
  """The (x0, eps) the model implies at x_t = x [B, ...], scalar timestep t.

  An integer t indexes the schedule; a float t is a fractional timestep.
  """
  t = jnp.full((x.shape[0],), t, t.dtype)  # [B]
  output = model(x, t.astype(jnp.float32))
  x0, eps = diffusion.model_output_to_x0_eps(schedule, x, t, output, prediction_type)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = diffusion.eps_from_x0(schedule, x, t, x0)
  return x0, eps


def _sample_ddpm_ddim(model: _Denoiser, schedule: diffusion.Schedule, x_T: jax.Array,
                      rng: jax.Array, *, method: str, num_steps: int, eta: jax.Array,
                      start_timestep: int, timestep_spacing: str, ddpm_variance: str,
                      **denoise_kwargs) -> jax.Array:
  """'ddpm' and 'ddim' over integer timesteps; see `sample`."""
  num_steps = min(num_steps, start_timestep + 1)
  timesteps = sampling_timesteps(start_timestep + 1, num_steps, timestep_spacing)
  xs = respaced_tables(schedule, timesteps, ddpm_variance if method == 'ddpm' else 'posterior')
  xs['rng'] = jax.random.split(rng, num_steps)
  xs = jax.tree.map(lambda a: a[::-1], xs)

  def step(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
    x0, eps = _denoise(model, schedule, x, p['t'], **denoise_kwargs)
    noise = jax.random.normal(p['rng'], x.shape, jnp.float32)
    if method == 'ddpm':
      mean = p['coef1'] * x0 + p['coef2'] * x
      x_prev = mean + jnp.sqrt(p['step_variance']) * noise
    else:  # ddim, Song et al. 2021, eq. 12 and 16
      # sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev) is
      # eta^2 times the respaced posterior variance.
      a_prev = p['abar_prev']
      sigma = eta * jnp.sqrt(p['variance'])
      direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
      x_prev = jnp.sqrt(a_prev) * x0 + direction + sigma * noise
    return x_prev.astype(jnp.float32), None

  x0, _ = jax.lax.scan(step, x_T, xs)
  return x0


def _log_sigmas(schedule: diffusion.Schedule) -> jax.Array:
  """log sigma_t = log sqrt((1 - abar_t) / abar_t), [T], strictly increasing.

  abar is floored at the smallest normal float32 so that a zero-terminal-SNR entry
  gives a large finite value instead of inf, which keeps the table interpolable.
  """
  abar = schedule.alphas_cumprod
  return 0.5 * (jnp.log1p(-abar) - jnp.log(jnp.maximum(abar, jnp.finfo(jnp.float32).tiny)))


def _ode_grid(schedule: diffusion.Schedule, num_steps: int, start_timestep: int,
              method: str) -> tuple[jax.Array, jax.Array]:
  """Noise levels of the ODE solvers, from the start down to t = 0.

  Returns:
    (log_sigma [n], t [n]): descending log sigma, with log sigma[0] that of
    max(abar[start_timestep], MIN_ALPHAS_CUMPROD) and log sigma[-1] that of t = 0,
    and the fractional timesteps where the schedule has these sigmas (the
    schedule's log-sigma table inverted by linear interpolation, the inverse of
    `diffusion.alphas_cumprod_at`).
  """
  log_sigmas = _log_sigmas(schedule)  # [T]
  log_sigma_cap = 0.5 * float(np.log1p(-MIN_ALPHAS_CUMPROD) - np.log(MIN_ALPHAS_CUMPROD))
  log_sigma_max = jnp.minimum(log_sigmas[start_timestep], log_sigma_cap)
  log_sigma_min = log_sigmas[0]
  ramp = jnp.asarray(np.linspace(0.0, 1.0, num_steps), jnp.float32)  # [n]
  if method == 'dpm_solver++':  # uniform in log-SNR = -2 log sigma
    log_sigma = (1.0 - ramp) * log_sigma_max + ramp * log_sigma_min
  else:  # Karras et al. 2022, eq. 5
    inv_rho = 1.0 / KARRAS_RHO
    root_max, root_min = jnp.exp(inv_rho * log_sigma_max), jnp.exp(inv_rho * log_sigma_min)
    log_sigma = KARRAS_RHO * jnp.log(root_max + ramp * (root_min - root_max))
    # Exact ends: the first is where x_T is, the last (for num_steps > 1) is t = 0.
    log_sigma = jnp.where(ramp == 0.0, log_sigma_max,
                          jnp.where(ramp == 1.0, log_sigma_min, log_sigma))
  t = jnp.interp(log_sigma, log_sigmas, jnp.arange(schedule.num_timesteps, dtype=jnp.float32))
  return log_sigma, t


def _sqrt_alphas_cumprod(log_sigma: jax.Array) -> jax.Array:
  """sqrt(abar) = 1 / sqrt(1 + sigma^2), from log sigma."""
  return jnp.exp(-0.5 * jax.nn.softplus(2.0 * log_sigma))


def _sample_ode(model: _Denoiser, schedule: diffusion.Schedule, x_T: jax.Array, *,
                method: str, num_steps: int, start_timestep: int,
                **denoise_kwargs) -> jax.Array:
  """'dpm_solver++', 'euler' and 'heun'; see `sample`.

  num_steps - 1 solver steps between the noise levels of `_ode_grid` (one scan), then
  the first-order step from t = 0 to sigma = 0, which is the x0 prediction at t = 0.
  """
  log_sigma, t = _ode_grid(schedule, num_steps, start_timestep, method)
  denoise = lambda x, t: _denoise(model, schedule, x, t, **denoise_kwargs)[0]
  sqrt_abar = _sqrt_alphas_cumprod(log_sigma)  # [n]
  if method == 'dpm_solver++':
    # Lu et al. 2022, Algorithm 2, on x in VP form with alpha = sqrt(abar),
    # sigma_vp = sqrt(1 - abar) and lambda = log(alpha / sigma_vp) = -log sigma.
    # With uniform steps h (ratio r = 1), D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}.
    log_sigma_vp = log_sigma + jnp.log(sqrt_abar)
    h = log_sigma[:-1] - log_sigma[1:]  # lambda_{i+1} - lambda_i
    xs = {
        't': t[:-1],
        'x_coef': jnp.exp(log_sigma_vp[1:] - log_sigma_vp[:-1]),  # sigma_{i+1} / sigma_i
        'd_coef': -sqrt_abar[1:] * jnp.expm1(-h),
        # First step first order (no previous x0 yet), then 1/(2r) = 1/2.
        'extrapolation': jnp.asarray(np.minimum(np.arange(num_steps - 1), 1) * 0.5,
                                     jnp.float32),
    }

    def step(carry, p):
      x, x0_prev = carry
      x0 = denoise(x, p['t'])
      d = x0 + p['extrapolation'] * (x0 - x0_prev)
      return (p['x_coef'] * x + p['d_coef'] * d, x0), None

    (x, _), _ = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), xs)
    return denoise(x, t[-1])

  # Karras et al. 2022, Algorithm 1 (deterministic): the ODE dx/dsigma = (x - D) / sigma
  # on x_ve = x / sqrt(abar); the model sees x_ve sqrt(abar) at the timestep of sigma.
  sigma = jnp.exp(log_sigma)
  xs = {'t': t[:-1], 't_next': t[1:], 'sigma': sigma[:-1], 'sigma_next': sigma[1:],
        'scale': sqrt_abar[:-1], 'scale_next': sqrt_abar[1:]}

  def step(x, p):
    d = (x - denoise(x * p['scale'], p['t'])) / p['sigma']
    x_next = x + (p['sigma_next'] - p['sigma']) * d
    if method == 'heun':
      d_next = (x_next - denoise(x_next * p['scale_next'], p['t_next'])) / p['sigma_next']
      x_next = x + (p['sigma_next'] - p['sigma']) * 0.5 * (d + d_next)
    return x_next, None

  x, _ = jax.lax.scan(step, x_T / sqrt_abar[0], xs)
  return denoise(x * sqrt_abar[-1], t[-1])


def sample(model_fn: ModelFn, schedule: diffusion.Schedule, shape: tuple[int, ...],
           rng: jax.Array, *, method: str = 'ddim', num_steps: int = 50,
           eta: float | jax.Array = 0.0, prediction_type: str = 'eps',
           guidance_scale: float = 1.0, x_T: jax.Array | None = None,
           clip_denoised: bool = False, timestep_spacing: str = 'leading',
           ddpm_variance: str = 'posterior', cond: Any = None, null_cond: Any = None,
           start_timestep: int | None = None) -> jax.Array:
  """Draws samples x0 by running the reverse process from noise.

  Args:
    model_fn: the denoiser, model_fn(x_t [B, ...], t [B] float32 timestep indices in
      [0, T-1]) -> output [B, ...] of the given prediction_type; called as
      model_fn(x_t, t, cond) when cond is given. The ODE solvers pass fractional t.
    schedule: the schedule the model was trained with.
    shape: [B, ...] shape of the samples.
    rng: PRNG key for the starting noise and the per-step noise.
    method: one of `SAMPLERS`.
    num_steps: number of steps, 1..T (see the module docstring for the number of
      model evaluations). With `start_timestep`, 'ddpm' and 'ddim' take at most
      start_timestep + 1.
    eta: DDIM noise scale (used by 'ddim' only); may be traced.
    prediction_type: one of `diffusion.PREDICTION_TYPES`.
    guidance_scale: classifier-free guidance scale (static); 1 evaluates the
      conditional model only, any other value needs cond and null_cond.
    x_T: optional [B, ...] starting point replacing the initial noise: x at
      t = T-1, or at start_timestep.
    clip_denoised: clip each x0 prediction to [-1, 1] (pixel-space data only).
    timestep_spacing: one of `TIMESTEP_SPACINGS` (for 'ddpm' and 'ddim'); see
      `sampling_timesteps`.
    ddpm_variance: one of `DDPM_VARIANCES` (for 'ddpm'): 'posterior', the posterior
      variance beta-tilde of the (respaced) process, or 'beta', its beta, the upper
      bound (Ho et al. 2020). The last step adds no noise with either.
    cond: optional conditioning pytree with leading dimension B (e.g. [B] int32
      labels), passed to model_fn.
    null_cond: the unconditional value of cond (e.g. the null-class labels), same
      structure; needed when guidance_scale != 1.
    start_timestep: start the reverse process at this timestep in [0, T-1] instead of
      T-1 (SDEdit / img2img: x_T is then x0 noised to it). The steps are spread over
      [0, start_timestep] as they would be over [0, T-1]; T-1 is the same as None.

  Returns:
    [B, ...] float32 samples.

  Raises:
    ValueError: for an unknown method, prediction type, spacing or DDPM variance, a
      bad num_steps or start_timestep, x_T of the wrong shape, or guidance without
      cond and null_cond.
  """
  if method not in SAMPLERS:
    raise ValueError(f"unknown sampler '{method}'; accepted: {', '.join(SAMPLERS)}")
  diffusion.check_prediction_type(prediction_type)
  if timestep_spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"unknown timestep spacing '{timestep_spacing}'; accepted: "
                     f"{', '.join(TIMESTEP_SPACINGS)}")
  check_ddpm_variance(ddpm_variance)
  num_timesteps = schedule.num_timesteps
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in 1..{num_timesteps} (the number of '
                     f'timesteps), got {num_steps}')
  if start_timestep is None:
    start_timestep = num_timesteps - 1
  elif not 0 <= start_timestep < num_timesteps:
    raise ValueError(f'start_timestep must be in 0..{num_timesteps - 1}, got '
                     f'{start_timestep}')
  model = guided(model_fn, guidance_scale, cond, null_cond)
  shape = tuple(shape)
  noise_rng, steps_rng = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(noise_rng, shape, jnp.float32)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f'x_T has shape {tuple(x_T.shape)}, expected {shape}')
  x_T = x_T.astype(jnp.float32)
  denoise_kwargs = dict(prediction_type=prediction_type, clip_denoised=clip_denoised)
  if method in ('ddpm', 'ddim'):
    return _sample_ddpm_ddim(
        model, schedule, x_T, steps_rng, method=method, num_steps=num_steps,
        eta=jnp.asarray(eta, jnp.float32), start_timestep=start_timestep,
        timestep_spacing=timestep_spacing, ddpm_variance=ddpm_variance, **denoise_kwargs)
  return _sample_ode(model, schedule, x_T, method=method, num_steps=num_steps,
                     start_timestep=start_timestep, **denoise_kwargs)
