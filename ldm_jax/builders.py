"""Config -> objects: models, latent shape, noise schedule, number of classes.

Models never read the config; these functions pick the fields they need and pass
them as keyword arguments (plus values derived from data, like channel counts).
"""
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from ldm_jax import diffusion, input_pipeline, models, pretrained
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


def build_unet(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The stage-2 model; `num_classes` > 0 adds a label embedding.

  With `config.diffusion.init_from` the U-Net is the one its config.json describes
  (`config.diffusion.model` is not used); it must fit the latents and labels. With
  `config.diffusion.conditioning.name` set, the U-Net and that conditioner as one
  `ConditionedUNet`.
  """
  if config.diffusion.init_from:
    return _pretrained_unet(config, num_classes)
  unet = _build('diffusion', config.diffusion.model,
                out_channels=latent_shape(config)[-1],
                num_classes=num_classes, dtype=jnp.dtype(config.diffusion.compute_dtype))
  if not config.diffusion.conditioning.name:
    return unet
  return conditioners.ConditionedUNet(unet, build_conditioner(config))


def build_conditioner(config: ml_collections.ConfigDict) -> nn.Module:
  """The conditioner named by `config.diffusion.conditioning.name` (not '')."""
  c = config.diffusion.conditioning
  context_dim = config.diffusion.model.context_dim
  if c.name == 'class':
    count = input_pipeline.dataset_info(config.data).num_classes
    if not count:
      raise UserError(f'config.diffusion.conditioning.name=class but dataset '
                      f'{config.data.name!r} has no labels')
    kwargs = dict(num_classes=count, context_dim=context_dim)
  elif c.name == 'text':
    kwargs = dict(vocab_size=c.text.vocab_size, max_length=c.text.max_length,
                  context_dim=context_dim, num_layers=c.text.num_layers,
                  num_heads=c.text.num_heads)
  elif c.name == 'precomputed':
    kwargs = dict(context_dim=context_dim)
  else:
    kwargs = dict(latent_size=latent_shape(config)[:2])
  return conditioners.CONDITIONERS[c.name](**kwargs)


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
                    f'the run needs {num_classes} (config.diffusion.class_conditional='
                    f'{config.diffusion.class_conditional}); accepted: a U-Net with '
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
  """Label count for a class-conditional U-Net, 0 when unconditional."""
  if not config.diffusion.class_conditional:
    return 0
  count = input_pipeline.dataset_info(config.data).num_classes
  if not count:
    raise UserError(f'config.diffusion.class_conditional=True but dataset '
                    f'{config.data.name!r} has no labels; accepted: False for this dataset')
  return count
