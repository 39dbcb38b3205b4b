"""Stage 2 from a pretrained diffusers U-Net: full fine-tuning or LoRA.

`config.diffusion.init_from` names a diffusers `UNet2DModel` folder; the U-Net is
built from its config.json (`builders.build_denoiser`). Without LoRA the train state
starts from its weights. With `config.diffusion.lora.rank > 0` the folder's weights
stay frozen (the *base*) and the train state holds only the adapters; the stage's
checkpoint directory records which base they belong to in `lora_base.json` (the
folder's path and the SHA-256 of its weights), checked whenever they are used.
"""
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from ldm_jax import fileio, lora, pretrained
from ldm_jax.errors import UserError

Params = Any
BASE_POINTER = 'lora_base.json'


def lora_enabled(config: ml_collections.ConfigDict) -> bool:
  return config.diffusion.lora.rank > 0


def lora_scale(config: ml_collections.ConfigDict) -> float:
  """alpha / r: the factor on A @ B."""
  return config.diffusion.lora.alpha / config.diffusion.lora.rank


def _check_pointer(directory: str, path: str, *, create: bool) -> None:
  """Writes (`create`) or checks the record of the base the adapters in `directory` use."""
  pointer = os.path.join(directory, BASE_POINTER)
  digest = pretrained.weights_hash(path)
  if fileio.exists(pointer):
    recorded = fileio.read_json(pointer)
    if recorded['sha256'] != digest:
      raise UserError(f'config.diffusion.init_from={path!r} is not the base the LoRA adapters '
                      f'in {directory} were trained on ({recorded["path"]}, sha256 '
                      f'{recorded["sha256"][:12]}...); accepted: those weights')
  elif create:
    if jax.process_index() == 0:  # One writer; the other processes share the file system.
      fileio.write_json(pointer, {'path': fileio.absolute(path), 'sha256': digest})
  else:
    raise UserError(f'{directory} has no {BASE_POINTER}: it holds no LoRA adapters; '
                    f'accepted: the workdir of a run with config.diffusion.lora.rank > 0')


def base_params(config: ml_collections.ConfigDict, checkpoint_dir: str, mesh, *,
                create: bool) -> Params | None:
  """The frozen LoRA base (replicated over `mesh`), or None when LoRA is off.

  Args:
    config: the run's config.
    checkpoint_dir: the diffusion stage's checkpoint directory.
    mesh: device mesh.
    create: record the base if the directory has no record yet (training);
      otherwise a missing record is an error (sampling, merging).
  """
  if not lora_enabled(config):
    return None
  path = config.diffusion.init_from
  _check_pointer(checkpoint_dir, path, create=create)
  _, params = pretrained.load_unet(path)
  return jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def start_params(config: ml_collections.ConfigDict, base: Params | None) -> Params | None:
  """What `init_diffusion_state` starts from: the LoRA base, the init_from weights, or None."""
  if base is not None or not config.diffusion.init_from:
    return base
  return pretrained.load_unet(config.diffusion.init_from)[1]


def trainable_params(config: ml_collections.ConfigDict, rng: jax.Array, params: Params) -> Params:
  """The parameters stage 2 trains: adapters over `params` with LoRA, else `params` itself."""
  if not lora_enabled(config):
    return params
  return lora.init_adapters(rng, params, rank=config.diffusion.lora.rank,
                            targets=tuple(config.diffusion.lora.targets))


def full_params(config: ml_collections.ConfigDict, params: Params, base: Params | None) -> Params:
  """U-Net parameters: `params` merged into the base with LoRA, else `params`."""
  return params if base is None else lora.merge(base, params, lora_scale(config))


def with_full_params(config: ml_collections.ConfigDict, state, base: Params | None):
  """`state` whose params and EMA params are full U-Net parameters (for sampling, export)."""
  if base is None:
    return state
  return state.replace(params=full_params(config, state.params, base),
                       ema_params=full_params(config, state.ema_params, base))


def with_base(config: ml_collections.ConfigDict, step: Callable, denoiser) -> Callable:
  """`step(state, batch, schedule, *, denoiser)` as `(state, batch, schedule, base)`.

  With a base, the step sees the denoiser through the adapters in `state.params`
  (gradients flow only to them); with None it is the plain step on `denoiser`.
  """

  def step_with_base(state, batch, schedule, base):
    model = denoiser if base is None else lora.Adapted(denoiser, base, lora_scale(config))
    return step(state, batch, schedule, denoiser=model)

  return step_with_base
