"""Config validation: each bad value is named with the values that would work."""
import pytest

from configs import default
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config


def test_default_config_is_valid():
  validate_config(default.get_config())


@pytest.mark.parametrize('path, value, fragment', [
    ('diffusion.schedule', 'cosin', 'linear, scaled_linear, cosine'),
    ('diffusion.prediction_type', 'score', 'eps, x0, v'),
    ('diffusion.loss_weighting', 'snr', 'uniform'),
    ('sample.method', 'plms', 'ddpm, ddim'),
    ('sample.timestep_spacing', 'even', 'leading, trailing, linspace'),
    ('sample.num_steps', 5000, 'diffusion.num_timesteps=1000'),
    ('data.num_channels', 2, '1, 3'),
    ('data.batch_size', 0, 'a positive integer'),
    ('data.image_size', 30, 'multiple of the autoencoder downsampling factor 4'),
    ('autoencoder.model.name', 'vqgan', 'autoencoder_kl'),
    ('autoencoder.reconstruction_loss', 'lpips', 'l1, l2'),
    ('diffusion.ema_decay', 1.0, '[0, 1)'),
    ('diffusion.optim.lr_schedule', 'step', 'cosine, constant'),
    ('train.checkpoint_every', 0, 'a positive integer'),
    ('train.state_layouts', 'tiled', "'default', 'auto'"),
    ('diffusion.compute_dtype', 'float16', 'float32, bfloat16'),
    ('autoencoder.compute_dtype', 'bf16', 'float32, bfloat16'),
    ('diffusion.model.remat', 'all', "'', 'full', 'dots_saveable'"),
    ('diffusion.model.attention_impl', 'flash', "'auto', 'xla', 'cudnn'"),
    ('diffusion.model.name', 'vit', 'unet, dit'),
    # The 8x8 latents of the default config give 8x8 and 4x4 feature maps only.
    ('diffusion.model.attention_resolutions', (4, 3), '(8, 4) for 8x8 latents; 3 never occur'),
    ('diffusion.rescale_zero_terminal_snr', True, 'prediction_type v or x0'),
    ('diffusion.grad_accum_steps', 0, 'a positive integer'),
    ('diffusion.optim.grad_clip_norm', -1.0, '0 = none'),
])
def test_bad_value_names_field_and_accepted_values(path, value, fragment):
  config = default.get_config()
  *parents, leaf = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value
  with pytest.raises(UserError) as info:
    validate_config(config)
  message = str(info.value)
  assert f'config.{path}={value!r}' in message
  assert fragment in message
  assert '\n' not in message


@pytest.mark.parametrize('field, value, fragment', [
    # configs/digits_dit.py: 8x8 latents, hidden_size=64, num_heads=4.
    ('patch_size', 3, 'a divisor of the latent size 8'),
    ('patch_size', 0, 'a positive integer'),
    ('num_heads', 3, 'a divisor of hidden_size=64'),
    ('hidden_size', 66, 'a multiple of 4'),
    ('depth', 0, 'a positive integer'),
    ('mlp_ratio', 0.0, 'a positive number'),
    ('remat', 'all', "'', 'full', 'dots_saveable'"),
    ('context_dim', 8, "0 for conditioning.name='class'"),
])
def test_bad_dit_field_names_field_and_accepted_values(field, value, fragment):
  from configs import digits_dit
  config = digits_dit.get_config()
  config.diffusion.model[field] = value
  if field == 'hidden_size':
    config.diffusion.model.num_heads = 2  # Divides 66: only the position embedding fails.
  with pytest.raises(UserError) as info:
    validate_config(config)
  message = str(info.value)
  assert f'config.diffusion.model.{field}={value!r}' in message
  assert fragment in message
  assert '\n' not in message


def test_dit_config_rejects_u_net_fields():
  from configs import digits_dit
  config = digits_dit.get_config()
  validate_config(config)
  config.diffusion.model.transformer_depth = 1
  with pytest.raises(UserError, match="unexpected field.*'transformer_depth'.*denoiser 'dit'"):
    validate_config(config)


@pytest.mark.parametrize('field, value, fragment', [
    ('codebook_update', 'kmeans', 'loss, ema'),
    ('codebook_ema_decay', 1.0, 'a number in (0, 1)'),
    ('codebook_ema_epsilon', 0.0, 'a positive number'),
])
def test_bad_vq_codebook_update_field_is_named(field, value, fragment):
  from configs import digits_vq_gan

  config = digits_vq_gan.get_config()
  config.autoencoder.model[field] = value
  with pytest.raises(UserError, match=f'config.autoencoder.model.{field}={value!r}') as info:
    validate_config(config)
  assert fragment in str(info.value)
