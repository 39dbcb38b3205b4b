"""Conditioners: what the latent denoiser is conditioned on, as in the LDM paper.

A conditioner maps the conditioning features of a batch (a dict of arrays, the
batch's own keys below) and a [B] bool `drop` mask to keyword arguments of the
denoiser: a cross-attention `context` [B, S, D] with its `context_mask` [B, S], or a
spatial `concat` [B, h, w, C'] stacked onto the latents. Where `drop` is True the
example gets the conditioner's null condition, the unconditional branch of
classifier-free guidance (Ho & Salimans 2022):

  name         batch keys                    null condition
  text         tokens [B, L] int32           the empty caption ([CLS] + padding)
  precomputed  context [B, L, D] float32     one learned null token
  concat       cond_image [B, h', w', C]     a zero image, flag channel 0

(Class labels need no module: the denoiser embeds them, with its own null class.)
`ldm_jax.conditioning.CONDITIONERS` says how each is configured and fed.

`ConditionedDenoiser` pairs a conditioner with the denoiser so that both live in one
parameter tree, {'denoiser': ..., 'conditioner': ...}, trained (and EMA-averaged,
checkpointed) together.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax import text
from ldm_jax.models.transformer import Attention, FeedForward, LAYER_NORM_EPS

Batch = dict[str, jax.Array]
Encoded = dict[str, jax.Array]


def _drop_rows(drop: jax.Array, value: jax.Array, null: jax.Array) -> jax.Array:
  """value [B, ...] with the rows where drop [B] is True replaced by null [...]."""
  drop = drop.reshape(drop.shape + (1,) * (value.ndim - 1))
  return jnp.where(drop, null, value)


class TextEncoderLayer(nn.Module):
  """Pre-LayerNorm bidirectional self-attention and feed-forward, each residual.

  Attributes:
    num_heads: attention heads (must divide the width).
  """

  num_heads: int

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    """Maps h [B, L, D] with padding mask [B, L] to [B, L, D]."""
    width = h.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, name=name)
    h = h + Attention(self.num_heads, width // self.num_heads, name='attn')(
        norm('norm1')(h), context_mask=mask)
    return h + FeedForward(name='ff')(norm('norm2')(h))


class TextEncoder(nn.Module):
  """BERT-style transformer encoder over word ids, trained from scratch (LDM).

  Token + learned position embeddings, `num_layers` bidirectional layers that
  ignore [PAD], a final LayerNorm; the output is the whole sequence, with the
  padding mask, for the U-Net to cross-attend to.

  Attributes:
    vocab_size: rows of the token embedding (ids >= it are an error upstream).
    max_length: sequence length L ([CLS] included).
    context_dim: width D.
    num_layers: encoder layers.
    num_heads: attention heads (must divide context_dim).
  """

  vocab_size: int
  max_length: int
  context_dim: int
  num_layers: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(self, batch: Batch, drop: jax.Array, *, train: bool = False) -> Encoded:
    del train
    if self.context_dim % self.num_heads:
      raise ValueError(f'TextEncoder: context_dim={self.context_dim} is not divisible by '
                       f'num_heads={self.num_heads}')
    tokens = batch['tokens'].astype(jnp.int32)  # [B, L]
    if tokens.shape[1] != self.max_length:
      raise ValueError(f'TextEncoder: tokens must be [B, {self.max_length}], got {tokens.shape}')
    tokens = _drop_rows(drop, tokens, jnp.asarray(text.empty_caption(self.max_length)))
    mask = tokens != text.PAD
    init = nn.initializers.normal(0.02)  # BERT's initialisation.
    h = nn.Embed(self.vocab_size, self.context_dim, embedding_init=init,
                 name='token_embedding')(tokens)
    h = h + self.param('position_embedding', init, (self.max_length, self.context_dim))
    for i in range(self.num_layers):
      h = TextEncoderLayer(self.num_heads, name=f'layers_{i}')(h, mask)
    h = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name='final_norm')(h)
    return {'context': h, 'context_mask': mask}


class PrecomputedContext(nn.Module):
  """Context embeddings computed outside (e.g. by a pretrained text encoder).

  Rows of `context` that are all zero count as padding, except row 0, which is
  always attended (so that every example has a real position). The null
  condition is one learned token followed by padding.

  Attributes:
    context_dim: width D of the stored embeddings.
  """

  context_dim: int

  @nn.compact
  def __call__(self, batch: Batch, drop: jax.Array, *, train: bool = False) -> Encoded:
    del train
    context = batch['context'].astype(jnp.float32)  # [B, L, D]
    if context.shape[-1] != self.context_dim:
      raise ValueError(f'PrecomputedContext: context must be [B, L, {self.context_dim}], '
                       f'got {context.shape}')
    length = context.shape[1]
    first = jnp.arange(length) == 0  # [L]
    mask = jnp.any(context != 0, axis=-1) | first
    null_token = self.param('null_token', nn.initializers.normal(1.0), (self.context_dim,))
    null_context = jnp.where(first[:, None], null_token, 0.0)  # [L, D]
    return {'context': _drop_rows(drop, context, null_context),
            'context_mask': _drop_rows(drop, mask, first)}


class ConcatCondition(nn.Module):
  """A spatial condition resized to the latent size, plus a presence flag channel.

  LDM's super-resolution and inpainting models concatenate the low-resolution
  image (or mask and masked image) to the U-Net input. The image is resized
  bilinearly (antialiased when shrinking) to `latent_size`; a last channel is 1
  where the condition is present and 0 for the null condition (image zeroed), so
  that the model can tell "no condition" from "a black image".

  Attributes:
    latent_size: (h, w) of the latents.
  """

  latent_size: tuple[int, int]

  @nn.compact
  def __call__(self, batch: Batch, drop: jax.Array, *, train: bool = False) -> Encoded:
    del train
    image = batch['cond_image'].astype(jnp.float32)  # [B, h', w', C]
    b, _, _, c = image.shape
    image = jax.image.resize(image, (b, *self.latent_size, c), method='linear')
    present = jnp.ones((b, *self.latent_size, 1), jnp.float32)
    concat = jnp.concatenate([image, present], axis=-1)
    return {'concat': _drop_rows(drop, concat, jnp.float32(0.0))}


class ConditionedDenoiser(nn.Module):
  """A denoiser and its conditioner as one model (params {'denoiser', 'conditioner'}).

  Attributes:
    denoiser: a `ldm_jax.models.denoiser.Denoiser`; its `context_dim` must match a
      context conditioner.
    conditioner: a conditioner module of this file.
  """

  denoiser: nn.Module
  conditioner: nn.Module

  @property
  def num_classes(self) -> int:
    return self.denoiser.num_classes

  @property
  def null_class(self) -> int:
    return self.denoiser.null_class

  @property
  def context_dim(self) -> int:
    return self.denoiser.context_dim

  def encode(self, cond: Batch, drop: jax.Array, *, train: bool = False) -> Encoded:
    """The conditioner's denoiser inputs for `cond`; the null condition where `drop`."""
    return self.conditioner(cond, drop, train=train)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               cond: Batch | None = None, drop: jax.Array | None = None,
               encoded: Encoded | None = None, train: bool = False) -> jax.Array:
    """Predicts the denoising target.

    Args:
      x: [B, h, w, c] noisy latents.
      t: [B] timesteps.
      y: [B] labels for the denoiser's own class embedding.
      cond: conditioning features (see the module docstring); encoded here.
      drop: [B] bool, null condition where True; None = keep every condition.
      encoded: the output of `encode`, instead of cond (encode once, sample many).
      train: enables dropout.

    Returns:
      [B, h, w, out_channels].
    """
    if encoded is None:
      if cond is None:
        raise ValueError('ConditionedDenoiser needs cond or encoded')
      if drop is None:
        drop = jnp.zeros((x.shape[0],), bool)
      encoded = self.encode(cond, drop, train=train)
    if 'concat' in encoded:
      x = jnp.concatenate([x, encoded['concat'].astype(x.dtype)], axis=-1)
    return self.denoiser(x, t, y, train=train, context=encoded.get('context'),
                     context_mask=encoded.get('context_mask'))
