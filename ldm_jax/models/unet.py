"""Denoising U-Net for latents (DDPM / ADM layout, diffusers `UNet2DModel` names)."""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.denoiser import FieldError
from ldm_jax.models.layers import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    Dtype,
    DownBlock,
    MidBlock,
    TimestepEmbedding,
    UpBlock,
    group_norm,
    timestep_embedding,
)


class UNet(nn.Module):
  """Time- and optionally class-conditional U-Net.

  Level i has `base_channels * channel_mult[i]` channels and runs at resolution
  `H / 2**i`. Skip features are the conv_in output and the output of every down
  ResnetBlock / attention and Downsample; each up level has one more ResnetBlock
  than a down level so that every skip is consumed.

  Attributes:
    out_channels: channels of the prediction (eps, x0 or v: the latent channels).
    base_channels: channels at the first level; also the sinusoidal embedding width.
    channel_mult: channel multiplier per level, highest resolution first.
    num_res_blocks: ResnetBlocks per down level (up levels: one more).
    attention_resolutions: feature-map heights (e.g. 16 for 16x16) at which each
      ResnetBlock is followed by self-attention; decided from the input at call time.
    attention_levels: if set, the level indices (0 = highest resolution) whose down
      and up blocks have attention, in place of `attention_resolutions`; this is how
      diffusers' `AttnDownBlock2D` / `AttnUpBlock2D` choices are expressed.
    num_heads: attention heads (must divide the channels where attention is used).
    head_dim: > 0 uses heads of this width instead (`channels // head_dim` heads,
      so wider levels get more heads); 0 uses `num_heads` everywhere.
    level_heads: if set, the number of heads at each level (down level i and the
      up level mirroring it), the middle block using the last entry; overrides
      `num_heads` and `head_dim`. This is diffusers' `UNet2DConditionModel`
      `attention_head_dim` (a head count there, per block in Stable Diffusion 2).
    dropout: ResnetBlock dropout rate, active only with `train=True`.
    num_classes: 0 for an unconditional model (labels are then ignored); otherwise
      the label embedding has `num_classes + 1` rows, the last (index
      `num_classes`) being the learned null class used for classifier-free guidance.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    time_embed_dim: width of the time embedding; None means `4 * base_channels`.
    mid_attention: self-attention in the middle block.
    context_dim: 0 for self-attention only; > 0 replaces every attention layer
      (down, mid and up) by a spatial transformer (LDM) that cross-attends to a
      `context` of this width, given at call time.
    transformer_depth: transformer blocks per spatial transformer.
    use_linear_projection: spatial transformer projections as Dense layers
      (Stable Diffusion 2) instead of 1x1 convolutions (LDM, SD 1).
    flip_sin_to_cos: sinusoidal time embedding order (see `timestep_embedding`).
    freq_shift: `downscale_freq_shift` of the time embedding.
    remat: rematerialisation of each ResnetBlock / AttentionBlock in the backward
      pass, a key of `layers.REMAT_POLICIES`: '' (none), 'full', 'dots_saveable'.
      Trades compute for activation memory; the result is unchanged.
    attention_impl: how the self-attention blocks attend (`layers.ATTENTION_IMPLS`):
      'auto' (cuDNN fused attention on NVIDIA GPUs for float16/bfloat16, else XLA),
      'xla' or 'cudnn'. The same function either way; spatial transformers
      (`context_dim > 0`) always use XLA.
    fuse_norm_activation: each GroupNorm+SiLU as one function whose backward pass
      recomputes the SiLU's input (`layers.GroupNorm`); the same function either way,
      off by default (slower on the CPU and on an H200, benchmarks/README.md).
    dtype: compute dtype (float32 or bfloat16). Parameters stay float32, GroupNorm
      statistics and the attention softmax are float32, and the prediction is
      returned as float32 so that losses and samplers run in float32.
  """

  out_channels: int
  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  num_heads: int = 4
  head_dim: int = 0
  dropout: float = 0.0
  num_classes: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  time_embed_dim: int | None = None
  mid_attention: bool = True
  context_dim: int = 0
  transformer_depth: int = 1
  use_linear_projection: bool = False
  attention_levels: Sequence[int] | None = None
  level_heads: Sequence[int] | None = None
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  remat: str = ''
  attention_impl: str = 'auto'
  fuse_norm_activation: bool = False
  dtype: Dtype = jnp.float32

  @property
  def null_class(self) -> int:
    """Label index of the unconditional (null) class."""
    return self.num_classes

  @nn.compact
  def __call__(
      self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False,
      context: jax.Array | None = None, context_mask: jax.Array | None = None
  ) -> jax.Array:
    """Predicts the denoising target.

    Args:
      x: [B, H, W, C] noisy latents; H, W divisible by 2**(len(channel_mult) - 1).
      t: [B] (or scalar) float timestep indices; fractional values are fine.
      y: [B] int32 labels in [0, num_classes], or None for the null class; ignored
        by an unconditional model (as in diffusers), so callers need not branch.
      train: enables dropout (needs the 'dropout' rng collection).
      context: [B, S, context_dim] sequence the spatial transformers attend to;
        required when context_dim > 0, else ignored.
      context_mask: [B, S] bool, False at padded context positions (they then get
        no attention weight); None means every position is real. Each row needs
        at least one True.

    Returns:
      [B, H, W, out_channels] float32; exactly zero at initialisation.
    """
    if not self.channel_mult:
      raise ValueError('channel_mult must name at least one level')
    if x.ndim != 4:
      raise ValueError(f'UNet expects x of shape [B, H, W, C], got {x.shape}')
    batch, height, width, _ = x.shape
    factor = 2 ** (len(self.channel_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(
          f'UNet input size {height}x{width} is not divisible by {factor} = '
          f'2**(len(channel_mult) - 1) with channel_mult={tuple(self.channel_mult)}'
      )
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))  # [B]
    if self.context_dim > 0 and (context is None or context.shape[-1] != self.context_dim):
      got = None if context is None else context.shape
      raise ValueError(f'UNet with context_dim={self.context_dim} needs a context of shape '
                       f'[B, S, {self.context_dim}], got {got}')

    time_embed_dim = self.time_embed_dim or 4 * self.base_channels
    temb = timestep_embedding(t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                              downscale_freq_shift=self.freq_shift)  # [B, base]
    temb = TimestepEmbedding(time_embed_dim, dtype=self.dtype, name='time_embedding')(temb)
    if self.num_classes > 0:  # temb: [B, D]
      if y is None:
        y = jnp.full((batch,), self.null_class, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, time_embed_dim, dtype=self.dtype,
                             name='class_embedding')(y)

    if self.level_heads is not None and len(self.level_heads) != len(self.channel_mult):
      raise ValueError(f'UNet: level_heads={tuple(self.level_heads)} needs one entry per level '
                       f'of channel_mult={tuple(self.channel_mult)}')

    def heads(channels: int, level: int = -1) -> int:
      if self.level_heads is not None:
        return self.level_heads[level]
      if self.head_dim <= 0:
        return self.num_heads
      if channels % self.head_dim:
        raise ValueError(f'UNet: {channels} channels are not divisible by head_dim={self.head_dim}')
      return channels // self.head_dim

    def heads_at(level: int, resolution: int, channels: int) -> int | None:
      if self.attention_levels is not None:
        return heads(channels, level) if level in self.attention_levels else None
      return heads(channels, level) if resolution in self.attention_resolutions else None

    common = dict(
        norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, dropout=self.dropout,
        transformer_depth=self.transformer_depth if self.context_dim > 0 else 0,
        use_linear_projection=self.use_linear_projection,
        dtype=self.dtype, remat=self.remat, attention_impl=self.attention_impl,
        fuse_norm_activation=self.fuse_norm_activation,
    )
    cross = dict(context=context, context_mask=context_mask)
    num_levels = len(self.channel_mult)

    h = nn.Conv(self.base_channels * self.channel_mult[0], (3, 3), padding=1, dtype=self.dtype,
                name='conv_in')(x)
    skips = [h]
    for i, mult in enumerate(self.channel_mult):
      h, block_skips = DownBlock(
          out_channels=self.base_channels * mult,
          num_layers=self.num_res_blocks,
          attention_heads=heads_at(i, h.shape[1], self.base_channels * mult),
          add_downsample=i < num_levels - 1,
          name=f'down_blocks_{i}',
          **common,
      )(h, temb, train=train, **cross)
      skips.extend(block_skips)

    h = MidBlock(
        attention_heads=heads(h.shape[-1]) if self.mid_attention else None, name='mid_block', **common
    )(h, temb, train=train, **cross)

    num_up_layers = self.num_res_blocks + 1
    for i, mult in enumerate(reversed(self.channel_mult)):
      block_skips, skips = skips[-num_up_layers:], skips[:-num_up_layers]
      h = UpBlock(
          out_channels=self.base_channels * mult,
          num_layers=num_up_layers,
          attention_heads=heads_at(num_levels - 1 - i, h.shape[1], self.base_channels * mult),
          add_upsample=i < num_levels - 1,
          name=f'up_blocks_{i}',
          **common,
      )(h, block_skips, temb, train=train, **cross)
    assert not skips, 'every skip feature is consumed by the up path'

    h = group_norm(h.shape[-1], self.norm_num_groups, self.norm_eps, 'conv_norm_out', self.dtype,
                   'silu', self.fuse_norm_activation)(h)
    # Zero init: the untrained model predicts 0 (the mean of the eps/v targets), which
    # keeps the first steps stable (Dhariwal & Nichol 2021).
    return nn.Conv(
        self.out_channels,
        (3, 3),
        padding=1,
        kernel_init=nn.initializers.zeros_init(),
        bias_init=nn.initializers.zeros_init(),
        dtype=self.dtype,
        name='conv_out',
    )(h).astype(jnp.float32)


