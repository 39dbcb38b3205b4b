"""KL-regularised autoencoder (first stage of latent diffusion).

The layout and submodule names reproduce diffusers `AutoencoderKL`, so the Stable
Diffusion VAE is `AutoencoderKL(out_channels=3, block_out_channels=(128, 256, 512,
512), layers_per_block=2, latent_channels=4)` and its weights load by renaming.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, DownBlock, MidBlock, UpBlock, group_norm

# Bounds on the posterior log-variance, as in the reference implementation: they keep
# exp(logvar) finite early in training without affecting a trained model.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """Draws z ~ N(mean, exp(logvar)) by reparameterisation.

  Args:
    mean: [B, h, w, c] posterior mean.
    logvar: [B, h, w, c] posterior log-variance.
    rng: PRNG key.

  Returns:
    [B, h, w, c] latents `mean + exp(0.5 * logvar) * eps`, eps ~ N(0, I).
  """
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * noise


class Encoder(nn.Module):
  """Image -> 2 * latent_channels moments (before `quant_conv`).

  Attributes:
    block_out_channels: channels per resolution level, highest resolution first.
    layers_per_block: ResnetBlocks per level.
    latent_channels: latent channels; the output has twice as many (mean, logvar).
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    mid_block_attention: self-attention in the middle block.
    dtype: compute dtype.
    double_z: output 2 * latent_channels (mean and logvar); False for VQ models.
  """

  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  norm_eps: float
  mid_block_attention: bool
  dtype: Dtype = jnp.float32
  double_z: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [B, H, W, C] -> [B, H/f, W/f, 2 * latent_channels]."""
    h = nn.Conv(self.block_out_channels[0], (3, 3), padding=1, dtype=self.dtype, name='conv_in')(x)
    num_levels = len(self.block_out_channels)
    for i, channels in enumerate(self.block_out_channels):
      h, _ = DownBlock(
          out_channels=channels,
          num_layers=self.layers_per_block,
          norm_num_groups=self.norm_num_groups,
          norm_eps=self.norm_eps,
          add_downsample=i < num_levels - 1,
          asymmetric_padding=True,
          dtype=self.dtype,
          name=f'down_blocks_{i}',
      )(h)
    h = _mid_block(self)(h)
    h = group_norm(h.shape[-1], self.norm_num_groups, self.norm_eps, 'conv_norm_out', self.dtype,
                   'silu')(h)
    channels = 2 * self.latent_channels if self.double_z else self.latent_channels
    return nn.Conv(channels, (3, 3), padding=1, dtype=self.dtype, name='conv_out')(h)


def _mid_block(coder: 'Encoder | Decoder') -> MidBlock:
  """The SD VAE middle block: ResNet, single-head attention (if enabled), ResNet."""
  return MidBlock(coder.norm_num_groups, coder.norm_eps,
                  attention_heads=1 if coder.mid_block_attention else None, dtype=coder.dtype,
                  name='mid_block')


