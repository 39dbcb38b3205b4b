"""Config checks that run before any work: one clear line per mistake.

Models, schedules and samplers own their lists of accepted values; this module
only compares the config against them, so a new schedule needs no change here.
"""
import ml_collections

from ldm_jax import builders, conditioning, diffusion, lora, losses, models, optim, sampling
from ldm_jax import layouts, observe, sharding
from ldm_jax.errors import UserError
from ldm_jax.models import autoencoder


def _one_of(config: ml_collections.ConfigDict, path: str, accepted) -> None:
  value = _get(config, path)
  if value not in accepted:
    raise UserError(f'config.{path}={value!r} is not valid; accepted: '
                    f'{", ".join(str(a) for a in accepted)}')


def _check(config: ml_collections.ConfigDict, path: str, ok, accepted: str) -> None:
  value = _get(config, path)
  if not ok(value):
    raise UserError(f'config.{path}={value!r} is not valid; accepted: {accepted}')


def _get(config, path: str):
  for key in path.split('.'):
    config = config[key]
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `UserError` naming the first field whose value cannot work."""
  positive = lambda v: isinstance(v, int) and v > 0
  non_negative = lambda v: isinstance(v, int) and v >= 0
  _check(config, 'data.name', lambda v: isinstance(v, str) and v, 'a TFDS dataset name')
  sharding.mesh_shape_spec(config.mesh_shape)  # The device count is checked with the mesh.
  _one_of(config, 'data.num_channels', (1, 3))
  for path in ('data.batch_size', 'data.image_size', 'data.shuffle_buffer'):
    _check(config, path, positive, 'a positive integer')
  _one_of(config, 'autoencoder.model.name', tuple(models.AUTOENCODERS))
  _one_of(config, 'autoencoder.reconstruction_loss', losses.RECONSTRUCTION_LOSSES)
  _check(config, 'autoencoder.kl_weight', lambda v: v >= 0, 'a number >= 0')
  _validate_first_stage_objective(config)
  if config.autoencoder.pretrained and config.autoencoder.workdir:
    raise UserError('config.autoencoder.pretrained and config.autoencoder.workdir are both set; '
                    'accepted: at most one source of stage-1 weights')
  # Building the autoencoder (for its downsampling factor) needs a valid dtype.
  _one_of(config, 'autoencoder.compute_dtype', builders.COMPUTE_DTYPES)
  factor = builders.downsample_factor(config)
  _check(config, 'data.image_size', lambda v: v % factor == 0,
         f'a multiple of the autoencoder downsampling factor {factor}')
  if 'class_conditional' in config.diffusion:
    raise UserError('config.diffusion.class_conditional is no longer a field; accepted: '
                    "config.diffusion.conditioning.name='class' for class labels")
  _one_of(config, 'diffusion.model.name', tuple(models.DENOISERS))
  if not config.diffusion.init_from:
    _validate_denoiser(config)
  _one_of(config, 'diffusion.schedule', diffusion.SCHEDULES)
  _one_of(config, 'diffusion.prediction_type', diffusion.PREDICTION_TYPES)
  if config.diffusion.rescale_zero_terminal_snr and config.diffusion.prediction_type == 'eps':
    raise UserError('config.diffusion.rescale_zero_terminal_snr=True is not valid with '
                    "prediction_type='eps' (at SNR 0 the noise says nothing about x0); "
                    'accepted: prediction_type v or x0, or False')
  _one_of(config, 'diffusion.loss_weighting', losses.LOSS_WEIGHTINGS)
  _check(config, 'diffusion.num_timesteps', lambda v: isinstance(v, int) and v >= 2,
         'an integer >= 2')
  _check(config, 'diffusion.scale_factor', lambda v: v >= 0, '0 (from data) or a positive number')
  _check(config, 'diffusion.cond_drop_prob', lambda v: 0 <= v < 1, 'a probability in [0, 1)')
  if config.diffusion.schedule == 'cosine':
    for path in ('diffusion.beta_start', 'diffusion.beta_end'):
      _check(config, path, lambda v: v == 0, '0 for the cosine schedule (it has no beta range)')
  for path in ('diffusion.min_snr_gamma', 'diffusion.p2_k'):
    _check(config, path, lambda v: v > 0, 'a positive number')
  _check(config, 'diffusion.p2_gamma', lambda v: v >= 0, 'a number >= 0')
  _validate_lora(config)
  _check(config, 'diffusion.grad_accum_steps', positive, 'a positive integer')
  _check(config, 'data.batch_size', lambda v: v % config.diffusion.grad_accum_steps == 0,
         f'a multiple of diffusion.grad_accum_steps={config.diffusion.grad_accum_steps}')
  _check(config, 'diffusion.cache_shard_size', positive, 'a positive integer')
  for stage in ('autoencoder', 'diffusion'):
    _one_of(config, f'{stage}.compute_dtype', builders.COMPUTE_DTYPES)
    _check(config, f'{stage}.optim.grad_clip_norm', lambda v: v >= 0, 'a number >= 0 (0 = none)')
    _check(config, f'{stage}.num_train_steps', non_negative, 'an integer >= 0')
    _check(config, f'{stage}.ema_decay', lambda v: 0 <= v < 1, 'a number in [0, 1)')
    _one_of(config, f'{stage}.optim.lr_schedule', optim.LR_SCHEDULES)
    _check(config, f'{stage}.optim.learning_rate', lambda v: v > 0, 'a positive number')
    _check(config, f'{stage}.optim.warmup_steps', non_negative, 'an integer >= 0')
  for path in ('train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints'):
    _check(config, path, positive, 'a positive integer')
  _check(config, 'train.image_every', non_negative, 'an integer >= 0 (0 = at the end)')
  _check(config, 'train.eval_every', non_negative, 'an integer >= 0 (0 = never)')
  observe.check_report_to(config.train.report_to)
  _check(config, 'train.profile_steps', non_negative, 'an integer >= 0 (0 = no trace)')
  layouts.state_layouts(config)
  for path in ('eval.num_samples', 'eval.batch_size', 'eval.kid_subsets', 'eval.kid_subset_size',
               'eval.pr_k', 'eval.classifier_steps', 'eval.classifier_batch_size',
               'eval.classifier_features'):
    _check(config, path, positive, 'a positive integer')
  _check(config, 'eval.num_samples', lambda v: v > max(config.eval.pr_k, 1),
         f'more samples than eval.pr_k={config.eval.pr_k}')
  _check(config, 'eval.classifier_channels',
         lambda v: len(v) > 0 and all(isinstance(c, int) and c > 0 for c in v),
         'a non-empty tuple of positive integers')
  _one_of(config, 'eval.classifier_optim.lr_schedule', optim.LR_SCHEDULES)
  _one_of(config, 'sample.method', sampling.SAMPLERS)
  _one_of(config, 'sample.timestep_spacing', sampling.TIMESTEP_SPACINGS)
  _check(config, 'sample.num_steps',
         lambda v: isinstance(v, int) and 1 <= v <= config.diffusion.num_timesteps,
         f'an integer in [1, diffusion.num_timesteps={config.diffusion.num_timesteps}]')
  _check(config, 'sample.eta', lambda v: v >= 0, 'a number >= 0')
  _one_of(config, 'sample.ddpm_variance', sampling.DDPM_VARIANCES)
  _check(config, 'sample.guidance_scale', lambda v: v >= 0, 'a number >= 0 (1 = no guidance)')
  _check(config, 'sample.class_label', lambda v: isinstance(v, int) and v >= -1,
         '-1 (every class) or a class index')
  if config.sample.guidance_scale != 1 and not config.diffusion.conditioning.name:
    raise UserError('config.sample.guidance_scale needs a conditional model '
                    '(config.diffusion.conditioning.name set); accepted: 1.0 here')
  _validate_conditioning(config)
  for path in ('sample.num_samples', 'sample.batch_size'):
    _check(config, path, positive, 'a positive integer')


def _validate_denoiser(config: ml_collections.ConfigDict) -> None:
  """The backbone's own checks of its fields (see `ldm_jax.models.denoiser`)."""
  model = config.diffusion.model
  fields = {k: v for k, v in model.items() if k != 'name'}
  try:
    models.check_denoiser_fields(model.name, fields, builders.latent_shape(config)[0])
  except models.FieldError as e:
    raise UserError(f'config.diffusion.model.{e.field}={e.value!r} is not valid; '
                    f'accepted: {e.accepted}') from e
  except ValueError as e:
    raise UserError(f'config.diffusion.model: {e}') from e


