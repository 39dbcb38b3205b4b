"""The two training stages: jitted train steps and the loop with periodic actions.

Stage 1 (`autoencoder`) learns the KL or VQ autoencoder on images, with the plain
loss (`autoencoder_train_step`) or LDM's LPIPS / PatchGAN objective
(`first_stage.train_step`), and is skipped for the identity first stage; stage 2
(`diffusion`) learns a denoiser of latents of the frozen stage-1 encoder. Both stages share one
loop (`_run_stage`): progress bar, TensorBoard, NaN check, checkpoints. Rerunning
the same command resumes each stage from its latest checkpoint and skips a finished
one. Setup, state init, restore and the workdir layout are `ldm_jax.stages`'; what
happens besides training (samples, evaluations) comes in as hooks from the mode.
"""
import functools
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from ldm_jax import builders, checkpointing, conditioning, diffusion, finetune, grad_accum
from ldm_jax import images as image_io
from ldm_jax import input_pipeline, latent_cache, losses, observe, pretrained, preemption
from ldm_jax import first_stage, layouts, sharding, stages
from ldm_jax.errors import UserError
from ldm_jax.train_state import DiffusionTrainState, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


# A hook of stage 2: called with the stage-2 state (full denoiser params, with LoRA
# merged) at `train.image_every` / `train.eval_every` steps, on every process.
StateHook = Callable[[DiffusionTrainState], None]
# Builds stage 2's (on_images, on_eval) hooks from the denoiser and the stage's
# TensorBoard writer (None outside process 0); either hook may be None.
MakeHooks = Callable[[nn.Module, object], tuple[StateHook | None, StateHook | None]]


# ----------------------------------------------------------- train steps ----


def autoencoder_train_step(state: TrainState, batch: Batch, *, model: nn.Module,
                           config: ml_collections.ConfigDict,
                           lr_schedule: optax.Schedule) -> tuple[TrainState, Metrics]:
  """One AdamW step on reconstruction + kl_weight · KL, as `config.autoencoder` says."""
  config = config.autoencoder
  rng = jax.random.fold_in(state.rng, state.step)  # Resume-safe randomness.
  images = batch['image']  # [B, H, W, C] in [-1, 1]

  def loss_fn(params):
    reconstruction, mean, logvar = model.apply({'params': params}, images, rng)
    return losses.autoencoder_loss(reconstruction, images, mean, logvar,
                                   kl_weight=config.kl_weight,
                                   reconstruction_loss=config.reconstruction_loss)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {**metrics, 'grad_norm': optax.global_norm(grads), 'lr': lr_schedule(state.step)}
  return state.apply_gradients(grads, ema_decay=config.ema_decay), metrics


def encode_batch(ae_params, batch: Batch, *, autoencoder: nn.Module) -> Batch:
  """An image batch -> the frozen encoder's posterior: the input of `diffusion_train_step`.

  The other features (label, conditioning features) pass through unchanged.
  """
  mean, logvar = latent_cache.encode_posterior(ae_params, batch['image'],
                                               autoencoder=autoencoder)
  others = {k: v for k, v in batch.items() if k != 'image'}
  return {'latent_mean': mean, 'latent_logvar': logvar, **others}


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_class: int) -> jax.Array:
  """Replaces each label by `null_class` with probability `prob` (classifier-free guidance)."""
  return jnp.where(conditioning.drop_mask(rng, labels.shape[0], prob), null_class, labels)


