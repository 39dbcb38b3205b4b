"""`--mode`s of a Stable Diffusion config (configs/stable_diffusion.py).

`modes.run` dispatches here when `config.pipeline == 'stable_diffusion'`: it
validates with `check_config` (and `MODE_CHECKS`), builds the mesh, and calls the
mode of `MODES` with (config, workdir, mesh, options) like every other mode. The
U-Net, CLIP text encoder, VAE and schedule all come from the pretrained pipeline
folder (`ldm_jax.stable_diffusion`), not from `config.diffusion.model`, and CLIP
and the VAE stay frozen, so this module has its own train step and restore.

  train       fine-tune the U-Net on a captioned dataset, CLIP and the VAE frozen:
              LoRA adapters (`diffusion.lora.rank > 0`) or the whole U-Net.
              Checkpoints under WORKDIR/diffusion/checkpoints; SIGTERM saves and
              exits 0, and rerunning resumes bit-identically. With
              `diffusion.cache_latents` the VAE posteriors and CLIP embeddings of
              the captions are computed once into WORKDIR/sd_latents/.
  sample      images for --prompt (and --negative_prompt) into WORKDIR/samples/,
              with the fine-tuned weights when WORKDIR has a checkpoint.
  edit        img2img or inpainting of `edit.input` in latent space, guided by
              --prompt, into WORKDIR/edits/.
  merge_lora  the trained U-Net (LoRA merged into its base) as a full diffusers
              folder WORKDIR/export/; LoRA runs also write their adapters as
              WORKDIR/export_lora/pytorch_lora_weights.safetensors (diffusers'
              `load_lora_weights`).

Paths are `ldm_jax.stages`'s.

Every step's randomness is `fold_in(state.rng, step)` and the data order a function
of (seed, step), so a resumed run equals an uninterrupted one.
"""
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ldm_jax import (checkpointing, diffusion, editing, fileio, input_pipeline, latent_cache,
                     layouts, lora, observe, optim, preemption, schedulers, sharding, stages,
                     train, train_state)
from ldm_jax import images as image_io
from ldm_jax import stable_diffusion as sd
from ldm_jax.errors import UserError

Params = Any
STAGE = 'diffusion'


def is_stable_diffusion(config: ml_collections.ConfigDict) -> bool:
  return config.get('pipeline', '') == 'stable_diffusion'


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `UserError` for a field of a Stable Diffusion config that cannot work."""
  if not config.pretrained:
    raise UserError('config.pretrained is empty; accepted: a diffusers Stable Diffusion '
                    'folder or Hub repo id, e.g. --config.pretrained=stable-diffusion-v1-5/'
                    'stable-diffusion-v1-5')
  if config.data.num_channels != 3:
    raise UserError(f'config.data.num_channels={config.data.num_channels}; accepted: 3 (the '
                    f'Stable Diffusion VAE takes RGB)')
  if config.sample.method not in schedulers.METHODS:
    raise UserError(f'config.sample.method={config.sample.method!r}; accepted: '
                    f'{", ".join(schedulers.METHODS)}')
  if config.diffusion.cache_latents and config.data.random_flip:
    raise UserError('config.diffusion.cache_latents=True caches unflipped images; accepted: '
                    'config.data.random_flip=False')
  observe.check_report_to(config.train.get('report_to', 'tensorboard'))
  lora_config = config.diffusion.lora
  if lora_config.rank < 0 or (lora_config.rank and not lora_config.targets):
    raise UserError(f'config.diffusion.lora.rank={lora_config.rank} with targets='
                    f'{tuple(lora_config.targets)}; accepted: rank >= 0 and, with rank > 0, '
                    f'some of {", ".join(lora.TRANSFORMER_ATTENTION_TARGETS)}')


def _lora_scale(config: ml_collections.ConfigDict) -> float:
  return config.diffusion.lora.alpha / config.diffusion.lora.rank


# ------------------------------------------------------------------ train ----


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The few settings the train step reads (hashable: static under jit)."""

  unet: Any
  text_encoder: Any
  vae: Any
  prediction_type: str
  scaling_factor: float
  lora_scale: float  # 0: full fine-tuning
  cond_drop_prob: float
  ema_decay: float


