"""What `--mode` runs: each mode is one function of (config, workdir)."""
import os

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import generate, input_pipeline, preemption, sharding, train
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
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def _write_samples(config, workdir, mesh, unet, autoencoder, ae_params, state,
                   num_samples: int, writer=None) -> None:
  sampler = generate.Sampler(config, mesh, unet, autoencoder)
  images, labels = sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                    num_samples=num_samples)
  step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    grid = sampler.grid(images)
    png, npz = generate.write_samples(os.path.join(workdir, 'samples'), step, grid,
                                      images, labels)
    print(f'samples: {png} and {npz}')
    if writer is not None:
      writer.image('diffusion/samples', grid, step)
      writer.flush()


def train_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stage 1, then stage 2, then samples, each resumed or skipped when done."""
  validate_config(config)
  if jax.process_index() == 0:  # Prepares a dataset once, not in every process at once.
    input_pipeline.dataset_info(config.data)  # An unknown or unreachable dataset stops here.
  multihost_utils.sync_global_devices('dataset prepared')
  input_pipeline.dataset_info(config.data)
  _prepare_workdir(workdir)
  _save_config(config, workdir)
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  logging.info('devices: %d (%s), processes: %d, mesh: %s', jax.device_count(),
               jax.devices()[0].platform, jax.process_count(), dict(mesh.shape))
  with preemption.handle_sigterm():
    autoencoder, ae_params = train.train_autoencoder(config, workdir, mesh)
    unet, state = train.train_diffusion(config, workdir, mesh, autoencoder, ae_params)
  writer = train.summary_writer(os.path.join(workdir, 'diffusion', 'tensorboard'))
  _write_samples(config, workdir, mesh, unet, autoencoder, ae_params, state,
                 config.sample.num_samples, writer)


def sample_mode(config: ml_collections.ConfigDict, workdir: str,
                num_samples: int | None = None) -> None:
  """Loads the latest diffusion checkpoint (EMA params) and writes samples."""
  validate_config(config)
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  unet, state, _, autoencoder, ae_params = train.restore_trained(config, workdir, mesh)
  _prepare_workdir(workdir)
  _write_samples(config, workdir, mesh, unet, autoencoder, ae_params, state,
                 num_samples or config.sample.num_samples)