def diffusion_train_step(state: DiffusionTrainState, batch: Batch,
                         schedule: diffusion.Schedule, *, denoiser: nn.Module,
                         config: ml_collections.ConfigDict,
                         lr_schedule: optax.Schedule) -> tuple[DiffusionTrainState, Metrics]:
  """One update of the latent diffusion loss, as `config.diffusion` says.

  Args:
    state: the stage-2 state.
    batch: the unscaled encoder posterior of a batch, `latent_mean` and
      `latent_logvar` [B, h, w, c], and `label` [B]; from the latent cache or from
      `encode_batch`. A fresh latent mean + std * noise is drawn every step. With a
      conditioner module, also its features (`conditioning.batch_keys`).
    schedule: the noise schedule.
    denoiser: the stage-2 model (`builders.build_denoiser`).
    config: the run's config; `diffusion.grad_accum_steps` splits the batch into
      that many microbatches, giving the same update as the whole batch at once.
    lr_schedule: for the logged learning rate.

  Returns:
    (new state, metrics).
  """
  cond_keys = conditioning.batch_keys(config) if conditioning.has_module(config) else ()
  config = config.diffusion
  rng = jax.random.fold_in(state.rng, state.step)
  rng_z, rng_t, rng_noise, rng_dropout, rng_drop = jax.random.split(rng, 5)
  # Every per-example draw is made for the whole batch before it is split into
  # microbatches, so the update does not depend on grad_accum_steps.
  mean, logvar = batch['latent_mean'], batch['latent_logvar']  # [B, h, w, c]
  latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng_z, mean.shape)
  z0 = jax.lax.stop_gradient(latents * state.scale_factor)
  t = jax.random.randint(rng_t, (z0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(rng_noise, z0.shape)
  x_t = diffusion.q_sample(schedule, z0, t, noise)
  target = diffusion.training_target(schedule, z0, noise, t, config.prediction_type)
  weights = losses.loss_weighting(schedule, t, config.loss_weighting,
                                  prediction_type=config.prediction_type,
                                  min_snr_gamma=config.min_snr_gamma,
                                  p2_gamma=config.p2_gamma, p2_k=config.p2_k)
  # One mask for labels and conditioner: a dropped example is fully unconditional.
  drop = conditioning.drop_mask(rng_drop, z0.shape[0], config.cond_drop_prob)
  labels = (jnp.where(drop, denoiser.null_class, batch['label']) if denoiser.num_classes
            else None)
  cond = dict(cond={k: batch[k] for k in cond_keys}, drop=drop) if cond_keys else {}

  def loss_fn(params, inputs, rng):
    x_t, t, target, weights, labels, cond = inputs
    output = denoiser.apply({'params': params}, x_t, t, labels, train=True,
                            rngs={'dropout': rng}, **cond)
    loss, _ = losses.diffusion_loss(output, target, weights)  # float32 whatever the dtype.
    return loss

  inputs = (x_t, t.astype(jnp.float32), target, weights, labels, cond)
  loss, grads = grad_accum.mean_value_and_grad(loss_fn, state.params, inputs, rng_dropout,
                                               config.grad_accum_steps)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'lr': lr_schedule(state.step)}
  return state.apply_gradients(grads, ema_decay=config.ema_decay), metrics


# ------------------------------------------------------------------ loop ----


def _train_batches(config: ml_collections.ConfigDict, mesh, start_step: int,
                   features: conditioning.Features | None = None) -> Iterator[Batch]:
  # The data order is a function of (seed, step): a resumed run sees exactly the
  # batches an uninterrupted one would.
  ds = input_pipeline.create_dataset(config.data, config.data.train_split, train=True,
                                     seed=config.seed, start_step=start_step, features=features)
  for batch in ds.as_numpy_iterator():
    yield sharding.global_batch(batch, mesh)  # Image, label and conditioning features.


def _check_finite(stage: str, step: int, metrics: dict[str, float],
                  manager) -> None:
  if not np.isfinite(metrics['loss']):
    kept = checkpointing.last_saved_step(manager)  # Saved states are checked finite.
    last = f'step {kept}' if kept is not None else 'none'
    raise UserError(f'{stage}: loss is {metrics["loss"]} at step {step}; stopped without '
                    f'saving (last finite checkpoint: {last})')


def _run_stage(stage: str, state: TrainState, step_fn: Callable, batches: Iterator[Batch],
               *, num_train_steps: int, manager, writer, config: ml_collections.ConfigDict,
               on_images: Callable[[TrainState], None] | None = None,
               on_eval: Callable[[TrainState], None] | None = None,
               log_dir: str = '') -> TrainState:
  """Steps `state` to `num_train_steps` with logging, checkpoints, images and evaluations."""
  train_config = config.train
  start = int(jax.device_get(state.step))
  is_main = jax.process_index() == 0
  history: list[Metrics] = []
  last_time, last_step = time.perf_counter(), start
  profiler = observe.StepProfiler(train_config.get('profile_steps', 0) if log_dir else 0,
                                  start, log_dir)
  with tqdm.tqdm(total=num_train_steps, initial=start, desc=stage, unit='step',
                 disable=not is_main, dynamic_ncols=True, mininterval=1.0) as bar:
    for step in range(start + 1, num_train_steps + 1):
      profiler.before(step)
      state, metrics = step_fn(state, next(batches))
      profiler.after(step, metrics)
      history.append(metrics)
      bar.update(1)
      final = step == num_train_steps
      save_now = step % train_config.checkpoint_every == 0 or final
      if step % train_config.log_every == 0 or save_now:
        history = jax.device_get(history)  # Replicated scalars: every process has them.
        summary = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
        history = []
        _check_finite(stage, step, summary, manager)
        now = time.perf_counter()
        summary['steps_per_sec'] = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        bar.set_postfix(loss=f'{summary["loss"]:.4f}')
        if writer is not None:
          for name, value in summary.items():
            writer.scalar(f'train/{name}', value, step)
          writer.flush()
      preempted = preemption.reached()
      if save_now or preempted:
        checkpointing.save(manager, state, config)  # Refuses a non-finite state.
      if preempted:
        checkpointing.finish(manager)
        raise preemption.Preempted(stage, step)
      # Every process runs the callback: it computes over the global mesh; only
      # process 0 has a writer.
      if on_images and (
          (train_config.image_every and step % train_config.image_every == 0) or final):
        on_images(state)
      if on_eval and train_config.eval_every and step % train_config.eval_every == 0:
        on_eval(state)
  profiler.stop()
  checkpointing.finish(manager)
  return state


# ------------------------------------------------------------- stage 1 -----


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh):
  """Trains (or resumes, or skips when finished) stage 1; returns (model, params)."""
  if config.autoencoder.workdir or config.autoencoder.pretrained:
    logging.info('autoencoder: using %s', config.autoencoder.workdir or config.autoencoder.pretrained)
    return stages.restore_autoencoder(config, workdir, mesh)
  if stages.is_identity_first_stage(config):
    logging.info('autoencoder: identity (pixel-space diffusion); nothing to train')
    return stages.restore_autoencoder(config, workdir, mesh)
  model, tx, lr_schedule, abstract = stages.autoencoder_setup(config, mesh)
  manager = checkpointing.make_manager(stages.checkpoint_dir(workdir, 'autoencoder'),
                                       keep=config.train.keep_checkpoints)
  state_sharding = stages.shardings(abstract)
  init = jax.jit(functools.partial(stages.init_autoencoder_state, config, model, tx),
                 out_shardings=state_sharding)
  num_steps = config.autoencoder.num_train_steps
  state, finished = stages.start('autoencoder', manager, init, abstract, num_steps)
  if finished:
    return model, state.ema_params

  sharding.check_batch_size(config.data.batch_size, mesh)
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  if first_stage.uses_objective(config):
    step_fn = _first_stage_step_fn(config, model, lr_schedule, state_sharding, mesh)
  else:
    step_fn = layouts.StateStep(
        functools.partial(autoencoder_train_step, model=model, config=config,
                          lr_schedule=lr_schedule),
        state_sharding, (data,), replicated, layouts.state_layouts(config))
  writer = stages.summary_writer(workdir, 'autoencoder', config)
  eval_batches = _eval_batches(config, mesh)
  reconstruct = jax.jit(lambda p, x: model.apply({'params': p}, x)[0],
                        in_shardings=(state_sharding.ema_params, data), out_shardings=data)

  def on_images(state):
    images = eval_batches[0]['image']
    originals, reconstructions = (
        np.asarray(multihost_utils.process_allgather(x, tiled=True))[:8]
        for x in (images, reconstruct(state.ema_params, images)))
    if writer is not None:
      pairs = input_pipeline.postprocess(np.concatenate([originals, reconstructions]))
      writer.image('autoencoder/reconstructions', image_io.make_grid(pairs, ncols=8),
                   int(state.step))

  state = _run_stage('autoencoder', state, step_fn, _train_batches(config, mesh, int(state.step)),
                     num_train_steps=num_steps, manager=manager, writer=writer, config=config,
                     on_images=on_images, log_dir=stages.tensorboard_dir(workdir, 'autoencoder'))
  psnr = reconstruction_psnr(reconstruct, state.ema_params, eval_batches)
  logging.info('autoencoder: %s-split reconstruction PSNR %.2f dB', config.data.eval_split, psnr)
  if jax.process_index() == 0:
    print(f'autoencoder: {config.data.eval_split}-split reconstruction PSNR {psnr:.2f} dB')
  if writer:
    writer.scalar(f'eval/psnr_{config.data.eval_split}', psnr, int(state.step))
    writer.flush()
  return model, state.ema_params


