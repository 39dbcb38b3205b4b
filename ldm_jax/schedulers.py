"""Diffusers scheduler configs, and samplers that follow diffusers' pipelines step for step.

A Stable Diffusion folder's `scheduler/scheduler_config.json` fixes the training
schedule (`beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps`), the
prediction type and how inference timesteps are placed (`timestep_spacing`,
`steps_offset`); DDIM also reads `set_alpha_to_one` (the "previous" abar of its
last step: 1, or abar_0 as in SD) and `clip_sample`. `from_diffusers` reads those
into a `SchedulerConfig`; `sample` then runs one of three solvers with exactly the
timesteps, noise levels and updates of the diffusers scheduler of that name built
`from_config` on the same file:

  'ddim'          DDIMScheduler (eta = 0)
  'dpm_solver++'  DPMSolverMultistepScheduler (2M, midpoint, first-order first and
                  last steps, final sigma 0)
  'euler'         EulerDiscreteScheduler (linear sigma interpolation, no churn)

ldm_jax's own samplers (`sampling.sample`) place their steps differently (e.g.
DDIM's last step to abar = 1, Karras sigmas for Euler); these exist to reproduce a
diffusers pipeline. Every loop is one `jax.lax.scan` over per-step coefficients
computed here in numpy, as diffusers computes them (float32 schedule).
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError

METHODS = ('ddim', 'dpm_solver++', 'euler')
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
SPACINGS = ('leading', 'trailing', 'linspace')
# diffusers' prediction type -> ldm_jax's.
PREDICTION_NAMES = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}
# The timestep_spacing default of each scheduler class (for files that omit it).
_LINSPACE_CLASSES = frozenset({'DPMSolverMultistepScheduler', 'EulerDiscreteScheduler',
                               'EulerAncestralDiscreteScheduler', 'LMSDiscreteScheduler',
                               'HeunDiscreteScheduler', 'KDPM2DiscreteScheduler',
                               'DPMSolverSinglestepScheduler', 'UniPCMultistepScheduler'})
# Options whose other values change the math in ways these samplers do not follow.
_FIXED = dict(thresholding=(False, None), rescale_betas_zero_snr=(False, None),
              use_karras_sigmas=(False, None), use_exponential_sigmas=(False, None),
              use_beta_sigmas=(False, None), use_lu_lambdas=(False, None),
              use_flow_sigmas=(False, None), trained_betas=(None,),
              variance_type=(None, 'fixed_small'), interpolation_type=('linear', None),
              timestep_type=('discrete', None), final_sigmas_type=('zero', None),
              algorithm_type=('dpmsolver++', None), solver_order=(2, None),
              solver_type=('midpoint', None), euler_at_final=(False, None))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """What diffusers' schedulers read from scheduler_config.json (see the module doc)."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = 'scaled_linear'
  prediction_type: str = 'epsilon'
  timestep_spacing: str = 'leading'
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  clip_sample: bool = False
  clip_sample_range: float = 1.0


def from_diffusers(config: Mapping[str, Any], source: str = 'scheduler_config.json'
                   ) -> SchedulerConfig:
  """Reads a diffusers scheduler config (any class; the shared schedule fields).

  Raises:
    UserError: naming the first key whose value these samplers cannot follow.
  """
  for key, accepted in _FIXED.items():
    if key in config and config[key] not in accepted:
      raise UserError(f'{source}: {key}={config[key]!r} is not supported; accepted: '
                      f'{", ".join(repr(a) for a in accepted if a is not None)}')
  class_name = config.get('_class_name', 'DDIMScheduler')
  spacing = 'linspace' if class_name in _LINSPACE_CLASSES else 'leading'
  c = SchedulerConfig(
      num_train_timesteps=int(config.get('num_train_timesteps', 1000)),
      beta_start=float(config.get('beta_start', 0.0001)),
      beta_end=float(config.get('beta_end', 0.02)),
      beta_schedule=config.get('beta_schedule', 'linear'),
      prediction_type=config.get('prediction_type', 'epsilon'),
      timestep_spacing=config.get('timestep_spacing') or spacing,
      steps_offset=int(config.get('steps_offset', 0)),
      set_alpha_to_one=bool(config.get('set_alpha_to_one', class_name != 'PNDMScheduler')),
      clip_sample=bool(config.get('clip_sample', class_name == 'DDIMScheduler')),
      clip_sample_range=float(config.get('clip_sample_range', 1.0)))
  for key, accepted in (('beta_schedule', BETA_SCHEDULES), ('prediction_type', PREDICTION_TYPES),
                        ('timestep_spacing', SPACINGS)):
    if getattr(c, key) not in accepted:
      raise UserError(f'{source}: {key}={getattr(c, key)!r} is not supported; accepted: '
                      f'{", ".join(accepted)}')
  return c


