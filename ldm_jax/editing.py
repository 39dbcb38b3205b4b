"""Image editing with a trained latent diffusion model: inpainting and img2img.

Both edits work on latents (encoder mean x scale_factor) and reuse the trained
U-Net unchanged; no fine-tuning.

  inpaint: RePaint (Lugmayr et al. 2022). The reverse DDPM process fills the unknown
    region while the known region is re-drawn from q(x_{t-1} | x0 = known) at every
    step; "time travel" jumps (re-noise jump_length steps, denoise them again,
    jump_n_sample times) let the fill agree with the known region.
  img2img: SDEdit (Meng et al. 2022). The input latents are noised to an
    intermediate timestep set by `strength` and the reverse process runs from there.

`inpaint` and `img2img` are pure, jittable functions with the schedule as an argument:

  inpaint_fn = jax.jit(inpaint, static_argnames=INPAINT_STATIC_ARGNAMES)
  img2img_fn = jax.jit(img2img, static_argnames=IMG2IMG_STATIC_ARGNAMES)

`ldm_jax.modes.edit_mode` is the whole `--mode=edit` run (its jitted body is
`ldm_jax.generate.edit_images`): it reads `config.edit`:
  task: 'inpaint' or 'img2img'.
  input: the image to edit: PNG/JPEG, or .npz with key `images` or `image`, uint8
    [H, W, C] or [N, H, W, C] (the first is taken); data.image_size square.
  mask: inpaint only. PNG with white (255) = region TO FILL and black (0) = keep, as
    in most inpainting tools; or .npz key `mask` with 1 = fill, 0 = keep.
  strength: img2img only, in (0, 1]: the fraction of the diffusion that is redone.
  jump_length, jump_n_sample: inpaint only, RePaint's resampling schedule
    (jump_n_sample = 1: no jumps).
  num_samples: how many variations to draw.
  class_label: the class to condition on (guided with config.sample.guidance_scale);
    -1 = the null (unconditional) class.
A text-conditioned model edits towards `--prompt` (guided the same way); without
one it edits unconditionally (the empty caption).
and `config.sample`: inpaint always takes ancestral DDPM steps (num_steps,
timestep_spacing, ddpm_variance); img2img uses the configured sampler (method,
num_steps, eta, ...); both draw from config.sample.seed. It writes
WORKDIR/edits/<task>_<step>.png (input, masked input, variations) and
<task>_<step>.npz (`images`, `input`, and for inpaint `mask`, 1 = filled; all uint8).
Inpainted images get the input's known pixels pasted back after decoding.
"""
import io
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm_jax import diffusion, fileio, sampling
from ldm_jax.errors import UserError

TASKS = ('inpaint', 'img2img')
# Arguments of `inpaint` and of `img2img` that must be static under `jax.jit`.
INPAINT_STATIC_ARGNAMES = ('model_fn', 'num_steps', 'jump_length', 'jump_n_sample',
                           'prediction_type', 'timestep_spacing', 'ddpm_variance',
                           'guidance_scale')
IMG2IMG_STATIC_ARGNAMES = ('model_fn', 'strength', 'method', 'num_steps', 'prediction_type',
                           'timestep_spacing', 'ddpm_variance', 'guidance_scale')
# Shown where the masked input's fill region is (mid-gray in [-1, 1]).
MASKED_VALUE = 0.0


# ------------------------------------------------------------- inpainting ----


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> np.ndarray:
  """The sequence of states RePaint visits, as in the paper's `get_schedule_jump`.

  States are indices into the `num_steps` respaced timesteps: the run starts at
  num_steps - 1 (noise), each -1 is a denoising step, each +1 a re-noising step, and
  it ends at -1 (x0). Going down, at every state j = 0, L, 2L, ... below
  num_steps - L (L = jump_length) it jumps back up L states, jump_n_sample - 1 times.

  With m = len(range(0, num_steps - L, L)) jump points the sequence has
  num_steps + 1 + 2 m (jump_n_sample - 1) L states: num_steps + m (n - 1) L
  denoising steps (model calls) and m (n - 1) L re-noising steps.

  Args:
    num_steps: number of respaced timesteps, >= 1.
    jump_length: L, states per jump, >= 1.
    jump_n_sample: how often each stretch is sampled, >= 1 (1: no jumps).

  Returns:
    int32 [num_states] states, from num_steps - 1 down to -1.

  Raises:
    ValueError: for a non-positive argument.
  """
  for name, value in (('num_steps', num_steps), ('jump_length', jump_length),
                      ('jump_n_sample', jump_n_sample)):
    if value < 1:
      raise ValueError(f'{name} must be at least 1, got {value}')
  jumps_left = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  state = num_steps - 1
  states = [state]
  while state >= 0:
    state -= 1
    states.append(state)
    if jumps_left.get(state, 0) > 0:
      jumps_left[state] -= 1
      states.extend(range(state + 1, state + jump_length + 1))
      state += jump_length
  return np.asarray(states, np.int32)


