"""Model registries: a config names a model and passes its fields as keyword arguments.

`AUTOENCODERS` are the stage-1 models; `DENOISERS` the stage-2 backbones, each a
`DenoiserSpec` (module + its config-field checks) following the protocol in
`ldm_jax.models.denoiser`. Adding a backbone: its file in this package, one line in
`DENOISERS`, its fields under `config.diffusion.model` (name = its key).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from ldm_jax.models import dit, unet
from ldm_jax.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel
from ldm_jax.models.classifier import Classifier
from ldm_jax.models.denoiser import Denoiser, DenoiserSpec, FieldError
from ldm_jax.models.dit import DiT
from ldm_jax.models.unet import UNet

AUTOENCODERS: dict[str, type[nn.Module]] = {
    'autoencoder_kl': AutoencoderKL,
    'vq': VQModel,
    'identity': IdentityFirstStage,
}
DENOISERS: dict[str, DenoiserSpec] = {
    'unet': DenoiserSpec(UNet, unet.check_fields),
    'dit': DenoiserSpec(DiT, dit.check_fields),
}
MODELS: dict[str, type[nn.Module]] = {
    **AUTOENCODERS, **{name: spec.module for name, spec in DENOISERS.items()}}

# The fields the layer above derives from data for every denoiser (not config fields).
DENOISER_DERIVED_FIELDS = ('out_channels', 'num_classes', 'dtype')
# Dataclass fields that flax adds to every module; not model hyper-parameters.
_FLAX_FIELDS = frozenset({'parent', 'name'})


def model_fields(name: str) -> tuple[str, ...]:
  """Names of the keyword arguments accepted by model `name`."""
  cls = _lookup(name)
  return tuple(
      f.name for f in dataclasses.fields(cls) if f.init and f.name not in _FLAX_FIELDS
  )


def _lookup(name: str) -> type[nn.Module]:
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; accepted: {sorted(MODELS)}')
  return MODELS[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds model `name` from keyword arguments.

  Args:
    name: a key of `MODELS`.
    **kwargs: the model's fields.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: for an unknown model name, an unknown field or a missing one; the
      message names the culprit and the accepted choices.
  """
  cls = _lookup(name)
  accepted = model_fields(name)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(
        f'unexpected field(s) {", ".join(map(repr, unknown))} for model {name!r}; '
        f'accepted: {", ".join(accepted)}'
    )
  try:
    return cls(**kwargs)
  except TypeError as e:  # e.g. a missing required field
    raise ValueError(f'cannot build model {name!r}: {e}; accepted fields: {", ".join(accepted)}') from e


def check_denoiser_fields(name: str, fields: dict[str, Any], latent_size: int) -> None:
  """Checks a denoiser's config fields: known to its module, and its own checks.

  Raises:
    ValueError: an unknown backbone or field (naming the accepted ones).
    FieldError: a field value the backbone cannot work with.
  """
  if name not in DENOISERS:
    raise ValueError(f'unknown denoiser {name!r}; accepted: {", ".join(DENOISERS)}')
  accepted = [f for f in model_fields(name) if f not in DENOISER_DERIVED_FIELDS]
  unknown = sorted(set(fields) - set(accepted))
  if unknown:
    raise ValueError(f'unexpected field(s) {", ".join(map(repr, unknown))} for denoiser '
                     f'{name!r}; accepted: {", ".join(accepted)}')
  DENOISERS[name].check_fields(fields, latent_size)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


__all__ = ['AUTOENCODERS', 'DENOISERS', 'MODELS', 'AutoencoderKL', 'Classifier', 'Denoiser',
           'DenoiserSpec', 'DiT', 'FieldError', 'IdentityFirstStage', 'UNet', 'VQModel',
           'check_denoiser_fields', 'count_params', 'get_model', 'model_fields']