def loss_fn(trainable: Params, frozen: Params, batch: dict[str, jax.Array], rng: jax.Array,
            alphas_cumprod: jax.Array, spec: StepSpec) -> jax.Array:
  """The denoising loss of SD fine-tuning on one batch.

  Args:
    trainable: LoRA adapters (spec.lora_scale > 0) or the U-Net's parameters.
    frozen: {'unet' (the LoRA base; unused otherwise), 'text_encoder', 'vae'}.
    batch: 'image' [B, H, W, 3] in [-1, 1], 'tokens' [B, 77], 'null_tokens' [1, 77];
      or from the cache 'latent_mean', 'latent_logvar' [B, h, w, 4], 'context'
      [B, 77, D], 'null_context' [1, 77, D].
    rng: this step's key.
    alphas_cumprod: [T] of the pipeline's scheduler.
    spec: see `StepSpec`.
  """
  unet_params = (lora.merge(frozen['unet'], trainable, spec.lora_scale) if spec.lora_scale
                 else trainable)
  k_latent, k_t, k_noise, k_drop = jax.random.split(rng, 4)
  if 'latent_mean' in batch:  # From the cache (a fixed batch layout: one program each).
    mean, logvar = batch['latent_mean'], batch['latent_logvar']
  else:
    mean, logvar = spec.vae.apply({'params': frozen['vae']}, batch['image'],
                                  method=spec.vae.encode)
  z0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape))
  z0 = jax.lax.stop_gradient(z0 * spec.scaling_factor)  # [B, h, w, 4]
  b = z0.shape[0]
  drop = jax.random.uniform(k_drop, (b,)) < spec.cond_drop_prob
  if 'context' in batch:
    context = jnp.where(drop[:, None, None], batch['null_context'], batch['context'])
  else:
    tokens = jnp.where(drop[:, None], batch['null_tokens'], batch['tokens'])
    context = spec.text_encoder.apply({'params': frozen['text_encoder']}, tokens)
  context = jax.lax.stop_gradient(context)
  t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(k_noise, z0.shape)
  a = alphas_cumprod[t][:, None, None, None]
  x_t = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * noise
  if spec.prediction_type == 'v_prediction':
    target = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * z0
  elif spec.prediction_type == 'sample':
    target = z0
  else:
    target = noise
  pred = spec.unet.apply({'params': unet_params}, x_t, t.astype(jnp.float32), context=context)
  return jnp.mean((pred - target) ** 2)


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], frozen: Params,
               alphas_cumprod: jax.Array, *, spec: StepSpec):
  """One optimizer step: (state, batch) -> (state, metrics)."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch, rng, alphas_cumprod,
                                            spec)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
  return state.apply_gradients(grads, ema_decay=spec.ema_decay), metrics


def _record_base(workdir: str, pretrained: str) -> None:
  """Records which pipeline the run fine-tunes; a rerun with another one stops."""
  record = stages.pretrained_record_path(workdir)
  if fileio.exists(record):
    recorded = fileio.read_json(record)['pretrained']
    if recorded != pretrained:
      raise UserError(f'config.pretrained={pretrained!r}, but {workdir} fine-tunes '
                      f'{recorded!r}; accepted: that pipeline, or a new workdir')
  elif jax.process_index() == 0:
    fileio.write_json(record, {'pretrained': pretrained})


def _batches(config: ml_collections.ConfigDict, pipe: sd.StableDiffusion, mesh,
             start_step: int) -> Iterator[dict[str, jax.Array]]:
  """Images and tokenized captions; the order is a function of (seed, step)."""
  key = config.data.caption_key
  ds = input_pipeline.create_dataset(
      config.data, config.data.train_split, train=True, seed=config.seed, start_step=start_step,
      features=lambda example, image: {'caption': example[key]})
  null_tokens = jax.device_put(pipe.tokenizer(['']), sharding.replicated(mesh))
  for batch in ds.as_numpy_iterator():
    captions = [c.decode('utf-8') for c in batch.pop('caption')]
    batch = {'image': batch['image'], 'tokens': pipe.tokenizer(captions)}
    batch = sharding.global_batch(batch, mesh)
    batch['null_tokens'] = null_tokens
    yield batch


def _cache_fingerprint(config, pipe: sd.StableDiffusion) -> dict:
  data = {k: config.data[k] for k in ('name', 'train_split', 'image_size', 'num_channels',
                                      'image_key', 'caption_key')}
  data.update(input_pipeline.source_identity(config.data))  # An image folder's contents.
  return {'pretrained': config.pretrained, 'data': data,
          'vae': latent_cache.params_sha256(pipe.params['vae']),
          'text_encoder': latent_cache.params_sha256(pipe.params['text_encoder'])}


def build_cache(config, workdir: str, pipe: sd.StableDiffusion) -> dict[str, np.ndarray]:
  """The train split's VAE posteriors and caption embeddings, from `stages.sd_latents_dir`.

  Encoded on first use (one ordered pass) and rebuilt when the pipeline or the data
  settings differ from those recorded in its fingerprint.json.

  Returns:
    'latent_mean', 'latent_logvar' [N, h, w, 4], 'context' [N, 77, D] float32 and
    'label' [N] (zeros), in the split's order.
  """
  if jax.process_count() > 1:
    raise UserError('config.diffusion.cache_latents=True runs on one process; accepted: '
                    'cache_latents=False for multi-process fine-tuning')
  directory = stages.sd_latents_dir(workdir)
  file, record = os.path.join(directory, 'cache.npz'), os.path.join(directory, 'fingerprint.json')
  expected = _cache_fingerprint(config, pipe)
  if fileio.exists(file) and fileio.exists(record):
    if fileio.read_json(record) == expected:
      logging.info('%s: reusing the latent and caption cache in %s', STAGE, directory)
      return fileio.load_npz(file)
    logging.info('%s: the cache in %s is for other settings; rebuilding', STAGE, directory)
  key = config.data.caption_key
  ds = input_pipeline.create_dataset(config.data, config.data.train_split, train=False,
                                     seed=config.seed,
                                     features=lambda example, image: {'caption': example[key]})
  encode_images = jax.jit(lambda p, x: pipe.vae.apply({'params': p}, x, method=pipe.vae.encode))
  parts = []
  for batch in observe.progress(ds.as_numpy_iterator(), total=observe.known_length(ds),
                                desc='encoding latents and captions'):
    keep = batch['mask'] > 0
    captions = [c.decode('utf-8') for c in batch['caption']]
    mean, logvar = encode_images(pipe.params['vae'], batch['image'])
    parts.append({'latent_mean': np.asarray(mean)[keep], 'latent_logvar': np.asarray(logvar)[keep],
                  'context': np.asarray(pipe.encode_prompt(captions))[keep]})
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  arrays['label'] = np.zeros(len(arrays['context']), np.int32)
  fileio.save_npz(file, **arrays)
  fileio.write_json(record, expected)
  logging.info('%s: cached %d latents and caption embeddings in %s', STAGE,
               len(arrays['label']), directory)
  return arrays


def _cached_batches(config, pipe: sd.StableDiffusion, mesh, arrays: dict[str, np.ndarray],
                    start_step: int) -> Iterator[dict[str, jax.Array]]:
  """Batches of cached posteriors and caption embeddings; the order is a function of step."""
  null_context = jax.device_put(np.asarray(pipe.encode_prompt([''])), sharding.replicated(mesh))
  # Every cached array besides the latents is batched alongside them: here 'context'.
  for batch in latent_cache.batches(arrays, config.data.batch_size, seed=config.seed,
                                    start_step=start_step):
    batch.pop('label')
    batch = sharding.global_batch(batch, mesh)
    batch['null_context'] = null_context
    yield batch


def _spec(config, pipe: sd.StableDiffusion) -> StepSpec:
  return StepSpec(unet=pipe.unet_model, text_encoder=pipe.text_encoder, vae=pipe.vae,
                  prediction_type=pipe.scheduler.prediction_type,
                  scaling_factor=pipe.scaling_factor,
                  lora_scale=_lora_scale(config) if config.diffusion.lora.rank else 0.0,
                  cond_drop_prob=float(config.diffusion.cond_drop_prob),
                  ema_decay=float(config.diffusion.ema_decay))


def _init_state(config, pipe: sd.StableDiffusion) -> train_state.TrainState:
  tx, _ = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  rng = jax.random.PRNGKey(config.seed)
  params = pipe.params['unet']
  if config.diffusion.lora.rank:
    params = lora.init_adapters(jax.random.fold_in(rng, 1), params,
                                rank=config.diffusion.lora.rank,
                                targets=tuple(config.diffusion.lora.targets))
  return train_state.create_train_state(params, tx, jax.random.fold_in(rng, 2))


def _manager(config, workdir: str, *, read_only: bool = False):
  return checkpointing.make_manager(stages.checkpoint_dir(workdir, STAGE),
                                    keep=config.train.keep_checkpoints, read_only=read_only)


def _abstract_state(config, pipe: sd.StableDiffusion, mesh):
  """The state's shapes, replicated over the mesh (as the train step keeps it)."""
  return checkpointing.abstract_like(jax.eval_shape(lambda: _init_state(config, pipe)),
                                     sharding.replicated(mesh))


