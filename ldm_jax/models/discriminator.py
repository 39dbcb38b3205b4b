"""PatchGAN discriminator of taming-transformers / LDM (pix2pix's `NLayerDiscriminator`).

Conv(4x4, stride 2) + LeakyReLU, then `n_layers - 1` strided Conv + BatchNorm +
LeakyReLU blocks, one stride-1 block, and a stride-1 conv to one logit per patch.
Submodules carry taming's indices (`main_0`, `main_2`, `main_3`, ...), so a taming
state dict maps by renaming.

Batch normalization always uses the statistics of the batch it is given, as taming's
discriminator does during training (the only place it is used); no running
averages are kept, so the discriminator has parameters only.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import SmallMapConv

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d
LEAKY_SLOPE = 0.2


def _normal_around_one(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # taming's weights_init.


class BatchStatNorm(nn.Module):
  """Batch norm with the current batch's mean and (biased) variance over B, H, W."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', _normal_around_one, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    return ((x32 - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * scale + bias).astype(x.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN: [B, H, W, C] images -> [B, h, w, 1] real/fake logits per patch.

  Attributes:
    ndf: channels of the first layer (doubled per layer up to 8x).
    n_layers: strided layers (3 gives 70x70 receptive fields).
    dtype: compute dtype; logits are returned as float32.
  """

  ndf: int = 64
  n_layers: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)  # taming's weights_init for convs.

    def conv(features, stride, bias, index):
      # Its last layers see 4x4 .. 2x2 maps of 256-512 channels: `SmallMapConv`.
      return SmallMapConv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                          use_bias=bias, kernel_init=init, dtype=self.dtype,
                          name=f'main_{index}')

    h = nn.leaky_relu(conv(self.ndf, 2, True, 0)(x.astype(self.dtype)), LEAKY_SLOPE)
    index, mult = 2, 1
    for n in range(1, self.n_layers + 1):
      mult = min(2**n, 8)
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * mult, stride, False, index)(h)
      h = nn.leaky_relu(BatchStatNorm(name=f'main_{index + 1}')(h), LEAKY_SLOPE)
      index += 3
    return conv(1, 1, True, index)(h).astype(jnp.float32)


def params_from_taming(state_dict: dict) -> dict:
  """taming `NLayerDiscriminator` state dict (numpy, `main.{i}.*`) -> Flax params.

  Batch-norm running statistics are not used (see the module docstring) and skipped.
  """
  params: dict = {}
  for name, value in state_dict.items():
    _, index, leaf = name.split('.')
    if leaf in ('running_mean', 'running_var', 'num_batches_tracked'):
      continue
    module = params.setdefault(f'main_{index}', {})
    if value.ndim == 4:
      module['kernel'] = jnp.asarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == 'weight':
      module['scale'] = jnp.asarray(value)
    else:
      module['bias'] = jnp.asarray(value)
  return params
