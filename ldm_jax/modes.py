"""What `--mode` runs: each mode is one function of (config, workdir)."""
import os

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import conditioning, config_check, generate, input_pipeline, latent_cache
from ldm_jax import preemption
from ldm_jax import pretrained, sharding, train
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config


def _prepare_workdir(workdir: str) -> None:
  """Creates `workdir` or stops with one line when it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from e


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    config_check.write_config_json(config, workdir)  # Keeps a different earlier one.


def _sample_conditions(config, workdir, num_samples: int, prompts: list[str] | None = None):
  """(conditions, grid columns) of the samples; see `conditioning.sample_conditions`."""
  vocabulary = conditioning.load_or_build_vocabulary(config, workdir, build=False)
  return conditioning.sample_conditions(config, vocabulary, num_samples, prompts)


def _write_samples(config, workdir, mesh, unet, autoencoder, ae_params, state,
                   num_samples: int, writer=None, conditions=None, ncols=None,
                   own_files: bool = False) -> None:
  """Writes samples_<step>.npz and grid_<step>.png; with `own_files`, new names
  (`..._<step>_sample<n>`) that never replace the training run's samples."""
  if conditions is None:
    conditions, ncols = _sample_conditions(config, workdir, num_samples)
  sampler = generate.Sampler(config, mesh, unet, autoencoder)
  images, labels = sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                    num_samples=num_samples, conditions=conditions)
  step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    grid = generate.make_grid(images, ncols) if ncols else sampler.grid(images)
    directory = os.path.join(workdir, 'samples')
    if own_files:
      png, npz = _free_sample_names(directory, step)
      arrays = {'images': images} if labels is None else {'images': images, 'labels': labels}
      generate.save_grid_and_arrays(png, npz, grid, arrays)
    else:
      png, npz = generate.write_samples(directory, step, grid, images, labels)
    print(f'samples: {png} and {npz}')
    if writer is not None:
      writer.image('diffusion/samples', grid, step)
      writer.flush()


def _free_sample_names(directory: str, step: int) -> tuple[str, str]:
  n = 1
  while os.path.exists(os.path.join(directory, f'samples_{step}_sample{n}.npz')):
    n += 1
  return (os.path.join(directory, f'grid_{step}_sample{n}.png'),
          os.path.join(directory, f'samples_{step}_sample{n}.npz'))


def _start_training(config: ml_collections.ConfigDict, workdir: str):
  """Checks config, dataset, devices and checkpoints before any write; returns the mesh."""
  validate_config(config)
  if jax.process_index() == 0:  # Prepares a dataset once, not in every process at once.
    input_pipeline.dataset_info(config.data)  # An unknown or unreachable dataset stops here.
  multihost_utils.sync_global_devices('dataset prepared')
  input_pipeline.dataset_info(config.data)
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  # -- checkpoint integrity: every check before the first write --
  sharding.check_batch_size(config.data.batch_size, mesh)
  sharding.check_batch_size(config.data.batch_size // config.diffusion.grad_accum_steps, mesh,
                            'data.batch_size / diffusion.grad_accum_steps')
  stages = {'diffusion': os.path.join(workdir, 'diffusion', 'checkpoints')}
  if not config.autoencoder.pretrained:
    stages['autoencoder'] = train.autoencoder_checkpoint_dir(config, workdir)
  config_check.check(config, stages)
  _prepare_workdir(workdir)
  _save_config(config, workdir)  # Only now: a failed check keeps the old record.
  logging.info('devices: %d (%s), processes: %d, mesh: %s', jax.device_count(),
               jax.devices()[0].platform, jax.process_count(), dict(mesh.shape))
  return mesh


def train_autoencoder_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stage 1 only, e.g. one first stage shared by many runs through autoencoder.workdir."""
  mesh = _start_training(config, workdir)
  with preemption.handle_sigterm():
    train.train_autoencoder(config, workdir, mesh)


def train_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stage 1, then stage 2, then samples, each resumed or skipped when done."""
  mesh = _start_training(config, workdir)
  with preemption.handle_sigterm():
    autoencoder, ae_params = train.train_autoencoder(config, workdir, mesh)
    unet, state = train.train_diffusion(config, workdir, mesh, autoencoder, ae_params)
  writer = train.summary_writer(os.path.join(workdir, 'diffusion', 'tensorboard'))
  _write_samples(config, workdir, mesh, unet, autoencoder, ae_params, state,
                 config.sample.num_samples, writer)


def encode_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Encodes the train split with the trained autoencoder into WORKDIR/latents."""
  validate_config(config)
  input_pipeline.dataset_info(config.data)
  _prepare_workdir(workdir)
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  autoencoder, ae_params = train.restore_autoencoder(config, workdir, mesh)
  directory = latent_cache.build(config, workdir, mesh, autoencoder, ae_params)
  if jax.process_index() == 0:
    print(f'latents: {directory}')


def sample_mode(config: ml_collections.ConfigDict, workdir: str,
                num_samples: int | None = None, prompts: list[str] | None = None) -> None:
  """Loads the latest diffusion checkpoint (EMA params) and writes samples.

  A text-conditioned model samples one grid row per prompt when `prompts` are given.
  """
  validate_config(config)
  if num_samples is not None and num_samples <= 0:
    raise UserError(f'--num_samples={num_samples}; accepted: a positive number (or none for '
                    f'config.sample.num_samples={config.sample.num_samples})')
  num_samples = num_samples or config.sample.num_samples
  # Before restoring: a bad prompt stops at once.
  conditions, ncols = _sample_conditions(config, workdir, num_samples, prompts)
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  unet, state, _, autoencoder, ae_params = train.restore_trained(config, workdir, mesh)
  _prepare_workdir(workdir)
  _write_samples(config, workdir, mesh, unet, autoencoder, ae_params, state, num_samples,
                 conditions=conditions, ncols=ncols, own_files=True)


def merge_lora_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Merges the latest LoRA adapters (EMA) into their base; writes a diffusers folder.

  The folder, WORKDIR/merged_unet, loads with `pretrained.load_unet`, as
  `config.diffusion.init_from` of another run, or in diffusers as a `UNet2DModel`.
  """
  validate_config(config)
  if not config.diffusion.lora.rank:
    raise UserError('--mode=merge_lora needs the LoRA run\'s config; accepted: '
                    'config.diffusion.lora.rank > 0 with its config.diffusion.init_from')
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  unet, state, _, _, _ = train.restore_trained(config, workdir, mesh)
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'merged_unet')
    pretrained.save_unet(unet, jax.device_get(state.ema_params), path)
    print(f'merged U-Net (step {int(jax.device_get(state.step))}): {path}')
