"""Stable Diffusion 1.x / 2.x pipelines from diffusers folders, in JAX (no PyTorch).

    from ldm_jax import stable_diffusion as sd
    pipe = sd.load('stabilityai/stable-diffusion-2-1-base')   # or a local folder
    context = pipe.encode_prompt(['a photo of a cat'])          # [B, 77, D] float32
    eps = pipe.unet(latents, timesteps, context)                # NHWC latents [B, h, w, 4]
    images = pipe(['a photo of a cat'], num_steps=50, guidance_scale=7.5, method='ddim')

A diffusers Stable Diffusion folder has `model_index.json` and the components
`vae/` (AutoencoderKL), `unet/` (UNet2DConditionModel), `text_encoder/`
(CLIPTextModel, `model.safetensors`), `tokenizer/` (vocab.json, merges.txt) and
`scheduler/` (scheduler_config.json). They map onto ldm_jax's `AutoencoderKL`, its
`UNet` with spatial transformers (`context_dim` = `cross_attention_dim`, per-level
heads from `attention_head_dim`, `use_linear_projection`), `models.clip.CLIPTextModel`,
`clip_tokenizer.CLIPTokenizer` and `schedulers.SchedulerConfig`. `upcast_attention`
(attention scores in float32) is what these float32 modules always do. A path that
does not exist is taken as a Hub repo id and fetched with
`huggingface_hub.snapshot_download` (safetensors and configs only).

`save` writes a full diffusers folder; `save_lora` writes LoRA adapters of the U-Net
as `pytorch_lora_weights.safetensors` in the layout diffusers'
`pipe.load_lora_weights(folder)` reads (`unet.<module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r], the alpha / r factor folded into lora_B).
"""
import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from ldm_jax import clip_tokenizer, fileio, models, pretrained, schedulers
from ldm_jax.errors import UserError
from ldm_jax.models import AutoencoderKL, UNet
from ldm_jax.models.clip import ACTIVATIONS, CLIPTextModel

Params = Any

MODEL_INDEX = 'model_index.json'
PIPELINE_CLASSES = ('StableDiffusionPipeline',)
COMPONENTS = {  # folder -> accepted classes in model_index.json
    'vae': ('AutoencoderKL',),
    'unet': ('UNet2DConditionModel',),
    'text_encoder': ('CLIPTextModel',),
    'tokenizer': ('CLIPTokenizer', 'CLIPTokenizerFast'),
    'scheduler': None,  # any diffusers scheduler: its schedule fields are read
}
TEXT_ENCODER_WEIGHTS = 'model.safetensors'
SCHEDULER_CONFIG = 'scheduler_config.json'
LORA_FILE = 'pytorch_lora_weights.safetensors'
# The files a Hub download fetches (no .bin / .ckpt duplicates, no safety checker).
HUB_PATTERNS = (MODEL_INDEX, 'scheduler/*.json', 'tokenizer/*', 'text_encoder/config.json',
                f'text_encoder/{TEXT_ENCODER_WEIGHTS}', 'unet/config.json',
                f'unet/{pretrained.WEIGHTS_FILE}', 'vae/config.json',
                f'vae/{pretrained.WEIGHTS_FILE}')

# UNet2DConditionModel options and the values our U-Net represents (diffusers' defaults
# fill keys a config.json omits).
_UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, mid_block_type='UNetMidBlock2DCrossAttn', only_cross_attention=False,
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, dropout=0.0,
    act_fn='silu', norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,
    encoder_hid_dim=None, encoder_hid_dim_type=None, attention_head_dim=8,
    num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift='default', resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type='positional', time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, attention_type='default',
    class_embeddings_concat=False, mid_block_only_cross_attention=None,
    cross_attention_norm=None)
_UNET_FIXED = dict(
    center_input_sample=(False,), mid_block_type=('UNetMidBlock2DCrossAttn',),
    only_cross_attention=(False,), downsample_padding=(1,), mid_block_scale_factor=(1,),
    act_fn=('silu', 'swish'), reverse_transformer_layers_per_block=(None,),
    encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), num_attention_heads=(None,),
    dual_cross_attention=(False,), class_embed_type=(None,), addition_embed_type=(None,),
    num_class_embeds=(None,), resnet_time_scale_shift=('default',),
    resnet_skip_time_act=(False,), resnet_out_scale_factor=(1, 1.0),
    time_embedding_type=('positional',), time_embedding_dim=(None,),
    time_embedding_act_fn=(None,), timestep_post_act=(None,), time_cond_proj_dim=(None,),
    conv_in_kernel=(3,), conv_out_kernel=(3,), attention_type=('default',),
    class_embeddings_concat=(False,), mid_block_only_cross_attention=(None, False),
    cross_attention_norm=(None,))
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act='quick_gelu', layer_norm_eps=1e-5)