def train_mode(config: ml_collections.ConfigDict, workdir: str, mesh,
               options) -> train_state.TrainState:
  """Fine-tunes the pipeline's U-Net (see the module docstring); returns the final state."""
  del options
  pipe = sd.load(config.pretrained)
  stages.prepare_workdir(workdir)
  _record_base(workdir, config.pretrained)
  stages.save_config(config, workdir)
  manager = _manager(config, workdir)
  what = 'LoRA' if config.diffusion.lora.rank else 'U-Net'
  state, finished = stages.start(f'{STAGE} ({what})', manager,
                                 lambda: _init_state(config, pipe),
                                 _abstract_state(config, pipe, mesh),
                                 config.diffusion.num_train_steps)
  if finished:
    return state
  start = int(jax.device_get(state.step))
  # Everything but the batch replicated over the mesh, as the step returns the state:
  # the step then compiles once.
  replicated = sharding.replicated(mesh)
  state = jax.device_put(state, replicated)
  frozen = jax.device_put(
      {'unet': pipe.params['unet'] if config.diffusion.lora.rank else {},
       'text_encoder': pipe.params['text_encoder'], 'vae': pipe.params['vae']}, replicated)
  abar = jax.device_put(schedulers.alphas_cumprod(pipe.scheduler), replicated)
  spec = _spec(config, pipe)
  step = layouts.StateStep(functools.partial(train_step, spec=spec), replicated, None, replicated,
                           layouts.state_layouts(config))
  step_fn = lambda state, batch: step(state, batch, frozen, abar)
  writer = stages.summary_writer(workdir, STAGE, config)
  if config.diffusion.cache_latents:
    batches = _cached_batches(config, pipe, mesh, build_cache(config, workdir, pipe), start)
  else:
    batches = _batches(config, pipe, mesh, start)
  with preemption.handle_sigterm():
    state = train._run_stage(  # pylint: disable=protected-access
        STAGE, state, step_fn, batches, num_train_steps=config.diffusion.num_train_steps,
        manager=manager, writer=writer, config=config,
        log_dir=stages.tensorboard_dir(workdir, STAGE))
  if config.diffusion.lora.rank and jax.process_index() == 0:
    sd.save_lora(jax.device_get(state.ema_params), _lora_scale(config), pipe.params['unet'],
                 stages.lora_dir(workdir))
  return state