def check_fields(fields: Mapping[str, Any], latent_size: int) -> None:
  """Checks `UNet` config fields (without the derived ones) for latents of side `latent_size`.

  Raises:
    FieldError: naming the first field that cannot work, e.g. an
      `attention_resolutions` entry that is no feature-map size of this U-Net.
  """
  positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  channel_mult = tuple(fields.get('channel_mult', ()))
  if not channel_mult or not all(positive(m) for m in channel_mult):
    raise FieldError('channel_mult', channel_mult, 'a non-empty tuple of positive integers')
  for name in ('base_channels', 'num_res_blocks', 'num_heads', 'transformer_depth'):
    if name in fields and not positive(fields[name]):
      raise FieldError(name, fields[name], 'a positive integer')
  remat = fields.get('remat', '')
  if remat not in REMAT_POLICIES:
    raise FieldError('remat', remat, ', '.join(map(repr, REMAT_POLICIES)))
  attention_impl = fields.get('attention_impl', 'auto')
  if attention_impl not in ATTENTION_IMPLS:
    raise FieldError('attention_impl', attention_impl, ', '.join(map(repr, ATTENTION_IMPLS)))
  if not isinstance(fields.get('fuse_norm_activation', False), bool):
    raise FieldError('fuse_norm_activation', fields['fuse_norm_activation'], 'True or False')
  factor = 2 ** (len(channel_mult) - 1)
  if latent_size % factor:
    raise FieldError('channel_mult', channel_mult,
                     f'at most as many levels as halve the {latent_size}x{latent_size} latents '
                     f'evenly ({len(channel_mult)} levels need a multiple of {factor})')
  levels = len(channel_mult)
  if fields.get('attention_levels') is None:
    occurring = tuple(latent_size // 2 ** i for i in range(levels))
    requested = tuple(fields.get('attention_resolutions', ()))
    missing = [r for r in requested if r not in occurring]
    if missing:
      raise FieldError('attention_resolutions', requested,
                       f'feature-map sizes that occur in this U-Net, {occurring} for '
                       f'{latent_size}x{latent_size} latents; '
                       f'{", ".join(map(str, missing))} never occur')
    attended = [i for i, r in enumerate(occurring) if r in requested]
  else:
    attended = tuple(fields['attention_levels'])
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < levels
               for i in attended):
      raise FieldError('attention_levels', attended,
                       f'level indices 0..{levels - 1} of channel_mult={channel_mult}')
  level_heads = fields.get('level_heads')
  if level_heads is not None:
    level_heads = tuple(level_heads)
    if len(level_heads) != levels or not all(positive(h) for h in level_heads):
      raise FieldError('level_heads', level_heads,
                       f'one positive head count per level of channel_mult={channel_mult}')
    # The middle block attends with the last level's heads.
    if fields.get('mid_attention', True):
      attended = [*attended, levels - 1]
    base = fields.get('base_channels', UNet.base_channels)
    for i in attended:
      if (base * channel_mult[i]) % level_heads[i]:
        raise FieldError('level_heads', level_heads,
                         f'head counts that divide each attending level\'s channels; level '
                         f'{i} has {base * channel_mult[i]}')
