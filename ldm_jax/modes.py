"""What `--mode` runs: every mode is one function of (config, workdir, mesh, options).

`run` is the one way in: it validates the config (and the mode's own section and
options), takes the workdir's lock (one run per workdir), builds the mesh once, and
calls the mode, which receives both ready. A Stable Diffusion pipeline config
(`config.pipeline='stable_diffusion'`) takes the same path with its own checks and
modes, `ldm_jax.sd_modes`. A mode checks everything else (dataset, batch sizes, the
config stored with the checkpoints) before its first write. Modes restore what they
need through `ldm_jax.stages`; the training modes hand the trainer its
in-training hooks (samples, evaluations), so that `ldm_jax.train` knows only steps
and the loop.
"""
import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import builders, conditioning, editing, evaluation, generate, input_pipeline
from ldm_jax import images as image_io
from ldm_jax import latent_cache, preemption, pretrained, sd_modes, sharding, stages, train
from ldm_jax import workdir_lock
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config


@dataclasses.dataclass(frozen=True)
class Options:
  """Command-line values a mode may use besides the config.

  Attributes:
    num_samples: samples to write in --mode=sample (None: config.sample.num_samples).
    prompts: text prompts for sample and edit with a text-conditioned model.
    negative_prompts: what classifier-free guidance steers away from (Stable
      Diffusion configs only): one for all prompts or one per prompt.
  """
  num_samples: int | None = None
  prompts: tuple[str, ...] | None = None
  negative_prompts: tuple[str, ...] | None = None


Mode = Callable[[ml_collections.ConfigDict, str, object, Options], object]


# --------------------------------------------------------------- helpers ----


def _sample_conditions(config, workdir, num_samples: int, prompts=None):
  """(conditions, grid columns) of the samples; see `conditioning.sample_conditions`."""
  vocabulary = conditioning.load_or_build_vocabulary(
      config, stages.vocabulary_path(workdir), build=False)
  return conditioning.sample_conditions(config, vocabulary, num_samples,
                                        list(prompts) if prompts else None)


def _write_samples(config, workdir, mesh, trained: stages.Trained, num_samples: int,
                   writer=None, conditions=None, ncols=None, own_files: bool = False) -> None:
  """Writes samples_<step>.npz and grid_<step>.png; with `own_files`, new names
  (`..._<step>_sample<n>`) that never replace the training run's samples."""
  if conditions is None:
    conditions, ncols = _sample_conditions(config, workdir, num_samples)
  sampler = generate.Sampler(config, mesh, trained.denoiser, trained.autoencoder)
  state = trained.state
  images, labels = sampler.generate(state.ema_params, trained.ae_params, state.scale_factor,
                                    num_samples=num_samples, conditions=conditions)
  step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    grid = image_io.make_grid(images, ncols) if ncols else sampler.grid(images)
    png, npz = image_io.write_samples(stages.samples_dir(workdir), step, grid, images, labels,
                                      own_files=own_files)
    print(f'samples: {png} and {npz}')
    if writer is not None:
      writer.image('diffusion/samples', grid, step)
      writer.flush()


def training_hooks(config: ml_collections.ConfigDict, workdir: str, mesh, autoencoder,
                   ae_params) -> train.MakeHooks:
  """Stage 2's in-training hooks: a sample grid every `train.image_every` steps (and at
  the end), `evaluation.run_evaluation` every `train.eval_every` steps."""

  def make_hooks(denoiser, writer):
    on_images = on_eval = None
    if config.train.image_every:
      sampler = generate.Sampler(config, mesh, denoiser, autoencoder)
      vocabulary = conditioning.load_or_build_vocabulary(
          config, stages.vocabulary_path(workdir), build=True)
      conditions, _ = conditioning.sample_conditions(config, vocabulary, sampler.batch_size)

      def write_grid(state):
        images, _ = sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                     num_samples=sampler.batch_size, conditions=conditions)
        if writer is not None:
          writer.image('diffusion/samples', sampler.grid(images), int(state.step))
          writer.flush()
      on_images = write_grid
    if config.train.eval_every:
      on_eval = lambda state: evaluation.run_evaluation(
          config, workdir, mesh, denoiser, state, autoencoder, ae_params, writer)
    return on_images, on_eval

  return make_hooks