def alphas_cumprod(c: SchedulerConfig) -> np.ndarray:
  """abar_t, t = 0..T-1, float32 as diffusers computes it."""
  t = c.num_train_timesteps
  if c.beta_schedule == 'linear':
    betas = np.linspace(c.beta_start, c.beta_end, t, dtype=np.float32)
  elif c.beta_schedule == 'scaled_linear':
    betas = np.linspace(c.beta_start**0.5, c.beta_end**0.5, t, dtype=np.float32) ** 2
  else:  # squaredcos_cap_v2, diffusers' betas_for_alpha_bar
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(t, dtype=np.float64)
    betas = np.minimum(1 - f((i + 1) / t) / f(i / t), 0.999).astype(np.float32)
  return np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)


def timesteps(c: SchedulerConfig, method: str, num_steps: int) -> np.ndarray:
  """The descending timesteps diffusers' scheduler for `method` visits ([num_steps])."""
  if method not in METHODS:
    raise UserError(f'method {method!r} is not supported for Stable Diffusion pipelines; '
                    f'accepted: {", ".join(METHODS)}')
  T = c.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise UserError(f'num_steps={num_steps} is out of range; accepted: 1..{T}')
  spacing = c.timestep_spacing
  if method == 'dpm_solver++':  # It spaces num_steps + 1 points and drops the last.
    if spacing == 'linspace':
      return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == 'leading':
      ratio = T // (num_steps + 1)
      return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
    return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1
  if spacing == 'linspace':
    steps = np.linspace(0, T - 1, num_steps)
    steps = steps[::-1] if method == 'euler' else steps.round()[::-1]
  elif spacing == 'leading':
    steps = (np.arange(num_steps) * (T // num_steps)).round()[::-1] + c.steps_offset
  else:
    steps = np.arange(T, 0, -T / num_steps).round() - 1
  return steps.astype(np.float32 if method == 'euler' else np.int64).copy()


def init_noise_sigma(c: SchedulerConfig, method: str, num_steps: int) -> float:
  """The factor diffusers' pipeline puts on the initial noise (1 but for Euler)."""
  if method != 'euler':
    return 1.0
  sigma_max = float(_euler_sigmas(c, num_steps).max())
  return sigma_max if c.timestep_spacing in ('linspace', 'trailing') else (sigma_max**2 + 1) ** 0.5


def _sigmas(abar: np.ndarray) -> np.ndarray:
  return ((1 - abar) / abar) ** 0.5  # float32 in, float32 out, as in diffusers


def _euler_sigmas(c: SchedulerConfig, num_steps: int) -> np.ndarray:
  steps = timesteps(c, 'euler', num_steps)
  sigmas = np.interp(steps, np.arange(c.num_train_timesteps), _sigmas(alphas_cumprod(c)))
  return np.concatenate([sigmas, [0.0]]).astype(np.float32)


# model_fn(x [B, ...], t [] float32 timestep) -> model output [B, ...].
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _x0_coefficients(c: SchedulerConfig, a: np.ndarray, s: np.ndarray):
  """x0 = p x + q out for a model output at alpha = a, sigma = s (a**2 + s**2 = 1)."""
  if c.prediction_type == 'epsilon':
    return 1 / a, -s / a
  if c.prediction_type == 'v_prediction':
    return a, -s
  return np.zeros_like(a), np.ones_like(a)


def plan(c: SchedulerConfig, method: str, num_steps: int) -> dict[str, np.ndarray]:
  """Per-step coefficients [num_steps] float32 of diffusers' scheduler `method`.

  Every supported scheduler is a linear multistep update of the state x, the model
  output `out` at the scaled input `input_scale * x`, and the previous step's x0:

    x0   = x0_x * x + x0_out * out            (clipped for DDIM with clip_sample)
    eps  = eps_x * x + eps_out * out
    next = next_x * x + next_x0 * x0 + next_eps * eps + next_prev_x0 * x0_prev

  DDIM: next = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps. Euler (sigma-space
  state): next = (sigma'/sigma) x + (1 - sigma'/sigma) x0. DPM-Solver++(2M) (the
  midpoint form, D1 = (m - m_prev) h / h_prev): next = (s'/s) x - a' (e^-h - 1)
  (x0 + D1 / 2), first order at the first and last steps.
  """
  steps = timesteps(c, method, num_steps)
  abar = alphas_cumprod(c).astype(np.float64)
  n = len(steps)
  zeros, ones = np.zeros(n), np.ones(n)
  out = dict(t=steps.astype(np.float64), input_scale=ones, eps_x=zeros, eps_out=zeros,
             next_eps=zeros, next_prev_x0=zeros)
  if method == 'ddim':
    prev = steps - c.num_train_timesteps // num_steps
    final = 1.0 if c.set_alpha_to_one else abar[0]
    a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
    a, s = np.sqrt(abar[steps]), np.sqrt(1 - abar[steps])
    out['x0_x'], out['x0_out'] = _x0_coefficients(c, a, s)
    if c.prediction_type == 'epsilon':
      out['eps_x'], out['eps_out'] = zeros, ones
    elif c.prediction_type == 'v_prediction':
      out['eps_x'], out['eps_out'] = s, a
    else:
      out['eps_x'], out['eps_out'] = 1 / s, -a / s
    out.update(next_x=zeros, next_x0=np.sqrt(a_prev), next_eps=np.sqrt(1 - a_prev))
  elif method == 'euler':
    sigmas = _euler_sigmas(c, num_steps).astype(np.float64)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    out['input_scale'] = 1 / np.sqrt(sigma**2 + 1)
    if c.prediction_type == 'epsilon':
      out['x0_x'], out['x0_out'] = ones, -sigma
    elif c.prediction_type == 'v_prediction':
      out['x0_x'], out['x0_out'] = 1 / (sigma**2 + 1), -sigma / np.sqrt(sigma**2 + 1)
    else:
      out['x0_x'], out['x0_out'] = zeros, ones
    out.update(next_x=sigma_next / sigma, next_x0=1 - sigma_next / sigma)
  else:  # dpm_solver++: sigmas at the timesteps, then 0.
    sigmas = np.interp(steps, np.arange(c.num_train_timesteps), _sigmas(alphas_cumprod(c)))
    sigmas = np.concatenate([sigmas, [0.0]])
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sigma_vp = sigmas * alpha
    with np.errstate(divide='ignore'):
      lam = np.log(alpha) - np.log(sigma_vp)  # +inf at the final sigma 0
    i = np.arange(n)
    h = lam[i + 1] - lam[i]
    h_prev = np.where(i > 0, lam[i] - lam[np.maximum(i - 1, 0)], 1.0)
    second = (i > 0) & (i < n - 1)  # first order at the first and the last (sigma 0) step
    with np.errstate(invalid='ignore'):
      half_d1 = np.where(second, 0.5 * h / h_prev, 0.0)
      decay = np.where(np.isfinite(h), np.expm1(-h), -1.0)  # e^-h - 1
    out['x0_x'], out['x0_out'] = _x0_coefficients(c, alpha[i], sigma_vp[i])
    out.update(next_x=sigma_vp[i + 1] / sigma_vp[i], next_x0=-alpha[i + 1] * decay * (1 + half_d1),
               next_prev_x0=alpha[i + 1] * decay * half_d1)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def run(model_fn: ModelFn, coefficients: Mapping[str, jax.Array], x: jax.Array, *,
        clip_range: float | None = None) -> jax.Array:
  """The sampling loop of `plan`'s coefficients from the scaled initial state x (a scan).

  Args:
    model_fn: the (guided) denoiser.
    coefficients: `plan(...)` (numpy or traced arrays).
    x: [B, ...] initial latents times `init_noise_sigma`.
    clip_range: clip x0 to [-clip_range, clip_range] (DDIM's clip_sample); None: no clip.

  Returns:
    The final latents (the last x0 estimate).
  """

  def step(carry, k):
    x, x0_prev = carry
    out = model_fn(k['input_scale'] * x, k['t'])
    x0 = k['x0_x'] * x + k['x0_out'] * out
    if clip_range is not None:
      x0 = jnp.clip(x0, -clip_range, clip_range)
    eps = k['eps_x'] * x + k['eps_out'] * out
    x = k['next_x'] * x + k['next_x0'] * x0 + k['next_eps'] * eps + k['next_prev_x0'] * x0_prev
    return (x, x0), None

  coefficients = {k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()}
  x = jnp.asarray(x, jnp.float32)
  return jax.lax.scan(step, (x, jnp.zeros_like(x)), coefficients)[0][0]


def clip_range(c: SchedulerConfig, method: str) -> float | None:
  """DDIM's x0 clipping bound, or None."""
  return c.clip_sample_range if method == 'ddim' and c.clip_sample else None


def sample(model_fn: ModelFn, c: SchedulerConfig, noise: jax.Array, *, method: str,
           num_steps: int) -> jax.Array:
  """Runs diffusers' sampling loop for `method` from `noise` (as a pipeline takes it).

  Args:
    model_fn: the (guided) denoiser.
    c: the scheduler config.
    noise: [B, ...] the initial latents before the scheduler's `init_noise_sigma`.
    method: one of `METHODS`.
    num_steps: inference steps (model evaluations).

  Returns:
    The final latents [B, ...] (the x0 estimate), float32.
  """
  x = jnp.asarray(noise, jnp.float32) * init_noise_sigma(c, method, num_steps)
  return run(model_fn, plan(c, method, num_steps), x, clip_range=clip_range(c, method))