def trained_unet_params(config: ml_collections.ConfigDict, workdir: str,
                        pipe: sd.StableDiffusion, mesh
                        ) -> tuple[Params, Params | None, int] | None:
  """(U-Net params, LoRA adapters or None, step) of WORKDIR's latest checkpoint, or None."""
  if not fileio.isdir(stages.checkpoint_dir(workdir, STAGE)):
    return None
  manager = _manager(config, workdir, read_only=True)
  if manager.latest_step() is None:
    return None
  _record_base(workdir, config.pretrained)
  state = checkpointing.restore(manager, _abstract_state(config, pipe, mesh))
  ema = jax.device_get(state.ema_params)
  step = int(jax.device_get(state.step))
  if config.diffusion.lora.rank:
    return lora.merge(pipe.params['unet'], ema, _lora_scale(config)), ema, step
  return ema, None, step


# ----------------------------------------------------------------- sample ----


def _prompts(prompts: Sequence[str] | None, negative: Sequence[str] | None
             ) -> tuple[list[str], list[str] | None]:
  if not prompts:
    raise UserError('a Stable Diffusion config samples from text; accepted: --prompt="..." '
                    '(repeatable)')
  if negative and len(negative) not in (1, len(prompts)):
    raise UserError(f'{len(negative)} --negative_prompt for {len(prompts)} --prompt; accepted: '
                    f'one, or one per prompt')
  if negative and len(negative) == 1:
    negative = list(negative) * len(prompts)
  return list(prompts), (list(negative) if negative else None)


