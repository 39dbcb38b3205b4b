"""Stage 2 through the denoiser protocol: a backbone registered in one line trains."""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax import builders, models, sharding, stages, train
from ldm_jax.errors import UserError
from ldm_jax.models.denoiser import DenoiserSpec, FieldError
from ldm_jax.validation import validate_config


class ToyDenoiser(nn.Module):
  """The smallest module that follows `ldm_jax.models.denoiser.Denoiser`."""

  out_channels: int
  width: int = 4
  num_classes: int = 0
  context_dim: int = 0
  dtype: Any = jnp.float32

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False, context=None, context_mask=None):
    del train, context, context_mask
    h = nn.Conv(self.width, (3, 3), dtype=self.dtype)(x)
    h = h + nn.Dense(self.width)(t[:, None] / 1000.0)[:, None, None]
    if self.num_classes:
      y = jnp.full((x.shape[0],), self.null_class) if y is None else y
      h = h + nn.Embed(self.num_classes + 1, self.width, name='class_embedding')(y)[:, None, None]
    return nn.Conv(self.out_channels, (3, 3))(nn.silu(h)).astype(jnp.float32)


def _check_toy(fields, latent_size):
  del latent_size
  if fields.get('width', 4) <= 0:
    raise FieldError('width', fields['width'], 'a positive integer')


@pytest.fixture
def toy_config(tiny_config, monkeypatch):
  monkeypatch.setitem(models.DENOISERS, 'toy', DenoiserSpec(ToyDenoiser, _check_toy))
  monkeypatch.setitem(models.MODELS, 'toy', ToyDenoiser)
  tiny_config.diffusion.model = ml_collections.ConfigDict({'name': 'toy', 'width': 6})
  return tiny_config  # Class-conditional (conditioning.name='class'), as configs/default.py.


def test_a_registered_backbone_validates_builds_and_trains(toy_config):
  config = toy_config
  validate_config(config)
  mesh = sharding.make_mesh()
  denoiser, tx, lr_schedule, abstract = stages.diffusion_setup(config, mesh)
  assert isinstance(denoiser, ToyDenoiser) and denoiser.num_classes == 10
  assert abstract.params['class_embedding']['embedding'].shape == (11, 6)
  state = jax.jit(functools.partial(stages.init_diffusion_state, config, denoiser, tx))(1.0)
  step = jax.jit(functools.partial(train.diffusion_train_step, denoiser=denoiser, config=config,
                                   lr_schedule=lr_schedule))
  latents = np.random.default_rng(0).standard_normal((16, *builders.latent_shape(config)))
  batch = {'latent_mean': jnp.asarray(latents, jnp.float32),
           'latent_logvar': jnp.full(latents.shape, -20.0), 'label': jnp.arange(16) % 10}
  schedule = builders.make_schedule(config)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch, schedule)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_a_backbone_checks_its_own_fields(toy_config):
  toy_config.diffusion.model.width = 0
  with pytest.raises(UserError, match=r"config.diffusion.model.width=0 is not valid; "
                                      r"accepted: a positive integer"):
    validate_config(toy_config)
  toy_config.diffusion.model.width = 4
  toy_config.diffusion.model.remat = 'full'  # A U-Net field the toy does not have.
  with pytest.raises(UserError, match=r"unexpected field\(s\) 'remat' for denoiser 'toy'; "
                                      r"accepted: width, context_dim"):
    validate_config(toy_config)
