"""From noise to images: the jitted sample-and-decode function and image outputs."""
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from ldm_jax import builders, diffusion, editing, input_pipeline, observe, sampling, sharding
from ldm_jax import images as image_io
from ldm_jax.errors import UserError
from ldm_jax.models import conditioners


def model_and_conditions(denoiser: nn.Module, params, labels: jax.Array | None,
                         conditions: dict[str, jax.Array] | None):
  """(model_fn, cond, null_cond) for `sampling.sample` with classifier-free guidance.

  The denoiser's labels (None when it has no class embedding) and, for a
  `ConditionedDenoiser`, its conditioner's output for `conditions`, computed once
  here rather than at every step; null_cond holds the null class and the null
  condition.
  """
  conditioned = isinstance(denoiser, conditioners.ConditionedDenoiser)
  if conditioned and conditions is None:
    raise ValueError('a conditioned denoiser needs conditions to sample from')
  apply = functools.partial(denoiser.apply, {'params': params})
  cond, null_cond = {}, {}
  if labels is not None:
    cond['y'], null_cond['y'] = labels, jnp.full_like(labels, denoiser.null_class)
  if conditioned:
    batch = jax.tree.leaves(conditions)[0].shape[0]
    encode = lambda drop: apply(conditions, drop, method=denoiser.encode)
    cond['encoded'] = encode(jnp.zeros((batch,), bool))
    null_cond['encoded'] = encode(jnp.ones((batch,), bool))
  if not cond:
    return (lambda x, t: apply(x, t)), None, None
  extra = lambda c: {'encoded': c['encoded']} if conditioned else {}
  model_fn = lambda x, t, c: apply(x, t, c.get('y'), **extra(c))
  return model_fn, cond, null_cond


def guidance_options(sample_config: ml_collections.ConfigDict, cond, null_cond, *,
                     guided: bool = True) -> dict:
  """`guidance_scale`, `cond` and `null_cond` of `sampling.sample` for these conditions:
  guided with `sample_config.guidance_scale` when `guided`, conditional and not 1."""
  guided = guided and cond is not None and sample_config.guidance_scale != 1.0
  return dict(guidance_scale=sample_config.guidance_scale if guided else 1.0, cond=cond,
              null_cond=null_cond if guided else None)


def generate_images(params, ae_params, scale_factor: jax.Array, labels: jax.Array,
                    rng: jax.Array, schedule: diffusion.Schedule,
                    conditions: dict[str, jax.Array] | None = None, *, denoiser: nn.Module,
                    autoencoder: nn.Module, sample_config: ml_collections.ConfigDict,
                    prediction_type: str, latent_shape: tuple[int, int, int],
                    on_step: Callable[[jax.Array], None] | None = None) -> jax.Array:
  """Samples latents with the configured sampler and decodes them.

  Args:
    params: the denoiser's parameters.
    labels: [B] int32 class labels (ignored when the denoiser has no classes).
    conditions: the conditioner's batch features, [B, ...] each (see
      `ldm_jax.conditioning`); needed by a `ConditionedDenoiser`, else ignored.
    on_step: called on the host with the timestep of every model evaluation (progress).
  Returns:
    [B, H, W, C] images in [-1, 1].
  """
  model_fn, cond, null_cond = model_and_conditions(
      denoiser, params, labels if denoiser.num_classes else None, conditions)
  if on_step is not None:
    model_fn = _reporting_steps(model_fn, on_step)
  latents = sampling.sample(
      model_fn, schedule, (labels.shape[0], *latent_shape), rng,
      method=sample_config.method, num_steps=sample_config.num_steps, eta=sample_config.eta,
      prediction_type=prediction_type, timestep_spacing=sample_config.timestep_spacing,
      ddpm_variance=sample_config.ddpm_variance,
      **guidance_options(sample_config, cond, null_cond))
  images = autoencoder.apply({'params': ae_params}, latents / scale_factor,
                             method=autoencoder.decode)
  return jnp.clip(images, -1.0, 1.0)


def edit_images(params, ae_params, scale_factor: jax.Array, image: jax.Array,
                known_pixels: jax.Array, known_latents: jax.Array, rng: jax.Array,
                schedule: diffusion.Schedule, labels: jax.Array | None,
                conditions: dict[str, jax.Array] | None, *, denoiser: nn.Module,
                autoencoder: nn.Module, edit_config: ml_collections.ConfigDict,
                sample_config: ml_collections.ConfigDict, prediction_type: str,
                batch_size: int, guided: bool, batch_sharding=None) -> jax.Array:
  """Encodes `image`, edits its latents `batch_size` times (`ldm_jax.editing`) and decodes.

  Args:
    image: [H, W, C] in [-1, 1].
    known_pixels: [H, W, 1], 1 = keep (inpaint; ignored by img2img).
    known_latents: [h, w, 1], the latent known-mask (inpaint; ignored by img2img).
    labels: [batch_size] class labels (the null class for none), or None for a
      denoiser without classes.
    conditions: the conditioner's features, [batch_size, ...] each (a prompt's
      tokens), or None.
    guided: classifier-free guidance with `sample_config.guidance_scale` (a class
      or a prompt was asked for).

  Returns:
    [batch_size, H, W, C] images in [-1, 1]; for inpaint the known pixels are the
    input's: the latent known region is exact, but decoding reproduces it only up to
    the autoencoder's reconstruction error, so the input pixels are pasted back.
  """
  mean, _ = autoencoder.apply({'params': ae_params}, image[None], method=autoencoder.encode)
  latents = jnp.broadcast_to(mean * scale_factor, (batch_size, *mean.shape[1:]))
  if batch_sharding is not None:
    latents = jax.lax.with_sharding_constraint(latents, batch_sharding)
  model_fn, cond, null_cond = model_and_conditions(denoiser, params, labels, conditions)
  guidance = guidance_options(sample_config, cond, null_cond, guided=guided)
  options = dict(num_steps=sample_config.num_steps, prediction_type=prediction_type,
                 timestep_spacing=sample_config.timestep_spacing,
                 ddpm_variance=sample_config.ddpm_variance, **guidance)
  if edit_config.task == 'inpaint':
    mask = jnp.broadcast_to(known_latents[None], (batch_size, *known_latents.shape))
    edited = editing.inpaint(model_fn, schedule, latents, mask, rng,
                             jump_length=edit_config.jump_length,
                             jump_n_sample=edit_config.jump_n_sample, **options)
  else:
    edited = editing.img2img(model_fn, schedule, latents, float(edit_config.strength), rng,
                             method=sample_config.method, eta=sample_config.eta, **options)
  images = autoencoder.apply({'params': ae_params}, edited / scale_factor,
                             method=autoencoder.decode)
  images = jnp.clip(images, -1.0, 1.0)
  if edit_config.task == 'inpaint':
    images = jnp.where(known_pixels[None] > 0.5, image[None], images)
  return images