def _first_stage_step_fn(config: ml_collections.ConfigDict, model: nn.Module,
                         lr_schedule: optax.Schedule, state_sharding, mesh) -> Callable:
  """`step_fn(state, batch)` of the LPIPS / PatchGAN / VQ objective (`first_stage.py`)."""
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  lpips_params = first_stage.load_lpips_params(config)
  if lpips_params is not None:
    lpips_params = jax.device_put(lpips_params, replicated)
  step = layouts.StateStep(first_stage.make_train_step(config, model, lr_schedule),
                          state_sharding, (data, replicated), replicated,
                          layouts.state_layouts(config))
  return lambda state, batch: step(state, batch, lpips_params)


def _eval_batches(config: ml_collections.ConfigDict, mesh) -> list[Batch]:
  ds = input_pipeline.create_dataset(config.data, config.data.eval_split, train=False,
                                     seed=config.seed)
  return [sharding.global_batch(b, mesh) for b in ds.as_numpy_iterator()]


def reconstruction_psnr(reconstruct: Callable, params, batches: list[Batch]) -> float:
  """Mean PSNR (dB, data range 2) over the real (unpadded) examples of `batches`."""
  total, count = 0.0, 0.0
  for batch in batches:
    values = losses.psnr(reconstruct(params, batch['image']), batch['image'])
    # Each process holds part of the batch: gather the whole before summing.
    values, mask = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                    for x in (values, batch['mask']))
    total += float(np.sum(values * mask))
    count += float(mask.sum())
  return total / count