def _prepare_training(config: ml_collections.ConfigDict, workdir: str, mesh,
                      stage_names: tuple[str, ...]) -> None:
  """Checks dataset, batch sizes and the checkpoints' config before any write; saves the config.

  Args:
    config: the run's config.
    workdir: the run's directory.
    mesh: the run's mesh.
    stage_names: the stages the mode trains (see `stages.STAGES`).
  """
  if jax.process_index() == 0:  # Prepares a dataset once, not in every process at once.
    input_pipeline.dataset_info(config.data)  # An unknown or unreachable dataset stops here.
  multihost_utils.sync_global_devices('dataset prepared')
  input_pipeline.dataset_info(config.data)
  sharding.check_batch_size(config.data.batch_size, mesh)
  if 'diffusion' in stage_names:
    sharding.check_batch_size(config.data.batch_size // config.diffusion.grad_accum_steps, mesh,
                              'data.batch_size / diffusion.grad_accum_steps')
  stages.check_config(config, workdir, stage_names)
  stages.prepare_workdir(workdir)
  stages.save_config(config, workdir)  # Only now: a failed check keeps the old record.


# ----------------------------------------------------------------- modes ----


def train_autoencoder_mode(config: ml_collections.ConfigDict, workdir: str, mesh,
                           options: Options) -> None:
  """Stage 1 only, e.g. one first stage shared by many runs through autoencoder.workdir."""
  del options
  _prepare_training(config, workdir, mesh, ('autoencoder',))
  with preemption.handle_sigterm():
    train.train_autoencoder(config, workdir, mesh)


def train_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options: Options) -> None:
  """Stage 1, then stage 2, then samples, each resumed or skipped when done."""
  del options
  _prepare_training(config, workdir, mesh, stages.STAGES)
  with preemption.handle_sigterm():
    autoencoder, ae_params = train.train_autoencoder(config, workdir, mesh)
    denoiser, state = train.train_diffusion(
        config, workdir, mesh, autoencoder, ae_params,
        make_hooks=training_hooks(config, workdir, mesh, autoencoder, ae_params))
  writer = stages.summary_writer(workdir, 'diffusion', config)
  _write_samples(config, workdir, mesh, stages.Trained(denoiser, state, autoencoder, ae_params),
                 config.sample.num_samples, writer)


def encode_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options: Options) -> None:
  """Encodes the train split with the trained autoencoder into WORKDIR/latents."""
  del options
  input_pipeline.dataset_info(config.data)
  autoencoder, ae_params = stages.restore_autoencoder(config, workdir, mesh)
  stages.prepare_workdir(workdir)
  directory = latent_cache.build(config, workdir, mesh, autoencoder, ae_params)
  if jax.process_index() == 0:
    print(f'latents: {directory}')


def sample_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options: Options) -> None:
  """Loads the latest diffusion checkpoint (EMA params) and writes samples.

  A text-conditioned model samples one grid row per prompt when `options.prompts`
  are given. The files are new ones (`samples_<step>_sample<n>.npz`, `grid_...png`):
  the training run's samples of the same step stay as they were.
  """
  num_samples = options.num_samples or config.sample.num_samples
  # Before restoring: a bad prompt stops at once.
  conditions, ncols = _sample_conditions(config, workdir, num_samples, options.prompts)
  trained = stages.restore_trained(config, workdir, mesh)
  stages.prepare_workdir(workdir)
  _write_samples(config, workdir, mesh, trained, num_samples, conditions=conditions,
                 ncols=ncols, own_files=True)


def _check_sample(config: ml_collections.ConfigDict, options: Options) -> None:
  if options.num_samples is not None and options.num_samples <= 0:
    raise UserError(f'--num_samples={options.num_samples}; accepted: a positive number (or '
                    f'none for config.sample.num_samples={config.sample.num_samples})')


