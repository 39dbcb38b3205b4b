"""The denoiser protocol: what stage 2 asks of a backbone, and how a backbone registers.

Stage 2 (training, sampling, editing, evaluation) works with any Flax module that

  * is built from keyword arguments: its own config fields (`config.diffusion.model`
    minus `name`) plus three the layer above derives from data:
      out_channels: int   channels of the prediction (the latent channels)
      num_classes: int    0 = no class labels; else labels 0..num_classes-1
      dtype               compute dtype (float32 | bfloat16); params stay float32
  * has the attributes
      num_classes: int    as built
      null_class: int     the label of the unconditional class (classifier-free guidance)
      context_dim: int    width of the cross-attention context it takes; 0 = none
  * is called as
      model(x, t, y=None, *, train=False, context=None, context_mask=None) -> prediction
    with x [B, h, w, c] noisy latents, t [B] float timesteps, y [B] int32 labels
    (None or `null_class` = unconditional; ignored when num_classes == 0), context
    [B, S, context_dim] with its mask [B, S] (True = a real position), returning the
    eps / x0 / v prediction [B, h, w, out_channels] in float32;
  * checks its own config fields in a `check_fields(fields, latent_size)` function
    that raises `FieldError` naming the field, before any work starts.

A new backbone is one file in `ldm_jax/models/` (module + `check_fields`), one
`DenoiserSpec` line in `ldm_jax.models.DENOISERS`, and its config fields under
`config.diffusion.model` with `name` set to its key.
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
from flax import linen as nn


class FieldError(ValueError):
  """A model config field whose value cannot work."""

  def __init__(self, field: str, value: Any, accepted: str):
    super().__init__(f'{field}={value!r} is not valid; accepted: {accepted}')
    self.field, self.value, self.accepted = field, value, accepted


class Denoiser(Protocol):
  """The call and attributes of a stage-2 backbone (see the module docstring)."""

  num_classes: int
  context_dim: int

  @property
  def null_class(self) -> int: ...

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool = False, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array: ...


CheckFields = Callable[[Mapping[str, Any], int], None]


@dataclasses.dataclass(frozen=True)
class DenoiserSpec:
  """A registered backbone.

  Attributes:
    module: the Flax module class; follows `Denoiser`.
    check_fields: (config fields without `name`, latent height/width) -> None;
      raises `FieldError` for a value that cannot work.
  """
  module: type[nn.Module]
  check_fields: CheckFields