def inpaint(model_fn: sampling.ModelFn, schedule: diffusion.Schedule, known: jax.Array,
            mask: jax.Array, rng: jax.Array, *, num_steps: int, jump_length: int = 10,
            jump_n_sample: int = 10, prediction_type: str = 'eps',
            timestep_spacing: str = 'leading', ddpm_variance: str = 'posterior',
            guidance_scale: float = 1.0, cond: Any = None,
            null_cond: Any = None) -> jax.Array:
  """Fills the unknown region of `known` with RePaint (Lugmayr et al. 2022).

  The reverse process is ancestral DDPM over `num_steps` respaced timesteps (the
  tables of `sampling`'s 'ddpm' method). After every denoising step
  x_t -> x_{t-1} the known region is replaced by q_sample(known, t-1, fresh noise);
  every re-noising step draws x_t ~ q(x_t | x_{t-1}) of the respaced process, on
  the whole image. The order of steps is `repaint_schedule`, and the loop is one
  `lax.scan` over it. The last step is to x0 (abar = 1), where the known region is
  `known` itself: the output equals `known` exactly wherever mask is 1.

  Args:
    model_fn: the denoiser, model_fn(x_t [B, ...], t [B] float32) -> output, or
      model_fn(x_t, t, cond) when cond is given (as for `sampling.sample`).
    schedule: the schedule the model was trained with.
    known: [B, ...] clean data (latents) whose known region is kept.
    mask: 1 = known (keep), 0 = fill; broadcastable to `known` (e.g. [B, h, w, 1]).
      Values above 0.5 count as known.
    rng: PRNG key.
    num_steps: number of respaced timesteps, 1..T.
    jump_length: RePaint's j: states per jump back.
    jump_n_sample: RePaint's r: how often each stretch is sampled (1: no jumps).
    prediction_type: one of `diffusion.PREDICTION_TYPES`.
    timestep_spacing: one of `sampling.TIMESTEP_SPACINGS`.
    ddpm_variance: one of `sampling.DDPM_VARIANCES`: the variance of the denoising
      steps, the posterior's or beta' (none on the last step either way).
    guidance_scale: classifier-free guidance scale (static); != 1 needs cond and
      null_cond.
    cond: optional conditioning with leading dimension B, passed to model_fn.
    null_cond: the unconditional value of cond, for guidance.

  Returns:
    [B, ...] float32: `known` on the known region, a fill elsewhere.

  Raises:
    ValueError: for a bad option, or a mask that does not broadcast to `known`.
  """
  diffusion.check_prediction_type(prediction_type)
  sampling.check_ddpm_variance(ddpm_variance)
  model = sampling.guided(model_fn, guidance_scale, cond, null_cond)
  try:
    keep = jnp.broadcast_to(mask, known.shape) > 0.5
  except ValueError as e:
    raise ValueError(f'mask of shape {tuple(mask.shape)} does not broadcast to known '
                     f'of shape {tuple(known.shape)}') from e
  shape = tuple(known.shape)
  known = known.astype(jnp.float32)
  timesteps = sampling.sampling_timesteps(schedule.num_timesteps, num_steps,
                                          timestep_spacing)  # [n] ascending
  states = repaint_schedule(num_steps, jump_length, jump_n_sample)
  # Transition states[i] -> states[i+1] uses the tables of respaced step k: a
  # denoising step k -> k-1, or a re-noising step k-1 -> k.
  step_index = np.maximum(states[:-1], states[1:])
  is_denoising = states[1:] < states[:-1]

  # Per respaced step k (timesteps[k] -> timesteps[k-1], the step before k=0 is x0).
  tables = sampling.respaced_tables(schedule, timesteps, ddpm_variance)
  xs = {name: table[step_index] for name, table in tables.items()}
  xs['denoise'] = jnp.asarray(is_denoising)
  init_rng, steps_rng = jax.random.split(rng)
  xs['rng'] = jax.random.split(steps_rng, len(step_index))
  batch_size = shape[0]

  def denoise(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    t = jnp.full((batch_size,), p['t'], jnp.int32)  # [B]
    output = model(x, t.astype(jnp.float32))
    x0, _ = diffusion.model_output_to_x0_eps(schedule, x, t, output, prediction_type)
    noise_rng, known_rng = jax.random.split(p['rng'])
    unknown_prev = (p['coef1'] * x0 + p['coef2'] * x
                    + jnp.sqrt(p['step_variance']) * jax.random.normal(noise_rng, shape))
    a_prev = p['abar_prev']
    known_prev = (jnp.sqrt(a_prev) * known
                  + jnp.sqrt(1.0 - a_prev) * jax.random.normal(known_rng, shape))
    return jnp.where(keep, known_prev, unknown_prev)

  def renoise(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    noise = jax.random.normal(p['rng'], shape)
    return jnp.sqrt(p['alpha']) * x + jnp.sqrt(p['beta']) * noise

  def step(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
    x = jax.lax.cond(p['denoise'], denoise, renoise, x, p)
    return x.astype(jnp.float32), None

  x_T = jax.random.normal(init_rng, shape, jnp.float32)
  x0, _ = jax.lax.scan(step, x_T, xs)
  return x0


# ----------------------------------------------------------------- img2img ----


def img2img_start_timestep(num_timesteps: int, strength: float) -> int:
  """SDEdit's starting timestep index round(strength T) - 1, clamped to [0, T-1]."""
  return min(max(round(strength * num_timesteps) - 1, 0), num_timesteps - 1)


def img2img(model_fn: sampling.ModelFn, schedule: diffusion.Schedule, latents: jax.Array,
            strength: float, rng: jax.Array, *, method: str = 'ddim', num_steps: int,
            eta: float | jax.Array = 0.0, prediction_type: str = 'eps',
            timestep_spacing: str = 'leading', ddpm_variance: str = 'posterior',
            guidance_scale: float = 1.0, cond: Any = None,
            null_cond: Any = None) -> jax.Array:
  """SDEdit (Meng et al. 2022): noise `latents` part of the way, then denoise.

  `sampling.sample` from t_start = `img2img_start_timestep` with
  max(1, round(num_steps strength)) steps, starting from x = q_sample(latents, t,
  noise) at the first timestep t it visits (`sampling.first_timestep`; below
  t_start with 'leading' spacing, as in diffusers).
  Strength near 0 returns (about) the input; strength 1 starts from (almost) pure
  noise, i.e. plain sampling.

  Args:
    model_fn: the denoiser, as for `sampling.sample`.
    schedule: the schedule the model was trained with.
    latents: [B, ...] clean data to edit.
    strength: in (0, 1]; static.
    rng: PRNG key.
    method: one of `sampling.SAMPLERS`.
    num_steps: steps a full (strength 1) run would take.
    eta: DDIM noise scale.
    prediction_type: one of `diffusion.PREDICTION_TYPES`.
    timestep_spacing: one of `sampling.TIMESTEP_SPACINGS`.
    ddpm_variance: one of `sampling.DDPM_VARIANCES`, for 'ddpm'.
    guidance_scale: classifier-free guidance scale (static).
    cond: optional conditioning passed to model_fn, as for `sampling.sample`.
    null_cond: the unconditional value of cond, for guidance.

  Returns:
    [B, ...] float32 edited latents.

  Raises:
    ValueError: for a strength outside (0, 1] or a bad sampler option.
  """
  if not 0.0 < strength <= 1.0:
    raise ValueError(f'strength must be in (0, 1], got {strength}')
  t_start = img2img_start_timestep(schedule.num_timesteps, strength)
  num_steps = max(1, round(num_steps * strength))
  noise_rng, sample_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
  t_first = sampling.first_timestep(method, num_steps, t_start, timestep_spacing)
  t = jnp.full((latents.shape[0],), t_first, jnp.int32)
  x_start = diffusion.q_sample(schedule, latents.astype(jnp.float32), t, noise)
  return sampling.sample(
      model_fn, schedule, tuple(latents.shape), sample_rng, method=method,
      num_steps=num_steps, eta=eta,
      prediction_type=prediction_type, timestep_spacing=timestep_spacing,
      ddpm_variance=ddpm_variance, guidance_scale=guidance_scale, cond=cond,
      null_cond=null_cond, x_T=x_start, start_timestep=t_start)


# ------------------------------------------------------------------ files ----


def _read_npz(path: str, keys: tuple[str, ...], what: str) -> np.ndarray:
  try:
    data = fileio.load_npz(path)
  except (*fileio.ERRORS, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f'cannot read {what} {path}: {type(e).__name__}; accepted: a NumPy '
                    f'.npz file') from e
  key = next((k for k in keys if k in data), None)
  if key is None:
    raise UserError(f'{what} {path} has keys {sorted(data)}; accepted: an .npz '
                    f'with key {" or ".join(repr(k) for k in keys)}')
  return np.asarray(data[key])


def _read_pil(path: str, mode: str, what: str) -> np.ndarray:
  try:
    with fileio.open(path, 'rb') as f, Image.open(io.BytesIO(f.read())) as image:
      return np.asarray(image.convert(mode))
  except (UnidentifiedImageError, *fileio.ERRORS) as e:
    raise UserError(f'cannot read {what} {path}: {type(e).__name__}; accepted: PNG, JPEG '
                    f'or .npz') from e


def _check_exists(path: str, what: str) -> None:
  if not path:
    raise UserError(f'no {what} given; accepted: a path to a PNG, JPEG or .npz file')
  if not fileio.isfile(path):
    raise UserError(f'{what} not found: {path}')


def _check_size(array: np.ndarray, path: str, image_size: int, what: str) -> None:
  height, width = array.shape[:2]
  if (height, width) != (image_size, image_size):
    raise UserError(f'{what} {path} is {height}x{width} but data.image_size is '
                    f'{image_size}; accepted: a {image_size}x{image_size} image (resize it '
                    f'first)')


def load_image(path: str, image_size: int, num_channels: int) -> np.ndarray:
  """Reads the image to edit, in the pipeline's format.

  Args:
    path: a PNG/JPEG (any Pillow mode; converted to gray or RGB as the pipeline does),
      or an .npz with key `images` or `image`: uint8 [H, W, C] or [N, H, W, C] (the
      first image is taken), C 1 or 3.
    image_size: data.image_size; the image must be that size (it is not resized).
    num_channels: data.num_channels, 1 or 3.

  Returns:
    float32 [image_size, image_size, num_channels] in [-1, 1].

  Raises:
    UserError: missing or unreadable file, wrong size, shape or dtype.
  """
  _check_exists(path, 'input image')
  if path.lower().endswith('.npz'):
    pixels = _read_npz(path, ('images', 'image'), 'input image')
    if pixels.ndim == 4:
      pixels = pixels[0]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3) or pixels.dtype != np.uint8:
      raise UserError(f'input image {path} holds {pixels.dtype} {list(pixels.shape)}; '
                      f'accepted: uint8 [H, W, C] or [N, H, W, C] with C = 1 or 3')
    if pixels.shape[-1] == 1 and num_channels == 3:
      pixels = np.repeat(pixels, 3, axis=-1)
    elif pixels.shape[-1] == 3 and num_channels == 1:
      # ITU-R 601 luma, as the input pipeline (tf.image.rgb_to_grayscale) and Pillow.
      luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
      pixels = np.round(luma)[..., None]
  else:
    pixels = _read_pil(path, 'L' if num_channels == 1 else 'RGB', 'input image')
    pixels = pixels.reshape(*pixels.shape[:2], num_channels)
  _check_size(pixels, path, image_size, 'input image')
  return (pixels.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def load_mask(path: str, image_size: int) -> np.ndarray:
  """Reads an inpainting mask and returns the KNOWN mask (1 = keep).

  In the file, as in most inpainting tools, white marks the region TO FILL: a PNG
  with 255 = fill and 0 = keep (any Pillow mode, read as gray), or an .npz with key
  `mask` ([H, W], [H, W, 1] or [N, H, W, 1], the first taken) with 1 = fill, 0 = keep.

  Args:
    path: the mask file.
    image_size: data.image_size; the mask must be that size.

  Returns:
    float32 [image_size, image_size, 1]: 1 = known (keep), 0 = fill.

  Raises:
    UserError: missing or unreadable file, wrong size or shape, values that are not
      binary, or nothing to fill.
  """
  _check_exists(path, 'mask')
  if path.lower().endswith('.npz'):
    values = _read_npz(path, ('mask',), 'mask')
    if values.ndim == 4:
      values = values[0]
    if values.ndim == 3 and values.shape[-1] == 1:
      values = values[..., 0]
    if values.ndim != 2:
      raise UserError(f'mask {path} has shape {list(values.shape)}; accepted: [H, W], '
                      f'[H, W, 1] or [N, H, W, 1]')
    fill_value = 1
  else:
    values = _read_pil(path, 'L', 'mask')
    fill_value = 255
  if not np.all((values == 0) | (values == fill_value)):
    raise UserError(f'mask {path} is not binary (values {_few_values(values)}); '
                    f'accepted: 0/255 PNG or 0/1 npz (white/1 = fill)')
  _check_size(values, path, image_size, 'mask')
  fill = values == fill_value
  if not fill.any():
    raise UserError(f'mask {path} marks no pixel to fill; accepted: white (255 in PNG, '
                    f'1 in npz) where the image is to be filled')
  return (~fill).astype(np.float32)[..., None]


def _few_values(values: np.ndarray) -> str:
  unique = np.unique(values)
  shown = ', '.join(str(v) for v in unique[:5])
  return shown + (', ...' if len(unique) > 5 else '')


def latent_known_mask(known: np.ndarray, factor: int) -> np.ndarray:
  """Pixel known-mask [H, W, 1] -> latent known-mask [H/f, W/f, 1].

  A latent cell is filled if any of its f x f pixels is (max-pooling of the fill
  mask), so the fill region only grows: known = 1 - maxpool(1 - known).
  """
  height, width = known.shape[:2]
  fill = 1.0 - known[..., 0]
  blocks = fill.reshape(height // factor, factor, width // factor, factor)
  return (1.0 - blocks.max(axis=(1, 3)))[..., None].astype(np.float32)


# -------------------------------------------------------------- edit mode ----


def validate_edit_config(config: ml_collections.ConfigDict, *,
                         class_labels: bool = True) -> None:
  """Raises `UserError` naming the first `config.edit` field that cannot work.

  `class_labels=False` is for models without them (a Stable Diffusion pipeline),
  whose `config.edit` has no `class_label`.
  """
  if 'edit' not in config:
    raise UserError('config has no `edit` section; accepted: a config with config.edit '
                    '(see configs/default.py)')
  edit = config.edit

  def check(field: str, ok: bool, accepted: str) -> None:
    if not ok:
      raise UserError(f'config.edit.{field}={edit[field]!r} is not valid; accepted: {accepted}')

  check('task', edit.task in TASKS, ', '.join(TASKS))
  check('input', isinstance(edit.input, str) and bool(edit.input),
        'a path to a PNG, JPEG or .npz image')
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  check('num_samples', is_int(edit.num_samples) and edit.num_samples > 0,
        'a positive integer')
  if class_labels:
    check('class_label', is_int(edit.class_label) and edit.class_label >= -1,
          '-1 (the null class) or a class index')
  if edit.task == 'inpaint':
    check('mask', isinstance(edit.mask, str) and bool(edit.mask),
          'a path to a PNG (255 = fill) or .npz (key mask, 1 = fill) for task=inpaint')
    for field in ('jump_length', 'jump_n_sample'):
      check(field, is_int(edit[field]) and edit[field] >= 1, 'an integer >= 1')
  else:
    strength = edit.strength
    is_number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
    check('strength', is_number and 0.0 < strength <= 1.0, 'a number in (0, 1]')