def eval_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options: Options) -> dict:
  """Restores the latest stage-2 checkpoint (EMA params) and runs `evaluation.run_evaluation`.

  Writes `WORKDIR/eval/metrics_<step>.json` and `eval/<name>` scalars in
  `WORKDIR/diffusion/tensorboard`; returns the record written.
  """
  del options
  trained = stages.restore_trained(config, workdir, mesh)
  writer = stages.summary_writer(workdir, 'diffusion', config)
  return evaluation.run_evaluation(config, workdir, mesh, trained.denoiser, trained.state,
                                   trained.autoencoder, trained.ae_params, writer)


def _check_merge_lora(config: ml_collections.ConfigDict, options: Options) -> None:
  del options
  if not config.diffusion.lora.rank:
    raise UserError('--mode=merge_lora needs the LoRA run\'s config; accepted: '
                    'config.diffusion.lora.rank > 0 with its config.diffusion.init_from')


def merge_lora_mode(config: ml_collections.ConfigDict, workdir: str, mesh,
                    options: Options) -> None:
  """Merges the latest LoRA adapters (EMA) into their base; writes a diffusers folder.

  The folder, WORKDIR/merged_unet, loads with `pretrained.load_unet`, as
  `config.diffusion.init_from` of another run, or in diffusers as a `UNet2DModel`.
  """
  del options
  trained = stages.restore_trained(config, workdir, mesh)
  if jax.process_index() == 0:
    path = stages.merged_dir(workdir)
    pretrained.save_unet(trained.denoiser, jax.device_get(trained.state.ema_params), path)
    print(f'merged U-Net (step {int(jax.device_get(trained.state.step))}): {path}')


def _edit_conditions(config: ml_collections.ConfigDict, workdir: str, batch_size: int,
                     prompts) -> tuple[dict[str, np.ndarray] | None, bool]:
  """The conditioner's features of an edit (a prompt's tokens), and whether one was given."""
  if len(prompts or ()) > 1:
    raise UserError(f'--mode=edit takes one --prompt, got {len(prompts)}')
  spec = conditioning.spec(config)
  if spec.module is not None and not spec.uses_vocabulary:
    raise UserError(f'--mode=edit conditions on class labels or a text prompt, not on '
                    f'config.diffusion.conditioning.name={config.diffusion.conditioning.name!r}; '
                    f"accepted: conditioning.name '', class or text")
  if spec.module is None and not prompts:
    return None, False
  vocabulary = conditioning.load_or_build_vocabulary(
      config, stages.vocabulary_path(workdir), build=False) if spec.uses_vocabulary else None
  # No prompt: the empty caption, the text model's unconditional input.
  conditions, _ = conditioning.sample_conditions(config, vocabulary, batch_size,
                                                 list(prompts or ('',)))
  return conditions, bool(prompts)


