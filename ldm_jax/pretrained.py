"""Diffusers weights in and out: `AutoencoderKL`, `VQModel` and `UNet2DModel` folders.

A diffusers model folder holds `config.json` and `diffusion_pytorch_model.safetensors`.
Our autoencoder and U-Net use diffusers' layout and submodule names, so a folder
maps onto them by reading the config into module fields and renaming tensors:

  flax path                                  diffusers tensor
  encoder/down_blocks_0/resnets_1/conv1/kernel  encoder.down_blocks.0.resnets.1.conv1.weight
  .../attentions_0/to_out/kernel             .../attentions.0.to_out.0.weight

Conv kernels are HWIO here and OIHW there, dense kernels are transposed, GroupNorm
`scale` is `weight`. Attention tensors of older diffusers files (`query`, `key`,
`value`, `proj_attn`) are read under their current names. Safetensors are read and
written with numpy alone; PyTorch is not needed.

A `VQModel` folder (the format of the CompVis LDM checkpoints' `vqvae`) loads
wherever an `AutoencoderKL` one does (`config.autoencoder.pretrained`); its codebook
is `quantize.embedding.weight`.

Class labels: our U-Net embeds `num_classes + 1` rows, the last being the null
class of classifier-free guidance. A diffusers U-Net with `num_class_embeds = N`
loads as `num_classes = N` with the null row set to the mean of the N class rows
(a neutral start for guidance fine-tuning; labels 0..N-1 give diffusers' outputs).
`save_unet` writes all `N + 1` rows with `num_class_embeds = N + 1` (diffusers can
use the null class as label N) and marks the folder with `_ldm_jax_null_class`,
a private key diffusers ignores, so that reloading gives back `num_classes = N`.
"""
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from ldm_jax import fileio
from ldm_jax.errors import UserError
from ldm_jax.models import AutoencoderKL, UNet, VQModel

Params = Any

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
NULL_CLASS_KEY = '_ldm_jax_null_class'
# The epsilon diffusers hard-codes in the AutoencoderKL GroupNorms.
VAE_NORM_EPS = 1e-6
# diffusers' default `scaling_factor` (the SD VAE's).
SD_SCALING_FACTOR = 0.18215

# Flax submodules that diffusers and transformers keep in a ModuleList: `resnets_1`
# <-> `resnets.1` (spatial transformers: `transformer_blocks_0`, `to_out_0`, `net_2`;
# CLIP: `layers_3`).
_LIST_NAMES = frozenset(
    {'down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers', 'upsamplers',
     'transformer_blocks', 'to_out', 'net', 'layers'})
# Attention tensor names of diffusers files written before the `Attention` rewrite.
_OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_CLASS_EMBEDDING = 'class_embedding.weight'

# diffusers' constructor defaults for the keys we read (a config.json may omit them).
_VAE_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',),
    up_block_types=('UpDecoderBlock2D',), block_out_channels=(64,), layers_per_block=1,
    act_fn='silu', latent_channels=4, norm_num_groups=32, scaling_factor=SD_SCALING_FACTOR,
    shift_factor=None, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True)
_VQ_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',),
    up_block_types=('UpDecoderBlock2D',), block_out_channels=(64,), layers_per_block=1,
    act_fn='silu', latent_channels=3, num_vq_embeddings=256, norm_num_groups=32,
    vq_embed_dim=None, scaling_factor=SD_SCALING_FACTOR, norm_type='group',
    mid_block_add_attention=True)
_VQ_FIXED = dict(act_fn=('silu', 'swish'), norm_type=('group',))
_UNET_DEFAULTS = dict(
    in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type='positional',
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    mid_block_type='UNetMidBlock2D',
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0,
    act_fn='silu', attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift='default', add_attention=True, class_embed_type=None,
    num_class_embeds=None)
# Options of the diffusers configs that have one value our modules can represent.
_VAE_FIXED = dict(act_fn=('silu', 'swish'), shift_factor=(None,), use_quant_conv=(True,),
                  use_post_quant_conv=(True,))