def _reporting_steps(model_fn: Callable, on_step: Callable[[jax.Array], None]) -> Callable:
  """`model_fn` that also sends each evaluation's timestep to `on_step` on the host."""

  def fn(x, t, *args):
    jax.debug.callback(on_step, jnp.ravel(t)[0])
    return model_fn(x, t, *args)
  return fn


class Sampler:
  """Compiles `generate_images` once for a config and mesh; generates in batches."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, denoiser: nn.Module,
               autoencoder: nn.Module):
    num_devices = sharding.num_batch_shards(mesh)
    # Round up so every batch splits evenly over the devices.
    self.batch_size = -(-config.sample.batch_size // num_devices) * num_devices
    num_classes = self.num_classes = denoiser.num_classes  # 0 without class labels.
    self.class_label = config.sample.class_label
    if num_classes and self.class_label >= num_classes:
      raise UserError(f'config.sample.class_label={self.class_label} is not a class of '
                      f'{config.data.name!r}; accepted: -1 or 0..{num_classes - 1}')
    self.seed = config.sample.seed
    self.schedule = builders.make_schedule(config)
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    self._mesh = mesh
    # Per-step progress only when asked for (config.sample.step_progress): its host
    # callback keeps the sampler out of the persistent compilation cache.
    self._steps = (observe.StepProgress(config.sample.num_steps)
                   if config.sample.step_progress else None)
    self._fn = jax.jit(
        functools.partial(generate_images, denoiser=denoiser, autoencoder=autoencoder,
                          sample_config=config.sample,
                          prediction_type=config.diffusion.prediction_type,
                          latent_shape=builders.latent_shape(config),
                          on_step=self._steps.tick if self._steps else None),
        in_shardings=(replicated, replicated, replicated, data, replicated, replicated, data),
        out_shardings=data)
    # Wall seconds per image of the last `generate` (sampling and decoding): the median
    # over its batches, leaving out the first (compilation) when there are others.
    self.seconds_per_image = float('nan')

  def labels(self, num_samples: int) -> np.ndarray:
    """The class of each sample: `class_label`, or every class in turn, one grid row each."""
    if self.class_label >= 0 or not self.num_classes:
      return np.full((num_samples,), max(self.class_label, 0), np.int32)
    per_class = -(-num_samples // self.num_classes)
    return (np.arange(num_samples) // per_class).astype(np.int32)

  def generate(self, params, ae_params, scale_factor, num_samples: int,
               conditions: dict[str, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """`num_samples` uint8 images [N, H, W, C] (on every host) and their labels.

    `conditions` are the conditioner's features of each sample, [num_samples, ...]
    each (for a `ConditionedDenoiser`).
    """
    labels = self.labels(num_samples)
    num_padded = -(-num_samples // self.batch_size) * self.batch_size
    # Padding repeats the first samples' inputs; their images are dropped.
    padded = jax.tree.map(lambda a: np.take(a, np.arange(num_padded) % num_samples, axis=0),
                          (labels, conditions))
    base_rng = jax.random.PRNGKey(self.seed)
    # Sampling runs the denoiser hundreds of times: gather FSDP-sharded weights once.
    params, ae_params = sharding.gather((params, ae_params), self._mesh)
    outputs, seconds = [], []
    for i in observe.progress(range(0, num_padded, self.batch_size), desc='sampling'):
      start = time.perf_counter()
      batch_labels, batch_conditions = jax.device_put(
          jax.tree.map(lambda a: a[i:i + self.batch_size], padded),
          sharding.data_sharding(self._mesh))
      if self._steps:
        self._steps.start()
      images = self._fn(params, ae_params, scale_factor, batch_labels,
                        jax.random.fold_in(base_rng, i // self.batch_size), self.schedule,
                        batch_conditions)
      outputs.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
      if self._steps:
        self._steps.close()
      seconds.append(time.perf_counter() - start)
    self.seconds_per_image = float(np.median(seconds[1:] or seconds)) / self.batch_size
    images = input_pipeline.postprocess(np.concatenate(outputs)[:num_samples])
    return images, (labels if self.num_classes else None)

  def grid(self, images: np.ndarray) -> np.ndarray:
    """Rows of one class each when sampling every class, else a square-ish grid."""
    if self.num_classes and self.class_label < 0:
      ncols = -(-len(images) // self.num_classes)
    else:
      ncols = math.ceil(math.sqrt(len(images)))
    return image_io.make_grid(images, ncols=min(ncols, len(images)))