def edit_mode(config: ml_collections.ConfigDict, workdir: str, mesh,
              options: Options) -> tuple[str, str]:
  """Edits `config.edit.input` with the trained models of `workdir` (see `ldm_jax.editing`).

  A text-conditioned model edits towards `options.prompts[0]` when given.

  Returns:
    The paths of the PNG grid and the .npz written under WORKDIR/edits/.
  """
  edit = config.edit
  num_devices = sharding.num_batch_shards(mesh)
  batch_size = -(-edit.num_samples // num_devices) * num_devices
  conditions, prompted = _edit_conditions(config, workdir, batch_size, options.prompts)
  image_size = config.data.image_size
  image = editing.load_image(edit.input, image_size, config.data.num_channels)  # [H, W, C]
  factor = image_size // builders.latent_shape(config)[0]
  if edit.task == 'inpaint':
    known_pixels = editing.load_mask(edit.mask, image_size)  # [H, W, 1]
  else:
    known_pixels = np.ones((image_size, image_size, 1), np.float32)
  known_latents = editing.latent_known_mask(known_pixels, factor)

  denoiser, state, autoencoder, ae_params = stages.restore_trained(config, workdir, mesh)
  num_classes = denoiser.num_classes
  if edit.class_label >= 0 and not num_classes:
    raise UserError(f'config.edit.class_label={edit.class_label} but the model has no class '
                    f'labels; accepted: -1')
  if edit.class_label >= num_classes > 0:
    raise UserError(f'config.edit.class_label={edit.class_label} is not a class of '
                    f'{config.data.name!r}; accepted: -1 or 0..{num_classes - 1}')
  labels = None
  if num_classes:  # class_label -1 is the null class.
    label = edit.class_label if edit.class_label >= 0 else denoiser.null_class
    labels = np.full((batch_size,), label, np.int32)

  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  edit_fn = jax.jit(
      functools.partial(generate.edit_images, denoiser=denoiser, autoencoder=autoencoder,
                        edit_config=edit, sample_config=config.sample,
                        prediction_type=config.diffusion.prediction_type,
                        batch_size=batch_size, guided=prompted or edit.class_label >= 0,
                        batch_sharding=data),
      in_shardings=(replicated,) * 10, out_shardings=data)
  params, ae_params = sharding.gather((state.ema_params, ae_params), mesh)
  images = edit_fn(params, ae_params, state.scale_factor, image, known_pixels,
                   known_latents, jax.random.PRNGKey(config.sample.seed),
                   builders.make_schedule(config), labels, conditions)
  images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
  images = input_pipeline.postprocess(images[:edit.num_samples])

  step = int(jax.device_get(state.step))
  directory = stages.edits_dir(workdir)
  png = os.path.join(directory, f'{edit.task}_{step}.png')
  npz = os.path.join(directory, f'{edit.task}_{step}.npz')
  if jax.process_index() == 0:
    input_pixels = input_pipeline.postprocess(image)
    arrays = {'images': images, 'input': input_pixels}
    header = [input_pixels]
    if edit.task == 'inpaint':
      fill = known_pixels < 0.5
      arrays['mask'] = fill.astype(np.uint8)  # 1 = filled, the npz mask convention.
      header.append(input_pipeline.postprocess(np.where(fill, editing.MASKED_VALUE, image)))
    tiles = np.stack(header + list(images))
    grid = image_io.make_grid(tiles, ncols=min(len(tiles), len(header) + 8))
    image_io.save_grid_and_arrays(png, npz, grid, arrays)
    print(f'edits: {png} and {npz}')
  return png, npz


MODES: dict[str, Mode] = {
    'train': train_mode,
    'train_autoencoder': train_autoencoder_mode,
    'sample': sample_mode,
    'eval': eval_mode,
    'edit': edit_mode,
    'encode': encode_mode,
    'merge_lora': merge_lora_mode,
}
# Checks of a mode's own config section and options, run with `validate_config`
# before any work.
_MODE_CHECKS: dict[str, Callable[[ml_collections.ConfigDict, Options], None]] = {
    'sample': _check_sample,
    'edit': lambda config, options: editing.validate_edit_config(config),
    'merge_lora': _check_merge_lora,
}


def check(mode: str, config: ml_collections.ConfigDict, options: Options = Options()) -> Mode:
  """What `run` checks before any work (the mode exists for this config; the config and
  the mode's options are valid), without touching a workdir; returns the mode.

  Raises:
    UserError: one line naming what is wrong.
  """
  if mode not in MODES:
    raise UserError(f'unknown mode {mode!r}; accepted: {", ".join(MODES)}')
  if sd_modes.is_stable_diffusion(config):
    modes, validate, mode_checks = sd_modes.MODES, sd_modes.check_config, sd_modes.MODE_CHECKS
    if mode not in modes:
      raise UserError(f'--mode={mode} is not available for a Stable Diffusion config; '
                      f'accepted: {", ".join(modes)}')
  else:
    modes, validate, mode_checks = MODES, validate_config, _MODE_CHECKS
    if options.negative_prompts:
      raise UserError('--negative_prompt needs a Stable Diffusion config '
                      '(configs/stable_diffusion.py)')
  validate(config)
  if mode in mode_checks:
    mode_checks[mode](config, options)
  return modes[mode]


def run(mode: str, config: ml_collections.ConfigDict, workdir: str,
        options: Options = Options()):
  """Validates `config` for `mode` (`check`), holds the workdir's lock, builds the mesh, and
  runs the mode; returns its result."""
  mode_fn = check(mode, config, options)
  with workdir_lock.hold(workdir):  # One run per workdir.
    mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
    logging.info('devices: %d (%s), processes: %d, mesh: %s', jax.device_count(),
                 jax.devices()[0].platform, jax.process_count(), dict(mesh.shape))
    return mode_fn(config, workdir, mesh, options)