_UNET_FIXED = dict(
    center_input_sample=(False,), time_embedding_type=('positional',),
    mid_block_type=('UNetMidBlock2D',), mid_block_scale_factor=(1,), downsample_padding=(1,),
    downsample_type=('conv',), upsample_type=('conv',), act_fn=('silu', 'swish'),
    resnet_time_scale_shift=('default',), class_embed_type=(None,))


# ------------------------------------------------------------ folders ------


def read_config(path: str) -> dict[str, Any]:
  """The parsed `config.json` of the diffusers folder `path`."""
  if not fileio.isdir(path):
    raise UserError(f'{path!r} is not a diffusers model folder (a directory with '
                    f'{CONFIG_FILE} and {WEIGHTS_FILE})')
  file = os.path.join(path, CONFIG_FILE)
  if not fileio.exists(file):
    raise UserError(f'{path!r} has no {CONFIG_FILE}; a diffusers model folder holds '
                    f'{CONFIG_FILE} and {WEIGHTS_FILE}')
  try:
    config = fileio.read_json(file)
  except (*fileio.ERRORS, json.JSONDecodeError) as e:
    raise UserError(f'cannot read {file}: {e}') from e
  if not isinstance(config, dict):
    raise UserError(f'{file} does not hold a JSON object')
  return config