def _save_images(images: np.ndarray, directory: str, stem: str) -> list[str]:
  paths = []
  for i, image in enumerate(np.asarray(images)):
    path = os.path.join(directory, f'{stem}_{i:03d}.png')
    fileio.write_atomic(path, image_io.png_bytes(np.round(image * 255).astype(np.uint8)))
    paths.append(path)
  return paths


def _with_trained_weights(config, workdir: str, pipe: sd.StableDiffusion,
                          mesh) -> sd.StableDiffusion:
  trained = trained_unet_params(config, workdir, pipe, mesh)
  if trained is not None:
    logging.info('%s: using the fine-tuned U-Net of step %d', STAGE, trained[2])
    pipe.params = {**pipe.params, 'unet': trained[0]}
  return pipe


def sample_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options) -> list[str]:
  """Writes `options.num_samples` (or `sample.num_samples`) images per prompt of
  `options.prompts` (guided away from `options.negative_prompts`) to WORKDIR/samples/;
  returns their paths."""
  # Before loading anything.
  prompts, negative = _prompts(options.prompts, options.negative_prompts)
  pipe = _with_trained_weights(config, workdir, sd.load(config.pretrained), mesh)
  count = options.num_samples or config.sample.num_samples
  size = config.sample.image_size or None
  images = []
  for i in observe.progress(range(count), desc='sampling'):  # One batch: every prompt.
    images.append(np.asarray(pipe(
        prompts, negative, num_steps=config.sample.num_steps,
        guidance_scale=config.sample.guidance_scale, method=config.sample.method,
        seed=config.seed + i, height=size, width=size)))
  images = np.stack(images, axis=1).reshape(-1, *images[0].shape[1:])  # prompt-major
  paths = _save_images(images, stages.samples_dir(workdir), 'sd')
  if jax.process_index() == 0:
    print(f'samples: {stages.samples_dir(workdir)} ({len(paths)} images)')
  return paths


# ------------------------------------------------------------- merge_lora ----


def merge_lora_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options) -> str:
  """Writes the fine-tuned pipeline as WORKDIR/export (and the LoRA file); returns the folder."""
  del options
  export = stages.export_dir(workdir)
  if fileio.exists(export):
    raise UserError(f'{export} already exists; accepted: remove it first')
  pipe = sd.load(config.pretrained)
  trained = trained_unet_params(config, workdir, pipe, mesh)
  if trained is None:
    raise UserError(f'no fine-tuning checkpoint in {stages.checkpoint_dir(workdir, STAGE)}; '
                    f'run --mode=train first')
  unet_params, adapters, step = trained
  if jax.process_index() == 0:
    sd.save(pipe, export, unet_params=unet_params)
    print(f'pipeline (step {step}): {export}')
    if adapters is not None:
      file = sd.save_lora(adapters, _lora_scale(config), pipe.params['unet'],
                          stages.export_lora_dir(workdir))
      print(f'LoRA: {file}')
  return export