# ------------------------------------------------------------- stage 2 -----


class EncodedLatents:
  """Stage-2 batches encoded from image batches on the fly (no latent cache)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, autoencoder: nn.Module,
               ae_params, features: conditioning.Features | None = None):
    self._config, self._mesh, self._ae_params = config, mesh, ae_params
    self._features = features
    self._encode = jax.jit(functools.partial(encode_batch, autoencoder=autoencoder),
                           in_shardings=(stages.shardings(ae_params), sharding.data_sharding(mesh)),
                           out_shardings=sharding.data_sharding(mesh))

  def scale_factor(self) -> float:
    """1/std of posterior draws over the first training batch (exact moments)."""
    first = next(self.batches(0))
    moments = latent_cache.posterior_moments(
        *(multihost_utils.process_allgather(first[k], tiled=True)
          for k in ('latent_mean', 'latent_logvar')))
    return latent_cache.scale_factor_from_moments(moments)

  def batches(self, start_step: int) -> Iterator[Batch]:
    for batch in _train_batches(self._config, self._mesh, start_step, self._features):
      yield self._encode(self._ae_params, batch)


class CachedLatents:
  """Stage-2 batches from `WORKDIR/latents`, built (or rebuilt) first if needed."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh,
               autoencoder: nn.Module, ae_params):
    self._config, self._mesh = config, mesh
    self._arrays = latent_cache.load(
        latent_cache.build(config, workdir, mesh, autoencoder, ae_params))

  def scale_factor(self) -> float:
    """1/std of posterior draws over the whole cache."""
    return latent_cache.cached_scale_factor(self._arrays)

  def batches(self, start_step: int) -> Iterator[Batch]:
    config = self._config
    local = latent_cache.batches(self._arrays, config.data.batch_size // jax.process_count(),
                                 seed=config.seed, start_step=start_step,
                                 random_flip=config.data.random_flip)
    for batch in local:
      yield sharding.global_batch(batch, self._mesh)


