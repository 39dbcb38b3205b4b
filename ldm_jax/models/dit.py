"""Diffusion Transformer (DiT, Peebles & Xie 2023) for latents.

The latent [B, H, W, C] is cut into p x p patches, each linearly embedded into a
token; fixed 2D sin-cos positions are added; `depth` DiT blocks with adaLN-Zero
conditioning process the (H/p)(W/p) tokens; a final adaLN-modulated linear layer
maps every token back to its p x p x out_channels patch:

  c = TimestepEmbedding(sinusoid(t)) + class_embedding(y)        [B, D]
  block: shift/scale/gate (x2) = Dense(SiLU(c)), zero-initialised
    x = x + gate_msa * SelfAttention(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + CrossAttention(x, context)     (context_dim > 0, as in PixArt-alpha)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

Every residual branch starts at zero (zero gates; the cross-attention output
projection starts at zero) and so does the final linear layer: an untrained DiT
predicts exactly 0, like the U-Net. The model follows the denoiser protocol of
`ldm_jax.models.denoiser` (registered as `models.DENOISERS['dit']`, its config
fields checked by `check_fields`), so the same stage-2 code trains and samples either.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.denoiser import FieldError
from ldm_jax.models.layers import (
    REMAT_POLICIES,
    Dtype,
    TimestepEmbedding,
    remat,
    timestep_embedding,
)
from ldm_jax.models.transformer import Attention

# Width of the sinusoidal timestep features fed to the time MLP (DiT's
# `frequency_embedding_size`).
FREQUENCY_EMBEDDING_SIZE = 256
# LayerNorm epsilon of the DiT blocks and final layer (no affine parameters: the
# adaLN modulation supplies scale and shift).
LAYER_NORM_EPS = 1e-6


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] tokens, row-major over patches.

  Token `i * (W/p) + j` is the patch `x[:, i*p:(i+1)*p, j*p:(j+1)*p, :]` flattened in
  (row, column, channel) order. H and W must be multiples of p.
  """
  b, height, width, c = x.shape
  p = patch_size
  x = x.reshape(b, height // p, p, width // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
  return x.reshape(b, (height // p) * (width // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
  b, _, features = tokens.shape
  p = patch_size
  c = features // (p * p)
  x = tokens.reshape(b, height // p, width // p, p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, p, W/p, p, C]
  return x.reshape(b, height, width, c)


def sincos_position_embedding(grid_height: int, grid_width: int, dim: int) -> np.ndarray:
  """Fixed 2D sin-cos position embedding of a token grid, [grid_height * grid_width, dim].

  As DiT's `get_2d_sincos_pos_embed` (MAE): the first half of the features encodes
  the token's column, the second half its row, each as
  `[sin(pos * w_k), cos(pos * w_k)]` with `w_k = 10000 ** (-k / (dim / 4))`.
  Tokens are row-major, as `patchify` orders them.
  """
  if dim % 4:
    raise ValueError(f'a 2D sin-cos position embedding needs a width divisible by 4, got {dim}')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # [D/4]

  def embed_1d(positions):  # [N] -> [N, D/2]
    args = positions[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_height, dtype=np.float64),
                           np.arange(grid_width, dtype=np.float64), indexing='ij')
  emb = np.concatenate([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: x [B, T, D] scaled by (1 + scale) and shifted by shift, both [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  # No affine parameters: adaLN regresses them from the conditioning vector.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_bias=False, use_scale=False,
                      use_fast_variance=False, force_float32_reductions=True, dtype=dtype,
                      name=name)


def _zero_dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  zeros = nn.initializers.zeros_init()
  return nn.Dense(features, kernel_init=zeros, bias_init=zeros, dtype=dtype, name=name)


class Mlp(nn.Module):
  """Dense -> GELU (tanh approximation, as DiT) -> Dense.

  Attributes:
    hidden_features: width of the hidden layer.
    dtype: compute dtype.
  """

  hidden_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [..., D] -> [..., D]."""
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, name=name)
    h = jax.nn.gelu(dense(self.hidden_features, 'fc1')(x), approximate=True)
    return dense(x.shape[-1], 'fc2')(h)


class DiTBlock(nn.Module):
  """Self-attention (+ cross-attention) + MLP, conditioned by adaLN-Zero.

  Attributes:
    num_heads: attention heads (must divide the token width).
    mlp_ratio: MLP hidden width as a multiple of the token width.
    cross_attention: add a cross-attention sublayer (queries: the tokens; keys and
      values: the context) between self-attention and the MLP.
    dtype: compute dtype; LayerNorm statistics and the softmax stay float32.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  cross_attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, T, D] tokens.
      c: [B, D] conditioning vector (time + class embedding).
      context: [B, S, D_ctx] cross-attention context; used with `cross_attention`.
      context_mask: [B, S] bool, False at padded context positions.

    Returns:
      [B, T, D].
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    # adaLN-Zero: all six modulations start at zero, so every gate is closed and the
    # block is the identity at initialisation.
    modulation = _zero_dense(6 * width, self.dtype, 'adaLN_modulation')(nn.silu(c))  # [B, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, -1)
    h = modulate(_layer_norm('norm1', self.dtype)(x), shift_msa, scale_msa)
    h = Attention(self.num_heads, head_dim, dtype=self.dtype, name='attn')(h)
    x = x + gate_msa[:, None, :] * h
    if self.cross_attention:
      # PixArt-alpha: no norm or modulation on this branch; its output projection
      # starts at zero instead, so the block still starts as the identity.
      x = x + Attention(self.num_heads, head_dim, zero_init_output=True, dtype=self.dtype,
                        name='cross_attn')(x, context, context_mask)
    h = modulate(_layer_norm('norm2', self.dtype)(x), shift_mlp, scale_mlp)
    h = Mlp(int(width * self.mlp_ratio), dtype=self.dtype, name='mlp')(h)
    return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
  """Time- and optionally class- or context-conditional Diffusion Transformer.

  Attributes:
    out_channels: channels of the prediction (eps, x0 or v: the latent channels).
    patch_size: side p of the square patches; H and W must be multiples of it.
      Tokens: (H/p)(W/p); compute grows about as 1/p**2.
    hidden_size: token width D (divisible by num_heads and by 4 for the 2D
      position embedding).
    depth: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width as a multiple of hidden_size.
    num_classes: 0 for an unconditional model (labels are then ignored); otherwise
      the label embedding has `num_classes + 1` rows, the last (index
      `num_classes`) being the learned null class used for classifier-free guidance.
    context_dim: 0 for no context; > 0 adds a cross-attention sublayer to every
      block, attending to a `context` of this width given at call time.
    remat: rematerialisation of each DiT block in the backward pass, a key of
      `layers.REMAT_POLICIES`: '' (none), 'full', 'dots_saveable'. Trades compute
      for activation memory; the result is unchanged.
    dtype: compute dtype (float32 or bfloat16). Parameters stay float32, LayerNorm
      statistics and the attention softmax are float32, and the prediction is
      returned as float32 so that losses and samplers run in float32.
  """

  out_channels: int
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0
  context_dim: int = 0
  remat: str = ''
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
      x: [B, H, W, C] noisy latents; H, W divisible by patch_size.
      t: [B] (or scalar) float timestep indices; fractional values are fine.
      y: [B] int32 labels in [0, num_classes], or None for the null class; ignored
        by an unconditional model, so callers need not branch.
      train: accepted for the denoiser interface; a DiT has no dropout.
      context: [B, S, context_dim] sequence the blocks cross-attend to; required
        when context_dim > 0, else ignored.
      context_mask: [B, S] bool, False at padded context positions (they then get
        no attention weight); None means every position is real. Each row needs
        at least one True.

    Returns:
      [B, H, W, out_channels] float32; exactly zero at initialisation.
    """
    del train  # No dropout: the forward pass is the same in training.
    if x.ndim != 4:
      raise ValueError(f'DiT expects x of shape [B, H, W, C], got {x.shape}')
    batch, height, width, _ = x.shape
    _check_sizes({name: getattr(self, name) for name in _CONFIG_FIELDS})
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'DiT input size {height}x{width} is not divisible by '
                       f'patch_size={self.patch_size}')
    if self.context_dim > 0 and (context is None or context.ndim != 3
                                 or context.shape[0] != batch
                                 or context.shape[-1] != self.context_dim):
      got = None if context is None else context.shape
      raise ValueError(f'DiT with context_dim={self.context_dim} needs a context of shape '
                       f'[B={batch}, S, {self.context_dim}], got {got}')
    if self.context_dim > 0 and context_mask is not None and (
        context_mask.shape != context.shape[:2]):
      raise ValueError(f'DiT: context_mask must be {context.shape[:2]}, got {context_mask.shape}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))  # [B]

    # Patch embedding: a linear map of each flattened patch (= a p x p, stride-p conv).
    tokens = patchify(x, p)  # [B, T, p*p*C]
    h = nn.Dense(self.hidden_size, kernel_init=nn.initializers.xavier_uniform(),
                 dtype=self.dtype, name='patch_embed')(tokens)  # [B, T, D]
    grid_height, grid_width = height // p, width // p
    h = h + jnp.asarray(sincos_position_embedding(grid_height, grid_width, self.hidden_size),
                        h.dtype)[None]

    temb = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE)  # [B, 256], cosines first as DiT
    c = TimestepEmbedding(self.hidden_size, dtype=self.dtype, name='time_embedding')(temb)
    if self.num_classes > 0:  # c: [B, D]
      if y is None:
        y = jnp.full((batch,), self.null_class, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, self.hidden_size,
                       embedding_init=nn.initializers.normal(0.02), dtype=self.dtype,
                       name='class_embedding')(y)

    block_cls = remat(DiTBlock, self.remat)
    cross = self.context_dim > 0
    for i in range(self.depth):
      h = block_cls(self.num_heads, self.mlp_ratio, cross_attention=cross, dtype=self.dtype,
                    name=f'blocks_{i}')(h, c, context if cross else None,
                                        context_mask if cross else None)

    # Final layer: adaLN (shift, scale) and a zero-initialised linear map to patches.
    shift, scale = jnp.split(_zero_dense(2 * self.hidden_size, self.dtype,
                                         'final_adaLN_modulation')(nn.silu(c)), 2, -1)
    h = modulate(_layer_norm('final_norm', self.dtype)(h), shift, scale)
    h = _zero_dense(p * p * self.out_channels, self.dtype, 'final_linear')(h)  # [B, T, p*p*C_out]
    return unpatchify(h, p, height, width).astype(jnp.float32)


# The config fields of `DiT` (its dataclass fields less those the layer above derives).
_CONFIG_FIELDS = ('patch_size', 'hidden_size', 'depth', 'num_heads', 'mlp_ratio', 'context_dim',
                  'remat')


def _check_sizes(fields: Mapping[str, Any]) -> None:
  """The checks of `check_fields` that do not depend on the latent size."""
  get = lambda name: fields.get(name, getattr(DiT, name))
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  for name in ('patch_size', 'hidden_size', 'depth', 'num_heads'):
    if not (is_int(get(name)) and get(name) > 0):
      raise FieldError(name, get(name), 'a positive integer')
  hidden_size, num_heads = get('hidden_size'), get('num_heads')
  if hidden_size % num_heads:
    raise FieldError('num_heads', num_heads, f'a divisor of hidden_size={hidden_size}')
  if hidden_size % 4:
    raise FieldError('hidden_size', hidden_size,
                     'a multiple of 4 (the 2D sin-cos position embedding)')
  mlp_ratio = get('mlp_ratio')
  if not (isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool)
          and int(hidden_size * mlp_ratio) >= 1):
    raise FieldError('mlp_ratio', mlp_ratio,
                     f'a positive number with hidden_size * mlp_ratio >= 1 '
                     f'(hidden_size={hidden_size})')
  if not (is_int(get('context_dim')) and get('context_dim') >= 0):
    raise FieldError('context_dim', get('context_dim'), '0 (no context) or a positive integer')
  if get('remat') not in REMAT_POLICIES:
    raise FieldError('remat', get('remat'), ', '.join(map(repr, REMAT_POLICIES)))


def check_fields(fields: Mapping[str, Any], latent_size: int) -> None:
  """Checks `DiT` config fields (without the derived ones) for latents of side `latent_size`.

  Raises:
    FieldError: naming the first field that cannot work, e.g. a `patch_size` that
      does not divide the latent size or a `num_heads` that does not divide
      `hidden_size`.
  """
  _check_sizes(fields)
  patch_size = fields.get('patch_size', DiT.patch_size)
  if latent_size % patch_size:
    raise FieldError('patch_size', patch_size,
                     f'a divisor of the latent size {latent_size} (the '
                     f'{latent_size}x{latent_size} latents are cut into square patches)')