# ------------------------------------------------------------------- edit ----


def _schedule(c: schedulers.SchedulerConfig) -> diffusion.Schedule:
  """ldm_jax's schedule with the pipeline scheduler's abar (for `editing`'s samplers)."""
  abar = schedulers.alphas_cumprod(c).astype(np.float64)
  return diffusion.schedule_from_betas(1 - abar / np.concatenate([[1.0], abar[:-1]]))


def check_edit(config: ml_collections.ConfigDict, options) -> None:
  """`editing.validate_edit_config` without class labels (a text-guided pipeline)."""
  del options  # The prompts are read by the mode itself.
  editing.validate_edit_config(config, class_labels=False)


def edit_mode(config: ml_collections.ConfigDict, workdir: str, mesh, options) -> list[str]:
  """img2img (SDEdit) or inpainting (RePaint) of `edit.input` in latent space.

  Uses `editing.img2img` / `editing.inpaint` with the pipeline's U-Net, schedule and
  prediction type, guided by the one prompt of `options.prompts` (and away from
  `options.negative_prompts`) at `sample.guidance_scale`. Writes `edit.num_samples`
  images WORKDIR/edits/sd_edit_<i>.png; returns their paths.
  """
  prompts, negative = _prompts(options.prompts, options.negative_prompts)
  if len(prompts) != 1:
    raise UserError(f'--mode=edit takes one --prompt, got {len(prompts)}')
  edit = config.edit
  pipe = sd.load(config.pretrained)
  size = config.sample.image_size or pipe.sample_size
  image = editing.load_image(edit.input, size, 3)  # [H, W, 3] in [-1, 1]
  known_pixels = editing.load_mask(edit.mask, size) if edit.task == 'inpaint' else None
  pipe = _with_trained_weights(config, workdir, pipe, mesh)
  n = edit.num_samples  # Rows edited with their own noise.
  latents = jnp.repeat(pipe.encode(jnp.asarray(image[None])), n, axis=0)
  context = jnp.repeat(pipe.encode_prompt(prompts), n, axis=0)
  uncond = jnp.repeat(pipe.encode_prompt(negative or ['']), n, axis=0)
  unet, params = pipe.unet_model, pipe.params['unet']
  model_fn = lambda x, t, c: unet.apply({'params': params}, x, t, context=c)
  options = dict(num_steps=config.sample.num_steps,
                 prediction_type=schedulers.PREDICTION_NAMES[pipe.scheduler.prediction_type],
                 guidance_scale=float(config.sample.guidance_scale), cond=context,
                 null_cond=uncond)
  rng = jax.random.PRNGKey(config.seed)
  schedule = _schedule(pipe.scheduler)
  if edit.task == 'inpaint':
    factor = pipe.vae_scale_factor
    known = editing.latent_known_mask(known_pixels, factor)[None]
    edited = editing.inpaint(model_fn, schedule, latents, known, rng,
                             jump_length=edit.jump_length, jump_n_sample=edit.jump_n_sample,
                             **options)
  else:
    edited = editing.img2img(model_fn, schedule, latents, float(edit.strength), rng,
                             method=config.sample.method, **options)
  images = pipe.decode(edited)  # [n, H, W, 3] in [0, 1]
  if known_pixels is not None:  # The decoder only approximates the kept pixels.
    images = jnp.where(known_pixels[None] > 0.5, image[None] / 2 + 0.5, images)
  paths = _save_images(np.asarray(images), stages.edits_dir(workdir), 'sd_edit')
  if jax.process_index() == 0:
    print(f'edits: {stages.edits_dir(workdir)} ({len(paths)} images)')
  return paths


MODES: dict[str, Callable] = {
    'train': train_mode,
    'sample': sample_mode,
    'edit': edit_mode,
    'merge_lora': merge_lora_mode,
}
# Checks of a mode's own config section, run with `check_config` before any work.
MODE_CHECKS: dict[str, Callable[..., None]] = {
    'edit': check_edit,
}
