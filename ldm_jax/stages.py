"""What the modes and the trainer share: the workdir layout, stage setup, state init, restore.

A run's directory (`WORKDIR`) holds, and only this module names the paths:

  config.json                     the config of the last start (config.<n>.json: earlier ones)
  .lock                           held by the running process (`ldm_jax.workdir_lock`)
  autoencoder/{checkpoints,tensorboard}
  diffusion/{checkpoints,tensorboard}, diffusion/vocabulary.txt (text conditioning)
  latents/                        the encoded-latent cache (`--mode=encode`, cache_latents)
  samples/  eval/  edits/         outputs of --mode=sample, eval, edit
  merged_unet/                    --mode=merge_lora's diffusers UNet2DModel folder

and a Stable Diffusion fine-tuning run (`ldm_jax.sd_modes`) in the same places
(diffusion/, samples/, edits/) besides

  diffusion/pretrained.json       the pipeline it fine-tunes
  sd_latents/                     its VAE-posterior and caption-embedding cache
  lora/  export_lora/             its diffusers LoRA file (after training, merge_lora)
  export/                         --mode=merge_lora's full diffusers pipeline folder

Stage 1 is `autoencoder`, stage 2 is `diffusion` (see `ldm_jax.train` for their steps).
"""
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from ldm_jax import builders, checkpointing, conditioning, config_check, fileio, finetune
from ldm_jax import first_stage, models, observe, optim
from ldm_jax import pretrained, sharding
from ldm_jax.errors import UserError
from ldm_jax.train_state import DiffusionTrainState, TrainState, create_train_state

STAGES = ('autoencoder', 'diffusion')

# ---------------------------------------------------------------- layout ----


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, 'checkpoints')


def tensorboard_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, 'tensorboard')


def vocabulary_path(workdir: str) -> str:
  """The text conditioner's vocabulary, built from the training captions on the first run."""
  return os.path.join(workdir, 'diffusion', 'vocabulary.txt')


def latents_dir(workdir: str) -> str:
  return os.path.join(workdir, 'latents')


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, 'samples')


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, 'eval')


def metrics_path(workdir: str, step: int) -> str:
  """The record `--mode=eval` (and `train.eval_every`) writes for step `step`."""
  return os.path.join(eval_dir(workdir), f'metrics_{step}.json')


def edits_dir(workdir: str) -> str:
  return os.path.join(workdir, 'edits')


def merged_dir(workdir: str) -> str:
  return os.path.join(workdir, 'merged_unet')


def pretrained_record_path(workdir: str) -> str:
  """Which Stable Diffusion pipeline the run fine-tunes."""
  return os.path.join(workdir, 'diffusion', 'pretrained.json')


def sd_latents_dir(workdir: str) -> str:
  return os.path.join(workdir, 'sd_latents')


def lora_dir(workdir: str) -> str:
  return os.path.join(workdir, 'lora')


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, 'export')


