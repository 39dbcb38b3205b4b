"""Every config file validates and builds its models abstractly, so none can rot."""
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import builders, conditioning, models
from ldm_jax.validation import validate_config

# configs/stable_diffusion.py describes a pretrained pipeline, not models to build:
# tests/sd_modes_test.py runs it.
CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
                 if p.name not in ('__init__.py', 'stable_diffusion.py'))


def test_the_expected_configs_exist():
  names = {p.stem for p in CONFIGS}
  assert {'default', 'tiny', 'mnist', 'cifar10', 'celebahq256_ldm_kl4', 'celebahq256_ldm_vq4'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_builds(path):
  config = importlib.import_module(f'configs.{path.stem}').get_config()
  validate_config(config)
  autoencoder = builders.build_autoencoder(config)
  size, channels = config.data.image_size, config.data.num_channels
  image = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  ae_params = jax.eval_shape(lambda x: autoencoder.init(jax.random.PRNGKey(0), x), image)
  recon = jax.eval_shape(lambda p, x: autoencoder.apply(p, x)[0], ae_params, image)
  assert recon.shape == image.shape

  unet = builders.build_denoiser(config, 10 if conditioning.spec(config).denoiser_labels else 0)
  latents = jax.ShapeDtypeStruct((1, *builders.latent_shape(config)), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  # A conditioned model also takes its conditioner's features.
  cond = dict(cond=conditioning.example_batch(config)) if conditioning.has_module(config) else {}
  unet_params = jax.eval_shape(lambda x, t, y: unet.init(jax.random.PRNGKey(0), x, t, y, **cond),
                               latents, t, y)
  out = jax.eval_shape(lambda p, x, t, y: unet.apply(p, x, t, y, **cond), unet_params, latents,
                       t, y)
  assert out.shape == latents.shape
  assert models.count_params(unet_params['params']) > 0


@pytest.mark.parametrize('name, compvis_factors', [
    ('celebahq256_ldm_kl4', (8, 4, 2)),   # celebahq-ldm-vq-4.yaml
    ('celebahq256_ldm_vq4', (8, 4, 2)),
    ('imagenet_sr4x', (16, 8)),           # bsr_sr/config.yaml
])
def test_attention_translates_compvis_downsampling_factors(name, compvis_factors):
  """CompVis lists attention by downsampling factor (a factor the U-Net never reaches is
  ignored there); these configs name the same levels by feature-map size."""
  config = importlib.import_module(f'configs.{name}').get_config()
  side = builders.latent_shape(config)[0]
  reached = [2 ** i for i in range(len(config.diffusion.model.channel_mult))]
  expected = sorted(side // f for f in compvis_factors if f in reached)
  assert sorted(config.diffusion.model.attention_resolutions) == expected