# ------------------------------------------------------------ configs ------


def _read_json(file: str, what: str) -> dict[str, Any]:
  if not fileio.exists(file):
    raise UserError(f'{os.path.dirname(file)!r} has no {os.path.basename(file)} ({what})')
  try:
    with fileio.open(file, 'rb') as f:
      value = json.loads(f.read().decode('utf-8'))
  except (*fileio.ERRORS, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'cannot read {file}: {e}') from e
  if not isinstance(value, dict):
    raise UserError(f'{file} does not hold a JSON object')
  return value


def _per_block(value, levels: int, key: str, source: str) -> list:
  values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
  if len(values) != levels:
    raise UserError(f'{source}: {key}={value!r} needs one entry per block ({levels})')
  return values


def unet_from_config(config: Mapping[str, Any], source: str = pretrained.CONFIG_FILE
                     ) -> tuple[UNet, int]:
  """Our `UNet` with the structure of a diffusers `UNet2DConditionModel` config."""
  if config.get('_class_name', 'UNet2DConditionModel') != 'UNet2DConditionModel':
    raise UserError(f'{source}: _class_name is {config["_class_name"]!r}; accepted: '
                    f'UNet2DConditionModel')
  if config.get('addition_embed_type') == 'text_time':
    raise UserError(f"{source}: addition_embed_type='text_time' (an SDXL U-Net) is not "
                    f'supported; accepted: Stable Diffusion 1.x / 2.x U-Nets')
  c = {**_UNET_DEFAULTS, **{k: v for k, v in config.items() if k in _UNET_DEFAULTS}}
  for key, accepted in _UNET_FIXED.items():
    if c[key] not in accepted:
      raise UserError(f'{source}: {key}={c[key]!r} is not supported; accepted: '
                      f'{", ".join(map(repr, accepted))}')
  block_out = list(config['block_out_channels'] if 'block_out_channels' in config
                   else (320, 640, 1280, 1280))
  base, levels = block_out[0], len(block_out)
  if any(ch % base for ch in block_out):
    raise UserError(f'{source}: block_out_channels={block_out} is not supported; accepted: '
                    f'multiples of the first entry {base}')
  attention_levels = pretrained.attention_block_levels(
      config.get('down_block_types', ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D']),
      config.get('up_block_types', ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3),
      levels, 'CrossAttn', source)
  layers = set(_per_block(c['layers_per_block'], levels, 'layers_per_block', source))
  depths = set(_per_block(c['transformer_layers_per_block'], levels,
                          'transformer_layers_per_block', source))
  if len(layers) != 1 or len(depths) != 1:
    raise UserError(f'{source}: layers_per_block={c["layers_per_block"]!r} / '
                    f'transformer_layers_per_block={c["transformer_layers_per_block"]!r} is not '
                    f'supported; accepted: the same number for every block')
  heads = [int(h) for h in _per_block(c['attention_head_dim'], levels, 'attention_head_dim',
                                      source)]
  if isinstance(c['cross_attention_dim'], (list, tuple)):
    raise UserError(f'{source}: cross_attention_dim={c["cross_attention_dim"]!r} is not '
                    f'supported; accepted: one width for every block')
  if c['in_channels'] != c['out_channels']:
    raise UserError(f'{source}: in_channels={c["in_channels"]} (e.g. an inpainting U-Net) is not '
                    f'supported; accepted: out_channels={c["out_channels"]}')
  fields = dict(
      base_channels=base, channel_mult=tuple(ch // base for ch in block_out),
      num_res_blocks=layers.pop(), attention_resolutions=(), attention_levels=attention_levels,
      level_heads=tuple(heads), dropout=float(c['dropout']),
      norm_num_groups=c['norm_num_groups'], norm_eps=float(c['norm_eps']), mid_attention=True,
      context_dim=int(c['cross_attention_dim']), transformer_depth=depths.pop(),
      use_linear_projection=bool(c['use_linear_projection']),
      flip_sin_to_cos=bool(c['flip_sin_to_cos']), freq_shift=float(c['freq_shift']))
  # The U-Net's own field checks (per-level heads included), on the default latent side.
  latent_size = int(config.get('sample_size') or 64)
  try:
    models.check_denoiser_fields('unet', fields, latent_size)
  except ValueError as e:  # FieldError included.
    raise UserError(f'{source}: {e}') from e
  return UNet(out_channels=c['out_channels'], **fields), c['in_channels']


def text_encoder_from_config(config: Mapping[str, Any], source: str = pretrained.CONFIG_FILE
                             ) -> CLIPTextModel:
  """Our `CLIPTextModel` from a transformers `CLIPTextConfig`."""
  architectures = config.get('architectures') or ['CLIPTextModel']
  if architectures != ['CLIPTextModel']:
    raise UserError(f'{source}: architectures={architectures!r} is not supported; accepted: '
                    f"['CLIPTextModel']")
  c = {**_TEXT_DEFAULTS, **{k: v for k, v in config.items() if k in _TEXT_DEFAULTS}}
  if c['hidden_act'] not in ACTIVATIONS:
    raise UserError(f'{source}: hidden_act={c["hidden_act"]!r} is not supported; accepted: '
                    f'{", ".join(ACTIVATIONS)}')
  return CLIPTextModel(
      vocab_size=int(c['vocab_size']), hidden_size=int(c['hidden_size']),
      intermediate_size=int(c['intermediate_size']), num_layers=int(c['num_hidden_layers']),
      num_heads=int(c['num_attention_heads']),
      max_position_embeddings=int(c['max_position_embeddings']), hidden_act=c['hidden_act'],
      layer_norm_eps=float(c['layer_norm_eps']))


def _text_encoder_tensors(file: str) -> dict[str, np.ndarray]:
  """text_encoder/model.safetensors under `text_model.` names (newer files omit the prefix)."""
  tensors = pretrained.read_safetensors(
      file, f'{os.path.dirname(file)!r} has no {os.path.basename(file)}')
  return {(k if k.startswith('text_model.') else f'text_model.{k}'): v
          for k, v in tensors.items() if not k.endswith('position_ids')}


def _abstract(module, *inputs, **kwargs) -> Params:
  init = functools.partial(module.init, **kwargs)
  return jax.eval_shape(init, jax.random.PRNGKey(0), *inputs)['params']


# ----------------------------------------------------------- pipeline ------


@dataclasses.dataclass
class StableDiffusion:
  """A loaded pipeline: modules, their parameters and the folder's configs.

  Attributes:
    tokenizer: prompt -> [B, 77] token ids.
    text_encoder: CLIP text model; `params['text_encoder']`.
    unet_model: the conditional U-Net; `params['unet']`.
    vae: the autoencoder; `params['vae']`.
    scheduler: schedule and timestep placement of the folder's scheduler.
    scaling_factor: latents = scaling_factor * vae mean.
    params: {'text_encoder', 'unet', 'vae'} parameter trees.
    configs: the folder's JSON configs by component (written back by `save`).
  """

  tokenizer: clip_tokenizer.CLIPTokenizer
  text_encoder: CLIPTextModel
  unet_model: UNet
  vae: AutoencoderKL
  scheduler: schedulers.SchedulerConfig
  scaling_factor: float
  params: dict[str, Params]
  configs: dict[str, dict[str, Any]]

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.downsample_factor

  @property
  def sample_size(self) -> int:
    """Default image side: the U-Net's sample_size times the VAE's downsampling."""
    return int(self.configs['unet'].get('sample_size') or 64) * self.vae_scale_factor

  @functools.cached_property
  def _encode_fn(self):
    return jax.jit(lambda p, ids: self.text_encoder.apply({'params': p}, ids))

  @functools.cached_property
  def _unet_fn(self):
    return jax.jit(lambda p, x, t, c: self.unet_model.apply({'params': p}, x, t, context=c))

  def encode_prompt(self, prompts: Sequence[str] | str) -> jax.Array:
    """CLIP's last_hidden_state of the prompts, [B, 77, D] float32."""
    return self._encode_fn(self.params['text_encoder'], self.tokenizer(prompts))

  def unet(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array,
           params: Params | None = None) -> jax.Array:
    """The U-Net's prediction on NHWC latents [B, h, w, 4] at timesteps [B] (or scalar)."""
    params = self.params['unet'] if params is None else params
    return self._unet_fn(params, jnp.asarray(latents, jnp.float32),
                         jnp.asarray(timesteps, jnp.float32), jnp.asarray(context, jnp.float32))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Latents -> images [B, H, W, 3] in [0, 1] (diffusers' postprocessing)."""
    images = self.vae.apply({'params': self.params['vae']}, latents / self.scaling_factor,
                            method=self.vae.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> latents (the posterior mean times scaling_factor)."""
    mean, _ = self.vae.apply({'params': self.params['vae']}, images, method=self.vae.encode)
    return mean * self.scaling_factor

  def __call__(self, prompts: Sequence[str] | str,
               negative_prompts: Sequence[str] | str | None = None,
               latents: jax.Array | np.ndarray | None = None, num_steps: int = 50,
               guidance_scale: float = 7.5, method: str = 'ddim', seed: int = 0,
               height: int | None = None, width: int | None = None) -> jax.Array:
    """Text to images, as diffusers' `StableDiffusionPipeline` computes them.

    Args:
      prompts: one prompt or B prompts.
      negative_prompts: what guidance steers away from; None means '' for each.
      latents: [B, h, w, 4] initial noise, unscaled (as diffusers takes it);
        None draws it from `seed`.
      num_steps: sampler steps.
      guidance_scale: classifier-free guidance weight; <= 1 turns guidance off.
      method: 'ddim', 'dpm_solver++' or 'euler' (`schedulers.METHODS`).
      seed: PRNG seed of the initial noise.
      height, width: image size (multiples of 8 x the VAE factor); default from
        the U-Net's sample_size.

    Returns:
      float32 images [B, H, W, 3] in [0, 1].
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None:
      negative_prompts = [''] * len(prompts)
    negative_prompts = ([negative_prompts] if isinstance(negative_prompts, str)
                        else list(negative_prompts))
    if len(negative_prompts) != len(prompts):
      raise UserError(f'{len(negative_prompts)} negative prompts for {len(prompts)} prompts; '
                      f'accepted: one per prompt')
    if method not in schedulers.METHODS:
      raise UserError(f'method {method!r} is not supported for Stable Diffusion pipelines; '
                      f'accepted: {", ".join(schedulers.METHODS)}')
    f = self.vae_scale_factor
    if latents is None:
      height, width = height or self.sample_size, width or self.sample_size
      if height % f or width % f:
        raise UserError(f'image size {height}x{width} is not a multiple of {f}')
      shape = (len(prompts), height // f, width // f, self.unet_model.out_channels)
      latents = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.ndim != 4 or latents.shape[0] != len(prompts):
      raise UserError(f'latents of shape {latents.shape}; accepted: [{len(prompts)}, h, w, '
                      f'{self.unet_model.out_channels}] (NHWC, one per prompt)')
    context = self.encode_prompt(prompts)
    guided = guidance_scale > 1
    uncond = self.encode_prompt(negative_prompts) if guided else None
    coefficients = schedulers.plan(self.scheduler, method, int(num_steps))
    noise = latents * schedulers.init_noise_sigma(self.scheduler, method, int(num_steps))
    return self._generate(self.params, context, uncond, noise, coefficients,
                          jnp.float32(guidance_scale),
                          clip_range=schedulers.clip_range(self.scheduler, method))

  @functools.partial(jax.jit, static_argnames=('self', 'clip_range'))
  def _generate(self, params, context, uncond, noise, coefficients, guidance_scale, *,
                clip_range):
    # One program for every method and guidance scale: they differ only in the
    # per-step coefficients (see `schedulers.plan`).
    def model_fn(x, t):
      t = jnp.broadcast_to(t, (x.shape[0],))
      if uncond is None:
        return self.unet_model.apply({'params': params['unet']}, x, t, context=context)
      both = self.unet_model.apply({'params': params['unet']}, jnp.concatenate([x, x]),
                                   jnp.concatenate([t, t]),
                                   context=jnp.concatenate([uncond, context]))
      out_uncond, out_cond = jnp.split(both, 2)
      return out_uncond + guidance_scale * (out_cond - out_uncond)

    latents = schedulers.run(model_fn, coefficients, noise, clip_range=clip_range)
    images = self.vae.apply({'params': params['vae']}, latents / self.scaling_factor,
                            method=self.vae.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

  __hash__ = object.__hash__  # jit's static `self`: one compiled program per pipeline

  def __eq__(self, other):
    return self is other


# ------------------------------------------------------------ loading ------


def _resolve(path_or_repo_id: str) -> str:
  """A local folder, or the Hub snapshot of a repo id."""
  if fileio.isdir(path_or_repo_id):
    return path_or_repo_id
  if fileio.exists(path_or_repo_id):
    raise UserError(f'{path_or_repo_id!r} is a file; accepted: a diffusers Stable Diffusion '
                    f'folder (with {MODEL_INDEX}) or a Hub repo id')
  parts = path_or_repo_id.split('/')
  if len(parts) != 2 or not all(parts):
    raise UserError(f'{path_or_repo_id!r} is neither a folder nor a Hub repo id (owner/name)')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(path_or_repo_id, allow_patterns=list(HUB_PATTERNS))
  except Exception as e:  # Network, authentication and not-found errors all end here.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'cannot download {path_or_repo_id!r} from the Hub: {first}') from e


def _check_model_index(path: str) -> dict[str, Any]:
  index = _read_json(os.path.join(path, MODEL_INDEX), 'a diffusers pipeline folder')
  source = os.path.join(path, MODEL_INDEX)
  class_name = index.get('_class_name')
  if class_name not in PIPELINE_CLASSES:
    what = ' (SDXL)' if class_name and 'XL' in class_name else ''
    raise UserError(f'{source}: _class_name={class_name!r}{what} is not supported; accepted: '
                    f'{", ".join(PIPELINE_CLASSES)} (Stable Diffusion 1.x / 2.x)')
  for component, accepted in COMPONENTS.items():
    entry = index.get(component)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
      raise UserError(f'{source} names no {component}; a Stable Diffusion pipeline needs '
                      f'{", ".join(COMPONENTS)}')
    if accepted and entry[1] not in accepted:
      raise UserError(f'{source}: {component} is a {entry[1]}, which is not supported; '
                      f'accepted: {", ".join(accepted)}')
    if not fileio.isdir(os.path.join(path, component)):
      raise UserError(f'{path!r} has no {component}/ folder ({MODEL_INDEX} names it)')
  return index


def load(path_or_repo_id: str) -> StableDiffusion:
  """Loads a Stable Diffusion 1.x / 2.x pipeline (see the module docstring).

  Args:
    path_or_repo_id: a diffusers pipeline folder, or a Hub repo id such as
      'stable-diffusion-v1-5/stable-diffusion-v1-5' when no such path exists.

  Returns:
    The pipeline.

  Raises:
    UserError: one line naming the missing component, file or tensor, the
      tensor of the wrong shape, or the unsupported option.
  """
  path = _resolve(path_or_repo_id)
  index = _check_model_index(path)
  configs = {'model_index': index}

  unet_dir = os.path.join(path, 'unet')
  configs['unet'] = pretrained.read_config(unet_dir)
  unet_model, in_channels = unet_from_config(configs['unet'],
                                             os.path.join(unet_dir, pretrained.CONFIG_FILE))
  text_dir = os.path.join(path, 'text_encoder')
  configs['text_encoder'] = _read_json(os.path.join(text_dir, pretrained.CONFIG_FILE),
                                       'the text encoder config')
  text_encoder = text_encoder_from_config(
      configs['text_encoder'], os.path.join(text_dir, pretrained.CONFIG_FILE))
  if text_encoder.hidden_size != unet_model.context_dim:
    raise UserError(f'{text_dir}: hidden_size={text_encoder.hidden_size} does not match the '
                    f'U-Net cross_attention_dim={unet_model.context_dim}')
  vae_dir = os.path.join(path, 'vae')
  configs['vae'] = pretrained.read_config(vae_dir)
  vae, _ = pretrained.autoencoder_from_config(configs['vae'],
                                              os.path.join(vae_dir, pretrained.CONFIG_FILE))
  scheduler_file = os.path.join(path, 'scheduler', SCHEDULER_CONFIG)
  configs['scheduler'] = _read_json(scheduler_file, 'the scheduler config')
  scheduler = schedulers.from_diffusers(configs['scheduler'], scheduler_file)
  tokenizer = clip_tokenizer.load(os.path.join(path, 'tokenizer'))

  # Weights last: every config problem is reported before the large reads.
  f = 2 ** (len(unet_model.channel_mult) - 1)
  params = {}
  params['unet'] = pretrained.params_from_state_dict(
      pretrained.read_weights(unet_dir),
      _abstract(unet_model, jnp.zeros((1, f, f, in_channels)), jnp.zeros((1,)), None,
                context=jnp.zeros((1, 1, unet_model.context_dim))),
      os.path.join(unet_dir, pretrained.WEIGHTS_FILE))
  text_file = os.path.join(text_dir, TEXT_ENCODER_WEIGHTS)
  params['text_encoder'] = pretrained.params_from_state_dict(
      _text_encoder_tensors(text_file),
      _abstract(text_encoder, jnp.zeros((1, 1), jnp.int32)), text_file)
  _, params['vae'] = pretrained.load_autoencoder(vae_dir)
  return StableDiffusion(
      tokenizer=tokenizer, text_encoder=text_encoder, unet_model=unet_model, vae=vae,
      scheduler=scheduler, scaling_factor=pretrained.scaling_factor(vae_dir), params=params,
      configs=configs)


# ------------------------------------------------------------- export ------


def _write_safetensors(file: str, tensors: Mapping[str, np.ndarray]) -> None:
  fileio.write_atomic(file, safetensors.numpy.save(
      {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={'format': 'pt'}))


def _write_json(file: str, value: Mapping[str, Any]) -> None:
  fileio.write_atomic(file, json.dumps(dict(value), indent=2, sort_keys=True).encode('utf-8'))


def save(pipe: StableDiffusion, path: str, *, unet_params: Params | None = None) -> None:
  """Writes `pipe` as a diffusers Stable Diffusion folder at `path` (a new directory).

  Args:
    pipe: the pipeline.
    path: where to write; must not exist yet (the folder appears whole or not at all).
    unet_params: U-Net parameters to write instead of `pipe.params['unet']` (e.g.
      fine-tuned or LoRA-merged ones).
  """
  if fileio.exists(path):
    raise UserError(f'{path!r} already exists; accepted: a new folder')
  unet_params = pipe.params['unet'] if unet_params is None else unet_params
  path = fileio.absolute(path).rstrip('/')
  # Written beside `path`, then renamed; leftovers of an interrupted export are replaced.
  staging = f'{path}.partial'
  if fileio.exists(staging):
    fileio.rmtree(staging)
  try:
    index = {'_class_name': 'StableDiffusionPipeline',
             '_diffusers_version': pipe.configs['model_index'].get('_diffusers_version', '0.30.0'),
             'feature_extractor': [None, None], 'safety_checker': [None, None],
             'requires_safety_checker': False, 'image_encoder': [None, None],
             'scheduler': ['diffusers', pipe.configs['scheduler'].get('_class_name',
                                                                      'DDIMScheduler')],
             'text_encoder': ['transformers', 'CLIPTextModel'],
             'tokenizer': ['transformers', 'CLIPTokenizer'],
             'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL']}
    _write_json(os.path.join(staging, MODEL_INDEX), index)
    _write_json(os.path.join(staging, 'scheduler', SCHEDULER_CONFIG), pipe.configs['scheduler'])
    pipe.tokenizer.save(os.path.join(staging, 'tokenizer'))
    text_dir = os.path.join(staging, 'text_encoder')
    _write_json(os.path.join(text_dir, pretrained.CONFIG_FILE), pipe.configs['text_encoder'])
    _write_safetensors(os.path.join(text_dir, TEXT_ENCODER_WEIGHTS),
                       pretrained.state_dict(pipe.params['text_encoder']))
    pretrained.write_folder(os.path.join(staging, 'unet'), pipe.configs['unet'],
                            pretrained.state_dict(unet_params))
    pretrained.write_folder(os.path.join(staging, 'vae'), pipe.configs['vae'],
                            pretrained.state_dict(pipe.params['vae']))
    fileio.rename(staging, path)
  except BaseException:
    if fileio.exists(staging):
      fileio.rmtree(staging)
    raise


def lora_state_dict(adapters: Params, scale: float, unet_params: Params
                    ) -> dict[str, np.ndarray]:
  """U-Net LoRA adapters (`lora.init_adapters` layout) -> diffusers' LoRA tensors.

  Dense kernels: lora_A [r, in], lora_B [out, r]; conv kernels [kh, kw, in, out]:
  lora_A [r, in, kh, kw], lora_B [out, r, 1, 1]. `scale` (alpha / r) is folded into
  lora_B: diffusers takes alpha = r for a file without alphas, so it merges
  W + B A exactly as ldm_jax merges W + scale * A B.

  Args:
    adapters: the adapter tree.
    scale: alpha / r.
    unet_params: the base U-Net parameters (for the kernels' shapes).
  """
  flat = traverse_util.flatten_dict(adapters)
  kernels = traverse_util.flatten_dict(unet_params)
  tensors = {}
  for path in sorted({p[:-1] for p in flat}):
    a = np.asarray(flat[path + ('lora_a',)], np.float32)  # [fan_in, r]
    b = scale * np.asarray(flat[path + ('lora_b',)], np.float32)  # [r, out]
    shape = kernels[path + ('kernel',)].shape
    name = f'unet.{pretrained.tensor_name(path + ("kernel",))[:-len(".weight")]}'
    if len(shape) == 2:
      tensors[f'{name}.lora_A.weight'], tensors[f'{name}.lora_B.weight'] = a.T, b.T
    else:
      kh, kw, cin, _ = shape
      tensors[f'{name}.lora_A.weight'] = a.reshape(kh, kw, cin, -1).transpose(3, 2, 0, 1)
      tensors[f'{name}.lora_B.weight'] = b.T[:, :, None, None]
  return tensors


def save_lora(adapters: Params, scale: float, unet_params: Params, path: str) -> str:
  """Writes `path/pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights(path)`).

  Returns:
    The file written.
  """
  tensors = lora_state_dict(adapters, scale, unet_params)
  file = os.path.join(path, LORA_FILE)
  _write_safetensors(file, tensors)  # Atomic: through a temporary file.
  return file


def load_lora(file: str, unet_params: Params) -> Params:
  """Reads a diffusers U-Net LoRA file as adapters to merge with scale 1.

  Args:
    file: a `pytorch_lora_weights.safetensors` in diffusers' layout (as `save_lora`
      writes it; files with `.alpha` tensors or other prefixes are not read).
    unet_params: the U-Net parameters the adapters belong to.

  Returns:
    The adapter tree (`lora.merge(unet_params, adapters, 1.0)` applies it).
  """
  tensors = pretrained.read_safetensors(
      file, f'{file!r} does not exist; accepted: a diffusers LoRA file ({LORA_FILE})')
  by_name = {pretrained.tensor_name(p)[:-len('.weight')]: p[:-1]
             for p in traverse_util.flatten_dict(unet_params) if p[-1] == 'kernel'}
  kernels = traverse_util.flatten_dict(unet_params)
  adapters = {}
  for key in sorted(tensors):
    if not key.endswith('.lora_A.weight'):
      continue
    name = key[:-len('.lora_A.weight')]
    module = name[len('unet.'):] if name.startswith('unet.') else None
    if module not in by_name or f'{name}.lora_B.weight' not in tensors:
      raise UserError(f'{file}: {key!r} names no U-Net layer (or has no lora_B); accepted: '
                      f'unet.<layer>.lora_A.weight / lora_B.weight pairs')
    path = by_name[module]
    a, b = tensors[key].astype(np.float32), tensors[f'{name}.lora_B.weight'].astype(np.float32)
    shape = kernels[path + ('kernel',)].shape
    if len(shape) == 2:
      adapters[path + ('lora_a',)], adapters[path + ('lora_b',)] = a.T, b.T
    else:
      adapters[path + ('lora_a',)] = a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0])
      adapters[path + ('lora_b',)] = b[:, :, 0, 0].T
  unused = [k for k in tensors if not k.endswith(('.lora_A.weight', '.lora_B.weight'))]
  if unused or not adapters:
    raise UserError(f'{file}: {unused[0] if unused else "no lora_A tensors"!r} is not read; '
                    f'accepted: unet.<layer>.lora_A.weight / lora_B.weight pairs')
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in adapters.items()})