def read_safetensors(file: str, missing: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors `file`; `missing` is the one-line error when it does not exist."""
  if not fileio.isfile(file):
    raise UserError(missing)
  try:
    with fileio.open(file, 'rb') as f:
      return safetensors.numpy.load(f.read())
  except Exception as e:  # safetensors raises its own error types for a bad file.
    raise UserError(f'cannot read {file}: {str(e).splitlines()[0] if str(e) else e!r}') from e


def read_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of the folder's safetensors file (old attention names renamed)."""
  tensors = read_safetensors(os.path.join(path, WEIGHTS_FILE), f'{path!r} has no {WEIGHTS_FILE}')
  renamed = {}
  for name, value in tensors.items():
    match = re.fullmatch(r'(.*\.)(query|key|value|proj_attn)\.(weight|bias)', name)
    new = f'{match[1]}{_OLD_ATTENTION_NAMES[match[2]]}.{match[3]}' if match else name
    renamed[new] = value
  return renamed


def weights_hash(path: str) -> str:
  """SHA-256 of the folder's safetensors file: identifies the exact base weights."""
  digest = hashlib.sha256()
  with fileio.open(os.path.join(path, WEIGHTS_FILE), 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def write_folder(path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
  """Writes `config.json` and the safetensors file; each replaces its old version atomically."""
  weights, config_file = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)
  fileio.write_atomic(weights, safetensors.numpy.save(
      {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={'format': 'pt'}))
  fileio.write_atomic(config_file, json.dumps(dict(config), indent=2, sort_keys=True))


# ------------------------------------------------------ tensor mapping -----


def tensor_name(path: tuple[str, ...]) -> str:
  """The diffusers tensor name of a flax parameter path."""
  parts = []
  for name in path[:-1]:
    match = re.fullmatch(r'(.+)_(\d+)', name)
    if match and match[1] in _LIST_NAMES:
      parts += [match[1], match[2]]
    elif name == 'to_out':  # diffusers: ModuleList([Linear, Dropout]).
      parts += ['to_out', '0']
    else:
      parts.append(name)
  return '.'.join(parts + ['bias' if path[-1] == 'bias' else 'weight'])


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if leaf == 'kernel' and value.ndim == 2:
    return value.T  # [in, out] -> [out, in]
  return value


def _from_torch(leaf: str, value: np.ndarray, ndim: int) -> np.ndarray:
  if leaf == 'kernel' and ndim == 4 and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == 'kernel' and ndim == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1-conv attention of old files.
      value = value[:, :, 0, 0]
    return value.T if value.ndim == 2 else value
  return value


def state_dict(params: Params) -> dict[str, np.ndarray]:
  """Flax params -> diffusers-named tensors in PyTorch layout (float32 numpy)."""
  return {tensor_name(path): np.ascontiguousarray(_to_torch(path[-1], np.asarray(value)))
          for path, value in traverse_util.flatten_dict(params).items()}


def params_from_state_dict(tensors: Mapping[str, np.ndarray], abstract_params: Params,
                           source: str) -> Params:
  """Diffusers tensors -> flax params with the structure of `abstract_params`.

  Args:
    tensors: diffusers-named tensors in PyTorch layout.
    abstract_params: the module's parameter tree (arrays or ShapeDtypeStructs).
    source: names the file in error messages.

  Returns:
    The params as jax arrays of the abstract dtypes.

  Raises:
    UserError: naming the first missing tensor, one with the wrong shape, or an
      unexpected one.
  """
  remaining = dict(tensors)
  params = {}
  for path, spec in traverse_util.flatten_dict(abstract_params).items():
    name = tensor_name(path)
    expected = _to_torch(path[-1], np.empty(spec.shape, np.bool_)).shape
    if name not in remaining:
      raise UserError(f'{source}: tensor {name!r} is missing (expected shape {expected})')
    value = np.asarray(remaining.pop(name))
    converted = _from_torch(path[-1], value, len(spec.shape))
    if converted.shape != tuple(spec.shape):
      raise UserError(f'{source}: tensor {name!r} has shape {value.shape}, expected {expected}')
    params[path] = jnp.asarray(converted, spec.dtype)
  if remaining:
    extra = sorted(remaining)
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise UserError(f'{source}: unexpected tensor {extra[0]!r}{more}; the config.json does '
                    f'not describe these weights')
  return traverse_util.unflatten_dict(params)


# ------------------------------------------------------------ configs ------


def _with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any],
                   fixed: Mapping[str, tuple], class_name: str, source: str) -> dict[str, Any]:
  """`config` over diffusers' defaults, after checking what we cannot represent."""
  if config.get('_class_name', class_name) != class_name:
    raise UserError(f'{source}: _class_name is {config["_class_name"]!r}; accepted: {class_name}')
  merged = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
  for key, accepted in fixed.items():
    if merged[key] not in accepted:
      raise UserError(f'{source}: {key}={merged[key]!r} is not supported; accepted: '
                      f'{", ".join(map(repr, accepted))}')
  return merged


def _one_type(source: str, key: str, types: list, accepted: str, count: int) -> None:
  if len(types) != count or any(t != accepted for t in types):
    raise UserError(f'{source}: {key}={types!r} is not supported; accepted: {count} x {accepted!r}')


def autoencoder_from_config(config: Mapping[str, Any], source: str = CONFIG_FILE
                            ) -> tuple[AutoencoderKL | VQModel, int]:
  """Our `AutoencoderKL` (or `VQModel`) with the structure of a diffusers config, and
  its input channels."""
  if config.get('_class_name') == 'VQModel':
    return vq_from_config(config, source)
  c = _with_defaults(config, _VAE_DEFAULTS, _VAE_FIXED, 'AutoencoderKL', source)
  return _first_stage_from_config(AutoencoderKL, c, source), c['in_channels']


def _first_stage_from_config(cls, c: Mapping[str, Any], source: str, **extra):
  """`cls` (AutoencoderKL or VQModel) from a diffusers config `c` with its defaults filled."""
  levels = len(c['block_out_channels'])
  _one_type(source, 'down_block_types', list(c['down_block_types']), 'DownEncoderBlock2D', levels)
  _one_type(source, 'up_block_types', list(c['up_block_types']), 'UpDecoderBlock2D', levels)
  return cls(
      out_channels=c['out_channels'], block_out_channels=tuple(c['block_out_channels']),
      layers_per_block=c['layers_per_block'], latent_channels=c['latent_channels'],
      norm_num_groups=c['norm_num_groups'], norm_eps=VAE_NORM_EPS,
      mid_block_attention=bool(c['mid_block_add_attention']), **extra)


def vq_from_config(config: Mapping[str, Any], source: str = CONFIG_FILE) -> tuple[VQModel, int]:
  """Our `VQModel` with the structure of a diffusers `VQModel` config, and its input channels."""
  c = _with_defaults(config, _VQ_DEFAULTS, _VQ_FIXED, 'VQModel', source)
  module = _first_stage_from_config(VQModel, c, source, num_vq_embeddings=c['num_vq_embeddings'],
                                    vq_embed_dim=c['vq_embed_dim'] or 0)
  return module, c['in_channels']


def vq_config(module: VQModel, params: Params, *, scaling_factor: float = SD_SCALING_FACTOR,
              sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers `VQModel` config.json describing `module`."""
  if module.norm_eps != VAE_NORM_EPS or not module.legacy_beta:
    raise UserError(f'diffusers VQModel has GroupNorm eps {VAE_NORM_EPS} and the legacy '
                    f'codebook loss; this model has norm_eps={module.norm_eps}, '
                    f'legacy_beta={module.legacy_beta}')
  return _first_stage_config(
      'VQModel', module, params, scaling_factor, sample_size,
      num_vq_embeddings=module.num_vq_embeddings, vq_embed_dim=module.embed_dim,
      norm_type='group')


def autoencoder_config(module: AutoencoderKL, params: Params, *,
                       scaling_factor: float = SD_SCALING_FACTOR,
                       sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers `AutoencoderKL` config.json describing `module`."""
  if module.norm_eps != VAE_NORM_EPS:
    raise UserError(f'diffusers AutoencoderKL has GroupNorm eps {VAE_NORM_EPS}; this model '
                    f'has norm_eps={module.norm_eps}')
  return _first_stage_config('AutoencoderKL', module, params, scaling_factor, sample_size,
                             use_quant_conv=True, use_post_quant_conv=True)


def _first_stage_config(class_name: str, module, params: Params, scaling_factor: float,
                        sample_size: int | None, **extra) -> dict[str, Any]:
  """The config.json fields diffusers' `AutoencoderKL` and `VQModel` share, plus `extra`."""
  levels = len(module.block_out_channels)
  config = dict(
      _class_name=class_name, act_fn='silu',
      in_channels=int(params['encoder']['conv_in']['kernel'].shape[2]),
      out_channels=module.out_channels, block_out_channels=list(module.block_out_channels),
      down_block_types=['DownEncoderBlock2D'] * levels,
      up_block_types=['UpDecoderBlock2D'] * levels, layers_per_block=module.layers_per_block,
      latent_channels=module.latent_channels, norm_num_groups=module.norm_num_groups,
      mid_block_add_attention=module.mid_block_attention, scaling_factor=float(scaling_factor),
      **extra)
  if sample_size:
    config['sample_size'] = sample_size
  return config


def attention_block_levels(down_block_types, up_block_types, levels: int, prefix: str,
                           source: str) -> tuple[int, ...]:
  """The levels whose blocks attend, from diffusers' block type lists.

  Down blocks are `DownBlock2D` or `{prefix}DownBlock2D` (`Attn` for `UNet2DModel`,
  `CrossAttn` for `UNet2DConditionModel`); the up blocks must mirror them.
  """
  down, up = list(down_block_types), list(up_block_types)
  attn_down, attn_up = f'{prefix}DownBlock2D', f'{prefix}UpBlock2D'
  if len(down) != levels or any(t not in ('DownBlock2D', attn_down) for t in down):
    raise UserError(f'{source}: down_block_types={down} is not supported; accepted: {levels} '
                    f'x DownBlock2D or {attn_down}')
  attention_levels = tuple(i for i, t in enumerate(down) if t == attn_down)
  mirrored = [(attn_up if i in attention_levels else 'UpBlock2D')
              for i in reversed(range(levels))]
  if up != mirrored:
    raise UserError(f'{source}: up_block_types={up} is not supported; accepted: {mirrored} '
                    f'(the mirror of down_block_types)')
  return attention_levels


def unet_from_config(config: Mapping[str, Any], source: str = CONFIG_FILE) -> tuple[UNet, int]:
  """Our `UNet` with the structure of a diffusers `UNet2DModel` config, and its input channels."""
  c = _with_defaults(config, _UNET_DEFAULTS, _UNET_FIXED, 'UNet2DModel', source)
  block_out = list(c['block_out_channels'])
  base, levels = block_out[0], len(block_out)
  if any(ch % base for ch in block_out):
    raise UserError(f'{source}: block_out_channels={block_out} is not supported; accepted: '
                    f'multiples of the first entry {base}')
  attention_levels = attention_block_levels(c['down_block_types'], c['up_block_types'],
                                            levels, 'Attn', source)
  if c['attn_norm_num_groups'] not in (None, c['norm_num_groups']):
    raise UserError(f'{source}: attn_norm_num_groups={c["attn_norm_num_groups"]} is not '
                    f'supported; accepted: null or norm_num_groups={c["norm_num_groups"]}')
  num_classes = c['num_class_embeds'] or 0
  if num_classes and config.get(NULL_CLASS_KEY):
    num_classes -= 1  # The last row is already our null class.
  head_dim = c['attention_head_dim']
  module = UNet(
      out_channels=c['out_channels'], base_channels=base,
      channel_mult=tuple(ch // base for ch in block_out), num_res_blocks=c['layers_per_block'],
      attention_resolutions=(), attention_levels=attention_levels,
      num_heads=1, head_dim=head_dim or 0, dropout=float(c['dropout']), num_classes=num_classes,
      norm_num_groups=c['norm_num_groups'], norm_eps=float(c['norm_eps']),
      time_embed_dim=c['time_embedding_dim'], mid_attention=bool(c['add_attention']),
      flip_sin_to_cos=bool(c['flip_sin_to_cos']), freq_shift=float(c['freq_shift']))
  return module, c['in_channels']


def unet_config(module: UNet, params: Params, *, sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers `UNet2DModel` config.json describing `module`.

  Args:
    module: the U-Net.
    params: its parameters (for the input channels).
    sample_size: latent size; needed when the module places attention by
      `attention_resolutions` rather than `attention_levels`.
  """
  levels = len(module.channel_mult)
  channels = [module.base_channels * m for m in module.channel_mult]
  if module.attention_levels is not None:
    attention_levels = set(module.attention_levels)
  elif sample_size:
    attention_levels = {i for i in range(levels)
                        if sample_size // 2 ** i in module.attention_resolutions}
  else:
    raise UserError('save_unet needs sample_size for a U-Net that places attention by '
                    'attention_resolutions')
  attended = [channels[i] for i in sorted(attention_levels)]
  attended += [channels[-1]] if module.mid_attention else []
  if module.head_dim > 0:
    head_dim = module.head_dim
  elif module.num_heads == 1 or not attended:
    head_dim = None
  elif len({c // module.num_heads for c in attended}) == 1:
    head_dim = attended[0] // module.num_heads
  else:
    raise UserError(f'num_heads={module.num_heads} at channels {attended} has no diffusers '
                    f'attention_head_dim; accepted: head_dim > 0 or num_heads=1')
  config = dict(
      _class_name='UNet2DModel', in_channels=int(params['conv_in']['kernel'].shape[2]),
      out_channels=module.out_channels, block_out_channels=channels,
      layers_per_block=module.num_res_blocks,
      down_block_types=['AttnDownBlock2D' if i in attention_levels else 'DownBlock2D'
                        for i in range(levels)],
      up_block_types=['AttnUpBlock2D' if i in attention_levels else 'UpBlock2D'
                      for i in reversed(range(levels))],
      attention_head_dim=head_dim, add_attention=module.mid_attention,
      norm_num_groups=module.norm_num_groups, norm_eps=module.norm_eps,
      time_embedding_dim=module.time_embed_dim, flip_sin_to_cos=module.flip_sin_to_cos,
      freq_shift=module.freq_shift, dropout=module.dropout, act_fn='silu',
      num_class_embeds=module.num_classes + 1 if module.num_classes else None)
  if module.num_classes:
    config[NULL_CLASS_KEY] = True
  if sample_size:
    config['sample_size'] = sample_size
  return config


# -------------------------------------------------------- load / save ------


def _weights_source(path: str) -> str:
  return os.path.join(path, WEIGHTS_FILE)


def _abstract_params(module, *inputs) -> Params:
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)['params']


def autoencoder_module(path: str) -> tuple[AutoencoderKL | VQModel, int]:
  """The autoencoder described by the folder's config (no weights), and its input channels."""
  return autoencoder_from_config(read_config(path), os.path.join(path, CONFIG_FILE))


def unet_module(path: str) -> tuple[UNet, int]:
  """The U-Net described by the folder's config (no weights), and its input channels."""
  return unet_from_config(read_config(path), os.path.join(path, CONFIG_FILE))


def load_autoencoder(path: str) -> tuple[AutoencoderKL | VQModel, Params]:
  """Loads a diffusers `AutoencoderKL` folder (e.g. the SD VAE, `stabilityai/sd-vae-ft-mse`)
  or `VQModel` folder (e.g. the `vqvae` of `CompVis/ldm-celebahq-256`).

  Args:
    path: folder with config.json and diffusion_pytorch_model.safetensors.

  Returns:
    (module, params); `module.apply({'params': params}, x, method=module.encode)`
    gives (mean, logvar) and `method=module.decode` images, NHWC in [-1, 1].
  """
  module, in_channels = autoencoder_module(path)
  f = module.downsample_factor
  abstract = _abstract_params(module, jnp.zeros((1, f, f, in_channels)))
  return module, params_from_state_dict(read_weights(path), abstract, _weights_source(path))


def scaling_factor(path: str) -> float:
  """The folder's `scaling_factor` (diffusers' default 0.18215 when absent)."""
  return float(read_config(path).get('scaling_factor') or SD_SCALING_FACTOR)


def load_unet(path: str) -> tuple[UNet, Params]:
  """Loads a diffusers `UNet2DModel` folder, unconditional or with `num_class_embeds`.

  Args:
    path: folder with config.json and diffusion_pytorch_model.safetensors.

  Returns:
    (module, params), called as `module.apply({'params': params}, x, t, y)` with x
    [B, H, W, C], t [B] float timesteps and y [B] int labels (or None).
  """
  module, in_channels = unet_module(path)
  f = 2 ** (len(module.channel_mult) - 1)
  abstract = _abstract_params(module, jnp.zeros((1, f, f, in_channels)), jnp.zeros((1,)),
                              jnp.zeros((1,), jnp.int32))
  tensors = read_weights(path)
  rows = tensors.get(_CLASS_EMBEDDING)
  if module.num_classes and rows is not None and rows.shape[0] == module.num_classes:
    null_row = rows.astype(np.float32).mean(axis=0, keepdims=True)
    tensors[_CLASS_EMBEDDING] = np.concatenate([rows, null_row.astype(rows.dtype)])
  return module, params_from_state_dict(tensors, abstract, _weights_source(path))


def save_autoencoder(module: AutoencoderKL | VQModel, params: Params, path: str, *,
                     scaling_factor: float = SD_SCALING_FACTOR,
                     sample_size: int | None = None) -> None:
  """Writes a diffusers `AutoencoderKL` (or `VQModel`) folder (`.from_pretrained(path)`)."""
  to_config = vq_config if isinstance(module, VQModel) else autoencoder_config
  config = to_config(module, params, scaling_factor=scaling_factor,
                              sample_size=sample_size)
  write_folder(path, config, state_dict(params))


def save_unet(module: UNet, params: Params, path: str, *, sample_size: int | None = None) -> None:
  """Writes a diffusers `UNet2DModel` folder (`UNet2DModel.from_pretrained(path)`)."""
  write_folder(path, unet_config(module, params, sample_size=sample_size), state_dict(params))