def _validate_conditioning(config: ml_collections.ConfigDict) -> None:
  name = config.diffusion.conditioning.name
  conditioning.check(config)
  if conditioning.has_module(config) and config.diffusion.init_from:
    raise UserError(f'config.diffusion.conditioning.name={name!r} cannot start from '
                    f'config.diffusion.init_from (a diffusers UNet2DModel has no conditioner); '
                    f'accepted: init_from=\'\' with a conditioner')


def _validate_lora(config: ml_collections.ConfigDict) -> None:
  _check(config, 'diffusion.lora.rank', lambda v: isinstance(v, int) and v >= 0,
         'an integer >= 0 (0 = off)')
  _check(config, 'diffusion.lora.alpha', lambda v: v > 0, 'a positive number')
  _check(config, 'diffusion.lora.targets',
         lambda v: isinstance(v, (tuple, list)) and v and set(v) <= set(lora.TARGETS),
         f'a non-empty tuple of {", ".join(lora.TARGETS)}')
  if config.diffusion.lora.rank and not config.diffusion.init_from:
    raise UserError('config.diffusion.lora.rank > 0 needs a base U-Net; accepted: '
                    'config.diffusion.init_from=PATH of a diffusers UNet2DModel folder')


def _validate_first_stage_objective(config: ml_collections.ConfigDict) -> None:
  c = config.autoencoder
  for path in ('autoencoder.perceptual_weight', 'autoencoder.codebook_weight',
               'autoencoder.disc.weight', 'autoencoder.disc.factor'):
    _check(config, path, lambda v: v >= 0, 'a number >= 0')
  _check(config, 'autoencoder.disc.start', lambda v: isinstance(v, int) and v >= 0,
         'an integer >= 0')
  _one_of(config, 'autoencoder.disc.loss', losses.DISCRIMINATOR_LOSSES)
  _check(config, 'autoencoder.disc.num_layers', lambda v: isinstance(v, int) and v >= 1,
         'an integer >= 1')
  _check(config, 'autoencoder.disc.ndf', lambda v: isinstance(v, int) and v >= 1,
         'an integer >= 1')
  _one_of(config, 'autoencoder.disc.optim.lr_schedule', optim.LR_SCHEDULES)
  _check(config, 'autoencoder.disc.optim.learning_rate', lambda v: v > 0, 'a positive number')
  if c.model.name == 'vq':  # The VQ model's defaults stand in for fields a config leaves out.
    if 'codebook_update' in c.model:
      _one_of(config, 'autoencoder.model.codebook_update', autoencoder.CODEBOOK_UPDATES)
    if 'codebook_ema_decay' in c.model:
      _check(config, 'autoencoder.model.codebook_ema_decay', lambda v: 0 < v < 1,
             'a number in (0, 1)')
    if 'codebook_ema_epsilon' in c.model:
      _check(config, 'autoencoder.model.codebook_ema_epsilon', lambda v: v > 0,
             'a positive number')
  if c.perceptual_weight > 0 and not (c.lpips_vgg_weights and c.lpips_lin_weights):
    raise UserError('config.autoencoder.perceptual_weight > 0 needs the LPIPS weights: set '
                    'config.autoencoder.lpips_vgg_weights (torchvision vgg16 .pth) and '
                    'config.autoencoder.lpips_lin_weights (lpips weights/v0.1/vgg.pth); '
                    'accepted without them: perceptual_weight=0')
