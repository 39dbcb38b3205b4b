"""From noise to images: the jitted sample-and-decode function and image outputs."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from ldm_jax import builders, diffusion, input_pipeline, sampling, sharding
from ldm_jax import images as image_io
from ldm_jax.errors import UserError
from ldm_jax.models import conditioners


def model_and_conditions(unet: nn.Module, unet_params, labels: jax.Array | None,
                         conditions: dict[str, jax.Array] | None):
  """(model_fn, cond, null_cond) for `sampling.sample` with classifier-free guidance.

  The U-Net's labels (None when it has no class embedding) and, for a
  `ConditionedUNet`, its conditioner's output for `conditions`, computed once here
  rather than at every step; null_cond holds the null class and the null condition.
  """
  conditioned = isinstance(unet, conditioners.ConditionedUNet)
  if conditioned and conditions is None:
    raise ValueError('a conditioned U-Net needs conditions to sample from')
  cond, null_cond = {}, {}
  if labels is not None:
    cond['y'], null_cond['y'] = labels, jnp.full_like(labels, unet.num_classes)
  if conditioned:
    batch = jax.tree.leaves(conditions)[0].shape[0]
    encode = lambda drop: unet.apply({'params': unet_params}, conditions, drop,
                                     method=unet.encode)
    cond['encoded'] = encode(jnp.zeros((batch,), bool))
    null_cond['encoded'] = encode(jnp.ones((batch,), bool))
  if not cond:
    return (lambda x, t: unet.apply({'params': unet_params}, x, t)), None, None
  extra = lambda c: {'encoded': c['encoded']} if conditioned else {}
  model_fn = lambda x, t, c: unet.apply({'params': unet_params}, x, t, c.get('y'), **extra(c))
  return model_fn, cond, null_cond


def generate_images(unet_params, ae_params, scale_factor: jax.Array, labels: jax.Array,
                    rng: jax.Array, schedule: diffusion.Schedule,
                    conditions: dict[str, jax.Array] | None = None, *, unet: nn.Module,
                    autoencoder: nn.Module, sample_config: ml_collections.ConfigDict,
                    prediction_type: str, latent_shape: tuple[int, int, int],
                    class_conditional: bool) -> jax.Array:
  """Samples latents with the configured sampler and decodes them.

  Args:
    labels: [B] int32 class labels (ignored when not class-conditional).
    conditions: the conditioner's batch features, [B, ...] each (see
      `ldm_jax.conditioning`); needed by a `ConditionedUNet`, else ignored.
  Returns:
    [B, H, W, C] images in [-1, 1].
  """
  model_fn, cond, null_cond = model_and_conditions(
      unet, unet_params, labels if class_conditional else None, conditions)
  guided = cond is not None and sample_config.guidance_scale != 1.0
  latents = sampling.sample(
      model_fn, schedule, (labels.shape[0], *latent_shape), rng,
      method=sample_config.method, num_steps=sample_config.num_steps, eta=sample_config.eta,
      prediction_type=prediction_type, timestep_spacing=sample_config.timestep_spacing,
      ddpm_variance=sample_config.ddpm_variance,
      guidance_scale=sample_config.guidance_scale if guided else 1.0, cond=cond,
      null_cond=null_cond if guided else None)
  images = autoencoder.apply({'params': ae_params}, latents / scale_factor,
                             method=autoencoder.decode)
  return jnp.clip(images, -1.0, 1.0)


class Sampler:
  """Compiles `generate_images` once for a config and mesh; generates in batches."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, unet: nn.Module,
               autoencoder: nn.Module):
    num_devices = sharding.num_batch_shards(mesh)
    # Round up so every batch splits evenly over the devices.
    self.batch_size = -(-config.sample.batch_size // num_devices) * num_devices
    num_classes = self.num_classes = unet.num_classes  # 0 when unconditional.
    self.class_label = config.sample.class_label
    if num_classes and self.class_label >= num_classes:
      raise UserError(f'config.sample.class_label={self.class_label} is not a class of '
                      f'{config.data.name!r}; accepted: -1 or 0..{num_classes - 1}')
    self.seed = config.sample.seed
    self.schedule = builders.make_schedule(config)
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    self._mesh = mesh
    self._fn = jax.jit(
        functools.partial(generate_images, unet=unet, autoencoder=autoencoder,
                          sample_config=config.sample,
                          prediction_type=config.diffusion.prediction_type,
                          latent_shape=builders.latent_shape(config),
                          class_conditional=num_classes > 0),
        in_shardings=(replicated, replicated, replicated, data, replicated, replicated, data),
        out_shardings=data)

  def labels(self, num_samples: int) -> np.ndarray:
    """The class of each sample: `class_label`, or every class in turn, one grid row each."""
    if self.class_label >= 0 or not self.num_classes:
      return np.full((num_samples,), max(self.class_label, 0), np.int32)
    per_class = -(-num_samples // self.num_classes)
    return (np.arange(num_samples) // per_class).astype(np.int32)

  def generate(self, unet_params, ae_params, scale_factor, num_samples: int,
               conditions: dict[str, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """`num_samples` uint8 images [N, H, W, C] (on every host) and their labels.

    `conditions` are the conditioner's features of each sample, [num_samples, ...]
    each (for a `ConditionedUNet`).
    """
    labels = self.labels(num_samples)
    num_padded = -(-num_samples // self.batch_size) * self.batch_size
    # Padding repeats the first samples' inputs; their images are dropped.
    padded = jax.tree.map(lambda a: np.take(a, np.arange(num_padded) % num_samples, axis=0),
                          (labels, conditions))
    base_rng = jax.random.PRNGKey(self.seed)
    # Sampling runs the U-Net hundreds of times: gather FSDP-sharded weights once.
    unet_params, ae_params = sharding.gather((unet_params, ae_params), self._mesh)
    outputs = []
    for i in range(0, num_padded, self.batch_size):
      batch_labels, batch_conditions = jax.device_put(
          jax.tree.map(lambda a: a[i:i + self.batch_size], padded),
          sharding.data_sharding(self._mesh))
      images = self._fn(unet_params, ae_params, scale_factor, batch_labels,
                        jax.random.fold_in(base_rng, i // self.batch_size), self.schedule,
                        batch_conditions)
      outputs.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
    images = input_pipeline.postprocess(np.concatenate(outputs)[:num_samples])
    return images, (labels if self.num_classes else None)

  def grid(self, images: np.ndarray) -> np.ndarray:
    """Rows of one class each when sampling every class, else a square-ish grid."""
    if self.num_classes and self.class_label < 0:
      ncols = -(-len(images) // self.num_classes)
    else:
      ncols = math.ceil(math.sqrt(len(images)))
    return image_io.make_grid(images, ncols=min(ncols, len(images)))
