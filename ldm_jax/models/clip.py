"""The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel`) in Flax.

  token + position embeddings -> num_layers x pre-LayerNorm blocks with causal
  self-attention and an MLP -> final LayerNorm = last_hidden_state [B, S, D]

Stable Diffusion 1.x uses OpenAI's CLIP ViT-L/14 text tower (`quick_gelu`, D = 768),
2.x OpenCLIP ViT-H/14's (`gelu`, D = 1024, the penultimate layer kept as the last).
Submodule names are transformers' (`text_model/embeddings/token_embedding`,
`text_model/encoder/layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2,
mlp/{fc1, fc2}}`, `text_model/final_layer_norm`), so that `text_encoder/model.safetensors`
maps onto it by renaming alone.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
}


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention with biased q/k/v/out projections.

  Attributes:
    num_heads: attention heads (must divide the hidden size).
  """

  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, S, D] -> [B, S, D]; position i attends to positions <= i."""
    b, s, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'CLIP: hidden size {d} is not divisible into {self.num_heads} heads')
    split = lambda h: h.reshape(b, s, self.num_heads, d // self.num_heads)  # [B, S, N, D/N]
    q = split(nn.Dense(d, name='q_proj')(x))
    k = split(nn.Dense(d, name='k_proj')(x))
    v = split(nn.Dense(d, name='v_proj')(x))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(D/N)
    return nn.Dense(d, name='out_proj')(out.reshape(b, s, d))


class CLIPMLP(nn.Module):
  """fc2(act(fc1(x))).

  Attributes:
    intermediate_size: hidden width.
    hidden_act: a key of `ACTIVATIONS`.
  """

  intermediate_size: int
  hidden_act: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, name='fc1')(x)
    return nn.Dense(x.shape[-1], name='fc2')(ACTIVATIONS[self.hidden_act](h))


class CLIPEncoderLayer(nn.Module):
  """x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(x)).

  Attributes:
    num_heads: attention heads.
    intermediate_size: MLP hidden width.
    hidden_act: MLP activation, a key of `ACTIVATIONS`.
    layer_norm_eps: LayerNorm epsilon.
  """

  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + CLIPAttention(self.num_heads, name='self_attn')(
        _layer_norm(self.layer_norm_eps, 'layer_norm1')(x))
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, name='mlp')(
        _layer_norm(self.layer_norm_eps, 'layer_norm2')(x))


class CLIPEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(0..S-1)."""

  vocab_size: int
  hidden_size: int
  max_position_embeddings: int

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    s = input_ids.shape[1]
    if s > self.max_position_embeddings:
      raise ValueError(f'CLIP: {s} tokens exceed max_position_embeddings='
                       f'{self.max_position_embeddings}')
    tokens = nn.Embed(self.vocab_size, self.hidden_size, name='token_embedding')(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size,
                         name='position_embedding')(jnp.arange(s))
    return tokens + positions[None]


class CLIPEncoder(nn.Module):
  """`num_layers` CLIPEncoderLayers."""

  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      h = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                           self.layer_norm_eps, name=f'layers_{i}')(h)
    return h


class CLIPTextTransformer(nn.Module):
  """Embeddings, encoder and the final LayerNorm (transformers' `text_model`)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_position_embeddings: int
  hidden_act: str
  layer_norm_eps: float

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    h = CLIPEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                       name='embeddings')(input_ids)
    h = CLIPEncoder(self.num_layers, self.num_heads, self.intermediate_size, self.hidden_act,
                    self.layer_norm_eps, name='encoder')(h)
    return _layer_norm(self.layer_norm_eps, 'final_layer_norm')(h)


class CLIPTextModel(nn.Module):
  """transformers' `CLIPTextModel`: token ids [B, S] -> last_hidden_state [B, S, D] float32.

  Attributes:
    vocab_size: rows of the token embedding.
    hidden_size: D (the U-Net's `cross_attention_dim`).
    intermediate_size: MLP hidden width.
    num_layers: encoder layers.
    num_heads: attention heads.
    max_position_embeddings: longest sequence (77 in Stable Diffusion).
    hidden_act: 'quick_gelu' (SD 1.x) or 'gelu' (SD 2.x).
    layer_norm_eps: LayerNorm epsilon.
  """

  vocab_size: int
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'CLIP: hidden_act={self.hidden_act!r}; accepted: '
                       f'{", ".join(ACTIVATIONS)}')
    return CLIPTextTransformer(
        self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers,
        self.num_heads, self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
        name='text_model')(jnp.asarray(input_ids, jnp.int32))
