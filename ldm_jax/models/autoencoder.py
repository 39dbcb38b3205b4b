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
  """

  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  norm_eps: float
  mid_block_attention: bool
  dtype: Dtype = jnp.float32

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
    h = group_norm(h.shape[-1], self.norm_num_groups, self.norm_eps, 'conv_norm_out', self.dtype)(h)
    h = nn.silu(h)
    return nn.Conv(2 * self.latent_channels, (3, 3), padding=1, dtype=self.dtype, name='conv_out')(h)


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
    h = group_norm(h.shape[-1], self.norm_num_groups, self.norm_eps, 'conv_norm_out', self.dtype)(h)
    h = nn.silu(h)
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
