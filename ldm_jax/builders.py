"""Config -> objects: models, latent shape, noise schedule, number of classes.

Models never read the config; these functions pick the fields they need and pass
them as keyword arguments (plus values derived from data, like channel counts).
"""
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from ldm_jax import conditioning, diffusion, input_pipeline, models, pretrained
from ldm_jax.models import conditioners
from ldm_jax.errors import UserError

# Activation / matmul dtypes a stage may compute in; parameters stay float32.
COMPUTE_DTYPES = ('float32', 'bfloat16')


def build_autoencoder(config: ml_collections.ConfigDict) -> nn.Module:
  """The stage-1 model named by `config.autoencoder.model`, or the pretrained one's."""
  if config.autoencoder.pretrained:
    model, in_channels = pretrained.autoencoder_module(config.autoencoder.pretrained)
    if in_channels != config.data.num_channels:
      raise UserError(f'config.data.num_channels={config.data.num_channels} but the pretrained '
                      f'autoencoder takes {in_channels}; accepted: {in_channels}')
    return model
  if config.autoencoder.model.name == 'identity':
    # Pixel-space diffusion: no autoencoder, so the other model fields do not apply.
    return models.IdentityFirstStage(out_channels=config.data.num_channels)
  return _build('autoencoder', config.autoencoder.model,
                out_channels=config.data.num_channels,
                dtype=jnp.dtype(config.autoencoder.compute_dtype))


def build_denoiser(config: ml_collections.ConfigDict, num_labels: int | None = None) -> nn.Module:
  """The stage-2 model: the backbone of `config.diffusion.model` (a `models.DENOISERS`
  entry), wrapped with its conditioner as one `ConditionedDenoiser` when
  `config.diffusion.conditioning.name` names a conditioner module.

  With `config.diffusion.init_from` the denoiser is the diffusers U-Net its
  config.json describes (`config.diffusion.model` is not used); it must fit the
  latents and labels. `num_labels` overrides the dataset's label count of a
  class-conditional denoiser (e.g. to benchmark without the dataset).
  """
  classes = num_classes(config) if num_labels is None else num_labels
  if config.diffusion.init_from:
    return _pretrained_unet(config, classes)
  denoiser = _build('diffusion', config.diffusion.model,
                    out_channels=latent_shape(config)[-1],
                    num_classes=classes, dtype=jnp.dtype(config.diffusion.compute_dtype))
  conditioner = conditioning.build_module(config, latent_shape(config)[:2])
  if conditioner is None:
    return denoiser
  return conditioners.ConditionedDenoiser(denoiser, conditioner)


def _pretrained_unet(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  path = config.diffusion.init_from
  model, in_channels = pretrained.unet_module(path)
  channels = latent_shape(config)[-1]
  if (in_channels, model.out_channels) != (channels, channels):
    raise UserError(f'config.diffusion.init_from={path!r} maps {in_channels} to '
                    f'{model.out_channels} channels; accepted: a U-Net on the {channels}-channel '
                    f'latents of the autoencoder')
  if model.num_classes != num_classes:
    raise UserError(f'config.diffusion.init_from={path!r} has {model.num_classes} classes but '
                    f'the run needs {num_classes} (config.diffusion.conditioning.name='
                    f'{config.diffusion.conditioning.name!r}); accepted: a U-Net with '
                    f'{num_classes} classes')
  return model


def _build(stage: str, model_config: ml_collections.ConfigDict, **derived) -> nn.Module:
  kwargs = {k: v for k, v in model_config.items() if k != 'name'}
  try:
    return models.get_model(model_config.name, **kwargs, **derived)
  except ValueError as e:
    raise UserError(f'config.{stage}.model: {e}') from e


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[h, w, c] of the latents for the configured image size and autoencoder."""
  size = config.data.image_size // downsample_factor(config)
  return size, size, build_autoencoder(config).diffusion_channels


def downsample_factor(config: ml_collections.ConfigDict) -> int:
  """Spatial factor between images and latents of the configured (or pretrained) autoencoder."""
  return build_autoencoder(config).downsample_factor


def make_schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
  """The noise schedule; beta_start/beta_end of 0 keep the schedule's own defaults."""
  c = config.diffusion
  schedule = diffusion.make_schedule(c.schedule, c.num_timesteps, beta_start=c.beta_start or None,
                                     beta_end=c.beta_end or None)
  if c.rescale_zero_terminal_snr:
    schedule = diffusion.rescale_zero_terminal_snr(schedule)
  return schedule


def num_classes(config: ml_collections.ConfigDict) -> int:
  """Label count of a class-conditional denoiser (`conditioning.name='class'`), else 0."""
  if not conditioning.spec(config).denoiser_labels:
    return 0
  count = input_pipeline.dataset_info(config.data).num_classes
  if not count:
    raise UserError(f'config.diffusion.conditioning.name=class but dataset '
                    f'{config.data.name!r} has no labels; accepted: another conditioning.name '
                    f'for this dataset')
  return count
