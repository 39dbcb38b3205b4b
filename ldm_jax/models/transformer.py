"""The LDM "spatial transformer": self- and cross-attention over a feature map.

Rombach et al. 2022 condition the latent U-Net on a context sequence (text, layout,
class tokens) by replacing its self-attention layers with this block:

  GroupNorm -> proj_in -> depth x BasicTransformerBlock -> proj_out, + the input

where a BasicTransformerBlock is

  x = x + attn1(norm1(x))              self-attention over the H*W tokens
  x = x + attn2(norm2(x), context)     cross-attention: keys/values from the context
  x = x + ff(norm3(x))                 GEGLU feed-forward

Submodule names are those of diffusers' `Transformer2DModel` (`norm`, `proj_in`,
`transformer_blocks_{i}/{norm1, attn1/{to_q, to_k, to_v, to_out_0}, norm2, attn2,
norm3, ff/{net_0/proj, net_2}}`, `proj_out`), so that `UNet2DConditionModel`
weights map onto it by renaming alone.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# diffusers' defaults: LayerNorm eps of BasicTransformerBlock, FeedForward width.
LAYER_NORM_EPS = 1e-5
# diffusers' Transformer2DModel GroupNorm epsilon (whatever the U-Net's `norm_eps`).
TRANSFORMER_NORM_EPS = 1e-6
FF_MULT = 4


def padding_mask_to_attention_mask(context_mask: jax.Array | None) -> jax.Array | None:
  """[B, S] bool (True = a real token) -> [B, 1, 1, S], broadcast over heads and queries."""
  if context_mask is None:
    return None
  return jnp.asarray(context_mask, bool)[:, None, None, :]


class Attention(nn.Module):
  """Multi-head attention from `x` to `context` (to `x` itself when context is None).

  Query/key/value projections carry no bias and the output projection does, as in
  diffusers' `Attention` with its default `bias=False`.

  Attributes:
    num_heads: attention heads.
    head_dim: width of each head; the inner width is num_heads * head_dim.
    zero_init_output: start the output projection at zero, so that a residual
      branch around this layer begins as the identity (PixArt-alpha's cross-attention).
    dtype: compute dtype of the projections (parameters stay float32); the
      attention logits and softmax are computed in float32 whatever it is.
  """

  num_heads: int
  head_dim: int
  zero_init_output: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Attends.

    Args:
      x: [B, T, C] queries.
      context: [B, S, D] keys and values, or None for self-attention.
      context_mask: [B, S] bool, False at padded context positions, which then
        get no attention weight. Every row needs at least one True.

    Returns:
      [B, T, C].
    """
    b, t, c = x.shape
    context = x if context is None else context
    s = context.shape[1]
    inner = self.num_heads * self.head_dim
    split = lambda h, n: h.reshape(b, n, self.num_heads, self.head_dim)  # [B, n, N, D]
    project = lambda features, name, **kw: nn.Dense(features, dtype=self.dtype, name=name, **kw)
    q = split(project(inner, 'to_q', use_bias=False)(x), t)
    k = split(project(inner, 'to_k', use_bias=False)(context), s)
    v = split(project(inner, 'to_v', use_bias=False)(context), s)
    out = jax.nn.dot_product_attention(q, k, v, mask=padding_mask_to_attention_mask(context_mask))
    out_init = dict(kernel_init=nn.initializers.zeros_init()) if self.zero_init_output else {}
    return project(c, 'to_out_0', **out_init)(out.reshape(b, t, inner))


class GEGLU(nn.Module):
  """h * gelu(gate) with [h, gate] = proj(x) (Shazeer 2020; diffusers `GEGLU`).

  Attributes:
    features: output width (the projection is twice as wide).
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [..., C] -> [..., features]."""
    h, gate = jnp.split(nn.Dense(2 * self.features, name='proj')(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net_2(GEGLU(x)), diffusers `FeedForward` with its `net.0` / `net.2` layers.

  Attributes:
    mult: hidden width as a multiple of the input width.
  """

  mult: int = FF_MULT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [..., C] -> [..., C]."""
    h = GEGLU(self.mult * x.shape[-1], name='net_0')(x)
    return nn.Dense(x.shape[-1], name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and feed-forward, each residual.

  Attributes:
    num_heads: attention heads.
    head_dim: width of each head.
  """

  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Maps x: [B, T, C] with context [B, S, D] (mask [B, S]) to [B, T, C]."""
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, name=name)
    x = x + Attention(self.num_heads, self.head_dim, name='attn1')(norm('norm1')(x))
    x = x + Attention(self.num_heads, self.head_dim, name='attn2')(
        norm('norm2')(x), context, context_mask)
    return x + FeedForward(name='ff')(norm('norm3')(x))


class SpatialTransformer(nn.Module):
  """GroupNorm -> proj_in -> `depth` transformer blocks -> proj_out, plus the input.

  The inner width is the input width C, split into `num_heads` heads. proj_out
  starts at zero (as in LDM), so an untrained block is the identity.

  Attributes:
    num_heads: attention heads (must divide C).
    depth: number of BasicTransformerBlocks.
    use_linear_projection: proj_in / proj_out as Dense layers on the tokens
      (Stable Diffusion 2) instead of 1x1 convolutions (LDM, SD 1); the same map,
      with differently shaped kernels.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
  """

  num_heads: int
  depth: int = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = TRANSFORMER_NORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C] feature map.
      context: [B, S, D] context sequence (any width D).
      context_mask: [B, S] bool, False at padded positions; None = all real.

    Returns:
      [B, H, W, C].
    """
    b, height, width, c = x.shape
    if self.num_heads <= 0 or c % self.num_heads:
      raise ValueError(f'SpatialTransformer: {c} channels are not divisible into '
                       f'{self.num_heads} heads')
    if context.ndim != 3 or context.shape[0] != b:
      raise ValueError(f'SpatialTransformer: context must be [B={b}, S, D], got {context.shape}')
    if context_mask is not None and context_mask.shape != context.shape[:2]:
      raise ValueError(f'SpatialTransformer: context_mask must be {context.shape[:2]}, '
                       f'got {context_mask.shape}')
    if self.use_linear_projection:
      project = lambda features, name, **kw: nn.Dense(features, name=name, **kw)
    else:
      project = lambda features, name, **kw: nn.Conv(features, (1, 1), name=name, **kw)
    h = nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=self.norm_eps,
                     use_fast_variance=False, name='norm')(x)
    h = project(c, 'proj_in')(h)
    h = h.reshape(b, height * width, c)  # [B, T, C]
    for i in range(self.depth):
      h = BasicTransformerBlock(self.num_heads, c // self.num_heads,
                                name=f'transformer_blocks_{i}')(h, context, context_mask)
    h = h.reshape(b, height, width, c)
    zeros = nn.initializers.zeros_init()
    h = project(c, 'proj_out', kernel_init=zeros, bias_init=zeros)(h)
    return x + h