def initial_scale_factor(config: ml_collections.ConfigDict, latents) -> float:
  """`diffusion.scale_factor`, a pretrained VAE's `scaling_factor`, or 1/std of `latents`."""
  if config.diffusion.scale_factor > 0:
    return float(config.diffusion.scale_factor)
  if config.autoencoder.pretrained:
    return pretrained.scaling_factor(config.autoencoder.pretrained)
  return latents.scale_factor()


def train_diffusion(config: ml_collections.ConfigDict, workdir: str, mesh,
                    autoencoder: nn.Module, ae_params, *,
                    make_hooks: MakeHooks | None = None) -> tuple[nn.Module, DiffusionTrainState]:
  """Trains (or resumes, or skips when finished) stage 2.

  Args:
    config: the run's config.
    workdir: the run's directory.
    mesh: the device mesh.
    autoencoder, ae_params: the trained stage 1.
    make_hooks: builds the (on_images, on_eval) hooks of the loop, e.g. sampling
      and evaluation (see `ldm_jax.modes`); None = neither.

  Returns:
    (denoiser, state); with LoRA the state's params are merged into full denoiser params.
  """
  ckpt_dir = stages.checkpoint_dir(workdir, 'diffusion')
  denoiser, tx, lr_schedule, abstract = stages.diffusion_setup(config, mesh)
  manager = checkpointing.make_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  sharding.check_batch_size(config.data.batch_size, mesh)
  sharding.check_batch_size(config.data.batch_size // config.diffusion.grad_accum_steps, mesh,
                            'data.batch_size / diffusion.grad_accum_steps')
  vocabulary = conditioning.load_or_build_vocabulary(
      config, stages.vocabulary_path(workdir), build=True)
  features = conditioning.pipeline_features(config, vocabulary, train=True)
  # Built on first use: a finished stage needs neither the cache nor the encoder.
  latents = functools.cache(
      lambda: CachedLatents(config, workdir, mesh, autoencoder, ae_params)
      if config.diffusion.cache_latents
      else EncodedLatents(config, mesh, autoencoder, ae_params, features))
  base = finetune.base_params(config, ckpt_dir, mesh, create=True)  # None without LoRA.
  state_sharding = stages.shardings(abstract)

  def init():
    scale = initial_scale_factor(config, latents())
    logging.info('diffusion: scale_factor %.5f', scale)
    init_fn = functools.partial(stages.init_diffusion_state, config, denoiser, tx)
    return jax.jit(init_fn, out_shardings=state_sharding)(
        scale, finetune.start_params(config, base))

  num_steps = config.diffusion.num_train_steps
  state, finished = stages.start('diffusion', manager, init, abstract, num_steps)
  if finished:
    return denoiser, finetune.with_full_params(config, state, base)

  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  step_fn = layouts.StateStep(
      finetune.with_base(config, functools.partial(
          diffusion_train_step, config=config, lr_schedule=lr_schedule), denoiser),
      state_sharding, (data, replicated, replicated), replicated, layouts.state_layouts(config))
  schedule = builders.make_schedule(config)
  writer = stages.summary_writer(workdir, 'diffusion', config)
  on_images, on_eval = make_hooks(denoiser, writer) if make_hooks else (None, None)
  with_full = lambda hook: hook and (
      lambda state: hook(finetune.with_full_params(config, state, base)))
  state = _run_stage('diffusion', state, lambda s, b: step_fn(s, b, schedule, base),
                     latents().batches(int(state.step)),
                     num_train_steps=num_steps, manager=manager, writer=writer, config=config,
                     on_images=with_full(on_images), on_eval=with_full(on_eval),
                     log_dir=stages.tensorboard_dir(workdir, 'diffusion'))
  return denoiser, finetune.with_full_params(config, state, base)