class Decoder(nn.Module):
  """Latents (after `post_quant_conv`) -> image.

  Attributes:
    out_channels: image channels.
    block_out_channels: channels per level as in the encoder (used reversed).
    layers_per_block: the decoder has `layers_per_block + 1` ResnetBlocks per level.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    mid_block_attention: self-attention in the middle block.
    dtype: compute dtype.
  """

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  norm_eps: float
  mid_block_attention: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps z [B, h, w, c] -> [B, h*f, w*f, out_channels]."""
    reversed_channels = tuple(reversed(self.block_out_channels))
    h = nn.Conv(reversed_channels[0], (3, 3), padding=1, dtype=self.dtype, name='conv_in')(z)
    h = _mid_block(self)(h)
    for i, channels in enumerate(reversed_channels):
      h = UpBlock(
          out_channels=channels,
          num_layers=self.layers_per_block + 1,
          norm_num_groups=self.norm_num_groups,
          norm_eps=self.norm_eps,
          add_upsample=i < len(reversed_channels) - 1,
          dtype=self.dtype,
          name=f'up_blocks_{i}',
      )(h)
    h = group_norm(h.shape[-1], self.norm_num_groups, self.norm_eps, 'conv_norm_out', self.dtype,
                   'silu')(h)
    return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name='conv_out')(h)


class AutoencoderKL(nn.Module):
  """Variational autoencoder with a diagonal Gaussian posterior.

  Attributes:
    out_channels: image channels of the reconstruction.
    block_out_channels: channels per resolution level, highest resolution first; the
      downsampling factor is `f = 2 ** (len(block_out_channels) - 1)`.
    layers_per_block: ResnetBlocks per encoder level (decoder: one more).
    latent_channels: channels of the latent z.
    norm_num_groups: GroupNorm groups everywhere.
    norm_eps: GroupNorm epsilon (1e-6 in the SD VAE).
    mid_block_attention: self-attention in the encoder and decoder middle blocks.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32 and the
      posterior and reconstructions are returned as float32.
  """

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  mid_block_attention: bool = True
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    """Spatial factor f between images and latents."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def diffusion_channels(self) -> int:
    """Channels of the latents that stage 2 diffuses."""
    return self.latent_channels

  def setup(self):
    if not self.block_out_channels:
      raise ValueError('block_out_channels must name at least one level')
    self.encoder = Encoder(
        block_out_channels=tuple(self.block_out_channels),
        layers_per_block=self.layers_per_block,
        latent_channels=self.latent_channels,
        norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps,
        mid_block_attention=self.mid_block_attention,
        dtype=self.dtype,
    )
    self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)
    self.decoder = Decoder(
        out_channels=self.out_channels,
        block_out_channels=tuple(self.block_out_channels),
        layers_per_block=self.layers_per_block,
        norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps,
        mid_block_attention=self.mid_block_attention,
        dtype=self.dtype,
    )

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior parameters of q(z | x).

    Args:
      x: [B, H, W, C] images in [-1, 1]; H and W divisible by `downsample_factor`.

    Returns:
      (mean, logvar), each [B, H/f, W/f, latent_channels]; logvar clipped to
      [LOGVAR_MIN, LOGVAR_MAX].
    """
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(
          f'AutoencoderKL.encode expects [B, H, W, C] with H and W divisible by the '
          f'downsampling factor {f}, got shape {x.shape}'
      )
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)  # [B, H/f, W/f, 2 * latent]
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """Maps latents z [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(
      self, x: jax.Array, rng: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodes, samples (or takes the mean) and decodes.

    Args:
      x: [B, H, W, C] images in [-1, 1].
      rng: PRNG key to sample z ~ q(z | x); None decodes the posterior mean.

    Returns:
      (reconstruction [B, H, W, out_channels], mean, logvar), the latter two
      [B, H/f, W/f, latent_channels].
    """
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample_latents(mean, logvar, rng)
    return self.decode(z), mean, logvar


# ------------------------------------------------------------------- VQ ----


def codebook_statistics(indices: jax.Array, num_codes: int) -> dict[str, jax.Array]:
  """Usage and perplexity of the codes chosen in a batch.

  Args:
    indices: integer code indices of any shape.
    num_codes: codebook size.

  Returns:
    'codebook_usage': fraction of the codebook chosen at least once;
    'codebook_perplexity': exp(entropy) of the codes' empirical distribution
    (1 when one code is used, num_codes when all are used equally).
  """
  counts = jnp.bincount(indices.ravel(), length=num_codes).astype(jnp.float32)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return {'codebook_usage': jnp.mean(counts > 0), 'codebook_perplexity': jnp.exp(entropy)}


CODEBOOK_UPDATES = ('loss', 'ema')


def ema_codebook_update(cluster_size: jax.Array, embed_sum: jax.Array, latents: jax.Array,
                        indices: jax.Array, decay: float | jax.Array, epsilon: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA step of the codebook statistics (VQ-VAE-2; taming's `EMAVectorQuantizer`).

  With n_k the number of latents assigned to code k and s_k their sum in this batch:

    N_k <- decay * N_k + (1 - decay) * n_k             (cluster sizes)
    m_k <- decay * m_k + (1 - decay) * s_k             (embedding sums)
    e_k  = m_k / Ñ_k,  Ñ_k = (N_k + epsilon) / (Σ_j N_j + K * epsilon) * Σ_j N_j

  (Laplace smoothing keeps Ñ_k > 0 for codes no latent chose).

  Args:
    cluster_size: [K] N.
    embed_sum: [K, D] m.
    latents: [..., D] encoder outputs (the quantizer's inputs).
    indices: [...] their codes.
    decay: EMA decay in (0, 1).
    epsilon: Laplace smoothing constant > 0.

  Returns:
    (new cluster_size [K], new embed_sum [K, D], codebook e [K, D]).
  """
  num_codes = cluster_size.shape[0]
  flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
  onehot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32)  # [N, K]
  cluster_size = decay * cluster_size + (1.0 - decay) * jnp.sum(onehot, axis=0)
  embed_sum = decay * embed_sum + (1.0 - decay) * (onehot.T @ flat)
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
  return cluster_size, embed_sum, embed_sum / smoothed[:, None]


class VectorQuantizer(nn.Module):
  """Nearest-neighbour codebook lookup with a straight-through gradient (VQ-VAE).

  The losses are those of taming-transformers' `VectorQuantizer2` and diffusers'
  `VectorQuantizer` (legacy=True, the one LDM's VQ models were trained with):
  mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2). With `legacy=False` beta
  weights the commitment term instead, as in the VQ-VAE paper.

  With `codebook_update='ema'` the codes are not learned by gradient: they follow
  exponential moving averages of the encoder outputs assigned to them
  (`ema_codebook_update`, applied by the training step), and the loss is the
  commitment term alone, beta * mean((sg[z_q] - z)^2), as in taming's
  `EMAVectorQuantizer` and VQ-VAE-2.

  Attributes:
    num_embeddings: codebook size.
    embedding_dim: code width.
    beta: weight of the second term (see above).
    legacy: taming's (and diffusers') term weighting.
    codebook_update: 'loss' (codes learned through the codebook loss) or 'ema'.
  """

  num_embeddings: int
  embedding_dim: int
  beta: float = 0.25
  legacy: bool = True
  codebook_update: str = 'loss'

  def setup(self):
    scale = 1.0 / self.num_embeddings
    self.embedding = nn.Embed(
        self.num_embeddings, self.embedding_dim, name='embedding',
        embedding_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -scale, scale))

  def codebook(self) -> jax.Array:
    """[num_embeddings, embedding_dim] float32 code vectors."""
    return self.embedding.embedding.astype(jnp.float32)

  def nearest(self, z: jax.Array) -> jax.Array:
    """Index of the nearest code of each vector: [..., D] -> [...] int32."""
    codes = self.codebook()
    flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    distances = (jnp.sum(jnp.square(flat), -1, keepdims=True) - 2.0 * flat @ codes.T
                 + jnp.sum(jnp.square(codes), -1))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantizes z [B, h, w, D].

    Returns:
      (z_q [B, h, w, D] with straight-through gradient to z, the codebook loss [],
      the code indices [B, h, w]).
    """
    z = z.astype(jnp.float32)
    indices = self.nearest(z)
    z_q = jnp.take(self.codebook(), indices, axis=0)
    to_codes = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))   # moves the encoder
    to_inputs = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))  # moves the codes
    if self.codebook_update == 'ema':  # The codes move by `ema_codebook_update`.
      loss = self.beta * to_codes
    elif self.legacy:
      loss = to_codes + self.beta * to_inputs
    else:
      loss = self.beta * to_codes + to_inputs
    return z + jax.lax.stop_gradient(z_q - z), loss, indices


class VQModel(nn.Module):
  """Vector-quantized autoencoder (LDM's VQ-f4/f8 first stages), diffusers `VQModel` layout.

  encode: image -> encoder -> `quant_conv` -> pre-quantization latents h (what stage
  2 diffuses, as in LDM); decode: h -> `quantize` -> `post_quant_conv` -> decoder.

  Attributes:
    out_channels: image channels of the reconstruction.
    block_out_channels: channels per level, highest resolution first.
    layers_per_block: ResnetBlocks per encoder level (decoder: one more).
    latent_channels: channels of the encoder output / decoder input.
    num_vq_embeddings: codebook size.
    vq_embed_dim: code width (channels of h); 0 = latent_channels.
    beta: codebook loss weight (see `VectorQuantizer`).
    legacy_beta: taming's weighting of the two codebook terms.
    codebook_update: 'loss' (codes learned by gradient through the codebook loss) or
      'ema' (codes = EMA of their assigned encoder outputs; the loss keeps only the
      commitment term, weighted by beta). The EMA statistics live in the stage-1 train
      state (`first_stage.FirstStageTrainState`).
    codebook_ema_decay: decay of those EMAs ('ema' only).
    codebook_ema_epsilon: their Laplace smoothing ('ema' only).
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    mid_block_attention: self-attention in the middle blocks.
    dtype: compute dtype; latents and images are returned as float32.
  """

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  num_vq_embeddings: int
  vq_embed_dim: int = 0
  beta: float = 0.25
  legacy_beta: bool = True
  codebook_update: str = 'loss'
  codebook_ema_decay: float = 0.99
  codebook_ema_epsilon: float = 1e-5
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  mid_block_attention: bool = True
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def embed_dim(self) -> int:
    return self.vq_embed_dim or self.latent_channels

  @property
  def diffusion_channels(self) -> int:
    """Channels of the latents that stage 2 diffuses: the pre-quantization h."""
    return self.embed_dim

  def setup(self):
    if not self.block_out_channels:
      raise ValueError('block_out_channels must name at least one level')
    self.encoder = Encoder(
        block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
        latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps, mid_block_attention=self.mid_block_attention, dtype=self.dtype,
        double_z=False)
    self.quant_conv = nn.Conv(self.embed_dim, (1, 1), dtype=self.dtype)
    if self.codebook_update not in CODEBOOK_UPDATES:
      raise ValueError(f'codebook_update={self.codebook_update!r}; accepted: '
                       f'{", ".join(CODEBOOK_UPDATES)}')
    self.quantize = VectorQuantizer(self.num_vq_embeddings, self.embed_dim, self.beta,
                                    self.legacy_beta, self.codebook_update)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)
    self.decoder = Decoder(
        out_channels=self.out_channels, block_out_channels=tuple(self.block_out_channels),
        layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps, mid_block_attention=self.mid_block_attention, dtype=self.dtype)

  def encode_latents(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> pre-quantization latents h [B, H/f, W/f, embed_dim]."""
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'VQModel.encode expects [B, H, W, C] with H and W divisible by the '
                       f'downsampling factor {f}, got shape {x.shape}')
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(h, logvar) like `AutoencoderKL.encode`: h is deterministic, logvar = LOGVAR_MIN.

    Stage 2 draws h + exp(logvar / 2) * noise, a perturbation of ~3e-7 here, so the
    VQ and KL first stages share one code path.
    """
    h = self.encode_latents(x)
    return h, jnp.full_like(h, LOGVAR_MIN)

  def quantize_latents(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z_q, codebook loss, indices) of h; see `VectorQuantizer`."""
    return self.quantize(h)

  def decode_quantized(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q)).astype(jnp.float32)

  def decode(self, h: jax.Array) -> jax.Array:
    """Pre-quantization latents h -> images: the decoder quantizes first (as in LDM)."""
    z_q, _, _ = self.quantize(h)
    return self.decode_quantized(z_q)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reconstruction [B, H, W, C], codebook loss [], code indices [B, h, w]).

    `rng` is unused (the model is deterministic); it keeps the KL model's signature.
    """
    del rng
    reconstruction, loss, indices, _ = self.reconstruct(x)
    return reconstruction, loss, indices

  def reconstruct(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`__call__`'s outputs and the pre-quantization latents h [B, h, w, D] they came from
    (what the EMA codebook update averages)."""
    h = self.encode_latents(x)
    z_q, loss, indices = self.quantize(h)
    return self.decode_quantized(z_q), loss, indices, h


class IdentityFirstStage(nn.Module):
  """No autoencoder: stage 2 diffuses pixels (LDM-1, the paper's pixel-space baseline).

  Attributes:
    out_channels: image channels (= latent channels).
    dtype: unused; accepted like every first stage's.
  """

  out_channels: int
  dtype: Dtype = jnp.float32

  downsample_factor = 1

  @property
  def diffusion_channels(self) -> int:
    return self.out_channels

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x, logvar = LOGVAR_MIN): the image is its own latent."""
    x = x.astype(jnp.float32)
    return x, jnp.full_like(x, LOGVAR_MIN)

  def decode(self, z: jax.Array) -> jax.Array:
    return z.astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    del rng
    mean, logvar = self.encode(x)
    return self.decode(mean), mean, logvar