def export_lora_dir(workdir: str) -> str:
  return os.path.join(workdir, 'export_lora')


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` or stops with one line when it cannot be written."""
  try:
    fileio.makedirs(workdir)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with fileio.open(probe, 'w') as f:
      f.write('ok')
    fileio.remove(probe)
  except fileio.ERRORS as e:
    reason = e.strerror if isinstance(e, OSError) else e.message
    raise UserError(f'workdir {workdir!r} is not writable: {reason or e}') from e


def config_path(workdir: str, version: int | None = None) -> str:
  """WORKDIR/config.json, or the earlier config.<version>.json it replaced."""
  return os.path.join(workdir, 'config.json' if version is None else f'config.{version}.json')


def check_config(config: ml_collections.ConfigDict, workdir: str,
                 stage_names: tuple[str, ...]) -> None:
  """Stops with one line if `config` differs from the one stored with the stages' checkpoints.

  Stage 1's checkpoints are this run's or `config.autoencoder.workdir`'s; a pretrained
  autoencoder has none. See `ldm_jax.config_check` for the fields that count.
  """
  directories = {}
  for stage in stage_names:
    if stage == 'autoencoder':
      if not config.autoencoder.pretrained:
        directories[stage] = autoencoder_checkpoint_dir(config, workdir)
    else:
      directories[stage] = checkpoint_dir(workdir, stage)
  config_check.check(config, directories)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json (process 0); a different earlier one is kept as config.<n>.json.

  Called only after every check of the run has passed: a run that stops on one
  leaves the earlier record as it was.
  """
  if jax.process_index() != 0:
    return
  path = config_path(workdir)
  text = config.to_json_best_effort(indent=2)
  if fileio.exists(path):
    if fileio.read_text(path) == text:
      return
    version = 1
    while fileio.exists(config_path(workdir, version)):
      version += 1
    fileio.rename(path, config_path(workdir, version))
  fileio.write_atomic(path, text)


def summary_writer(workdir: str, stage: str,
                   config: ml_collections.ConfigDict | None = None) -> observe.Writer | None:
  """The stage's TensorBoard writer on process 0 (and W&B with config.train.report_to='wandb'),
  None elsewhere."""
  return observe.summary_writer(tensorboard_dir(workdir, stage), config, workdir)


# ------------------------------------------------------------ state init ----


def init_autoencoder_state(config: ml_collections.ConfigDict, model: nn.Module,
                           tx: optax.GradientTransformation) -> TrainState:
  """A fresh stage-1 state; with the LPIPS / PatchGAN / VQ objective it also holds the
  discriminator and the NLL log-variance (`first_stage.FirstStageTrainState`)."""
  rng_params, rng_state = jax.random.split(jax.random.PRNGKey(config.seed))
  size, channels = config.data.image_size, config.data.num_channels
  # The identity first stage has no parameters.
  params = model.init(rng_params, jnp.zeros((1, size, size, channels))).get('params', {})
  if first_stage.uses_objective(config):
    disc_tx, _ = first_stage.make_disc_optimizer(config)
    return first_stage.create_state(config, params, tx, rng_state,
                                    first_stage.build_discriminator(config), disc_tx)
  return create_train_state(params, tx, rng_state)


def init_denoiser_params(config: ml_collections.ConfigDict, denoiser: nn.Module,
                         rng: jax.Array):
  """Fresh parameters of the stage-2 model, initialised with its labels and condition."""
  x = jnp.zeros((1, *builders.latent_shape(config)))
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if denoiser.num_classes else None
  cond = {}
  if conditioning.has_module(config):
    cond = dict(cond=conditioning.example_batch(config))
  return denoiser.init(rng, x, t, y, **cond)['params']


def init_diffusion_state(config: ml_collections.ConfigDict, model: nn.Module,
                         tx: optax.GradientTransformation,
                         scale_factor: float | jax.Array,
                         params=None) -> DiffusionTrainState:
  """A fresh stage-2 state from `params` (pretrained denoiser weights) or a random init."""
  # A different stream than stage 1, still determined by config.seed.
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  rng_params, rng_state = jax.random.split(rng)
  if params is None:
    params = init_denoiser_params(config, model, rng_params)
  params = finetune.trainable_params(config, rng_params, params)
  return create_train_state(params, tx, rng_state, DiffusionTrainState,
                            scale_factor=jnp.asarray(scale_factor, jnp.float32))


# ----------------------------------------------------------------- setup ----


class StageSetup(NamedTuple):
  """What a stage is built from: its model, optimizer, lr schedule and sharded abstract state."""
  model: nn.Module
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract: Any


def shardings(tree):
  """The sharding of every leaf of a tree of arrays or abstract arrays."""
  return jax.tree.map(lambda x: x.sharding, tree)


def _sharded_abstract_state(init: Callable[[], TrainState], mesh):
  """Shapes of `init()`'s state with the layout `sharding.state_sharding` gives it."""
  shapes = jax.eval_shape(init)
  return checkpointing.abstract_like(shapes, sharding.state_sharding(shapes, mesh))


def autoencoder_setup(config: ml_collections.ConfigDict, mesh) -> StageSetup:
  """Stage 1's model, optimizer, lr schedule and abstract state."""
  model = builders.build_autoencoder(config)
  tx, lr_schedule = optim.make_optimizer(config.autoencoder.optim,
                                         config.autoencoder.num_train_steps)
  abstract = _sharded_abstract_state(
      functools.partial(init_autoencoder_state, config, model, tx), mesh)
  return StageSetup(model, tx, lr_schedule, abstract)


def diffusion_setup(config: ml_collections.ConfigDict, mesh) -> StageSetup:
  """Stage 2's denoiser (with its conditioner), optimizer, lr schedule and abstract state."""
  denoiser = builders.build_denoiser(config)
  tx, lr_schedule = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  if conditioning.has_module(config) and config.diffusion.conditioning.frozen:
    tx = conditioning.freeze_conditioner(tx)
  abstract = _sharded_abstract_state(
      functools.partial(init_diffusion_state, config, denoiser, tx, 1.0), mesh)
  return StageSetup(denoiser, tx, lr_schedule, abstract)


def start(stage: str, manager, init: Callable[[], TrainState], abstract,
          num_train_steps: int) -> tuple[TrainState, bool]:
  """The state to train from (restored or new), and whether the stage is already done."""
  state, restored = checkpointing.restore_or_init(manager, init, abstract)
  logging.info('%s: %s parameters', stage, f'{models.count_params(state.params):,}')
  step = int(jax.device_get(state.step))
  if restored:
    logging.info('%s: resumed from step %d', stage, step)
  finished = step >= num_train_steps
  if finished:
    logging.info('%s: finished (step %d); skipping', stage, step)
  return state, finished


# --------------------------------------------------------------- restore ----


def autoencoder_checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Stage-1 checkpoints: this run's, or those of `config.autoencoder.workdir`."""
  if config.autoencoder.workdir:
    directory = checkpoint_dir(config.autoencoder.workdir, 'autoencoder')
    if not fileio.isdir(directory):
      raise UserError(f'config.autoencoder.workdir={config.autoencoder.workdir!r} has no '
                      f'autoencoder checkpoints ({directory} not found)')
    return directory
  return checkpoint_dir(workdir, 'autoencoder')


def is_identity_first_stage(config: ml_collections.ConfigDict) -> bool:
  """Pixel-space diffusion: stage 1 is the identity, with no parameters and nothing to train."""
  return config.autoencoder.model.name == 'identity' and not config.autoencoder.pretrained


def restore_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(model, params) of the trained stage 1, EMA params (== raw params when decay is 0)."""
  if is_identity_first_stage(config):
    return builders.build_autoencoder(config), {}
  if config.autoencoder.pretrained:
    logging.info('autoencoder: pretrained %s', config.autoencoder.pretrained)
    _, params = pretrained.load_autoencoder(config.autoencoder.pretrained)
    return builders.build_autoencoder(config), jax.device_put(params, sharding.replicated(mesh))
  model, _, _, abstract = autoencoder_setup(config, mesh)
  ckpt_dir = autoencoder_checkpoint_dir(config, workdir)
  if not fileio.isdir(ckpt_dir):
    raise UserError(f'no autoencoder checkpoint in {ckpt_dir}; run --mode=train first')
  check_config(config, workdir, ('autoencoder',))
  # Another run's checkpoints are only read; this run's unusable ones are moved aside.
  manager = checkpointing.make_manager(ckpt_dir, keep=config.train.keep_checkpoints,
                                       read_only=bool(config.autoencoder.workdir))
  if manager.latest_step() is None:
    raise UserError(f'no autoencoder checkpoint in {manager.directory}; '
                    f'run --mode=train first')
  return model, checkpointing.restore(manager, abstract).ema_params


class Trained(NamedTuple):
  """A trained run: the denoiser, its latest stage-2 state (full params), the autoencoder."""
  denoiser: nn.Module
  state: DiffusionTrainState
  autoencoder: nn.Module
  ae_params: Any


def restore_trained(config: ml_collections.ConfigDict, workdir: str, mesh) -> Trained:
  """The newest verified diffusion checkpoint of a run (LoRA merged into its base), its stage 1.

  Both stages' stored configs are compared with `config` first (`check_config`).
  """
  ckpt_dir = checkpoint_dir(workdir, 'diffusion')
  if not fileio.isdir(ckpt_dir):
    raise UserError(f'no diffusion checkpoint in {ckpt_dir}; run --mode=train first')
  denoiser, _, _, abstract = diffusion_setup(config, mesh)
  check_config(config, workdir, ('diffusion', 'autoencoder'))  # Before any checkpoint moves.
  # Unusable checkpoints are moved aside (`checkpointing.restore`).
  manager = checkpointing.make_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  if manager.latest_step() is None:
    raise UserError(f'no diffusion checkpoint in {ckpt_dir}; run --mode=train first')
  state = checkpointing.restore(manager, abstract)
  base = finetune.base_params(config, ckpt_dir, mesh, create=False)
  state = finetune.with_full_params(config, state, base)
  autoencoder, ae_params = restore_autoencoder(config, workdir, mesh)
  return Trained(denoiser, state, autoencoder, ae_params)
