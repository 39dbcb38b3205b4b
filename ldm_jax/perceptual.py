"""LPIPS (Zhang et al. 2018), VGG16 variant v0.1: a perceptual distance, loss and metric.

The distance of the `lpips` package's `LPIPS(net='vgg', version='0.1')`: both images
are shifted and scaled with ImageNet-like constants, passed through VGG16's
convolutional trunk, the five feature maps relu1_2 .. relu5_3 are unit-normalized
along channels, their squared differences weighted per channel by the learned
"linear" heads, averaged over space and summed over the five layers.

Weights are read from local files (nothing is downloaded):
  * the trunk from torchvision's `vgg16` state dict (`vgg16-397923af.pth`, read
    without torch, or the same tensors as `.safetensors` / `.npz`); only
    `features.*` is used;
  * the heads from the `lpips` package's `weights/v0.1/vgg.pth`.

    from ldm_jax import perceptual
    lpips_fn, params = perceptual.load_lpips(vgg_path, lin_path)
    distances = lpips_fn(params, x, y)   # x, y: [B, H, W, C] in [-1, 1] -> [B]
"""
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import fileio
from ldm_jax.errors import UserError
from ldm_jax.models import inception
from ldm_jax.models.layers import SmallMapConv

# lpips' ScalingLayer: inputs in [-1, 1] -> (x - shift) / scale.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features up to relu5_3: conv output channels, 'M' = 2x2 max pool.
VGG16_LAYERS = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
                512, 512, 512)
# Index (in `features`) of the ReLU after which each compared feature map is taken.
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
NORM_EPS = 1e-10  # lpips.normalize_tensor


def conv_indices() -> list[int]:
  """Indices of the convolutions in torchvision's `vgg16().features`."""
  indices, index = [], 0
  for layer in VGG16_LAYERS:
    if layer == 'M':
      index += 1
    else:
      indices.append(index)
      index += 2  # Conv then ReLU.
  return indices


class VGG16Features(nn.Module):
  """VGG16's trunk; returns the five feature maps LPIPS compares.

  Submodules are named after torchvision's indices (`features_0`, `features_2`, ...).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, H, W, 3] (already scaled) -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
    outputs, index = [], 0
    for layer in VGG16_LAYERS:
      if layer == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        index += 1
        continue
      # The deepest maps are 2x2 and 1x1 for 32x32 images: `SmallMapConv`.
      x = nn.relu(SmallMapConv(layer, name=f'features_{index}')(x))
      index += 2
      if index - 1 in TAPS:
        outputs.append(x)
    return outputs


def _unit_normalize(features: jax.Array) -> jax.Array:
  """features / (||features||_channels + eps), with a finite gradient at zero."""
  squared = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return features / (norm + NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS distance between two image batches."""

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """x, y: [B, H, W, C] in [-1, 1], C = 1 (repeated to 3) or 3 -> [B] distances."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f'LPIPS expects two [B, H, W, 1 or 3] batches of one shape, got '
                       f'{x.shape} and {y.shape}')
    vgg = VGG16Features(name='vgg')

    def features(images):
      images = images.astype(jnp.float32)
      if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
      return vgg((images - jnp.asarray(SHIFT)) / jnp.asarray(SCALE))

    # Two passes, not one over [x; y]: as a loss, only the reconstruction's pass is
    # differentiated, and the backward pass then skips the real images' half.
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for k, (fx, fy) in enumerate(zip(features(x), features(y))):
      diff = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))  # [B, h, w, C_k]
      weights = self.param(f'lin{k}', nn.initializers.ones, (fx.shape[-1],))
      total = total + jnp.mean(diff @ weights, axis=(1, 2))
    return total


def params_from_state_dicts(vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray],
                            vgg_source: str = 'vgg16 weights',
                            lin_source: str = 'LPIPS weights') -> dict:
  """torchvision vgg16 and lpips v0.1 state dicts -> `LPIPS` params.

  Raises:
    UserError: a missing tensor or one of the wrong shape.
  """
  trunk, in_channels = {}, 3
  for index, out_channels in zip(conv_indices(), [c for c in VGG16_LAYERS if c != 'M']):
    kernel = _tensor(vgg, f'features.{index}.weight', (out_channels, in_channels, 3, 3),
                     vgg_source)
    bias = _tensor(vgg, f'features.{index}.bias', (out_channels,), vgg_source)
    trunk[f'features_{index}'] = {'kernel': jnp.asarray(kernel.transpose(2, 3, 1, 0)),
                                  'bias': jnp.asarray(bias)}
    in_channels = out_channels
  params = {'vgg': trunk}
  for k, channels in enumerate(CHANNELS):
    weight = _tensor(lin, f'lin{k}.model.1.weight', (1, channels, 1, 1), lin_source)
    params[f'lin{k}'] = jnp.asarray(weight.reshape(channels))
  return params


def _tensor(state_dict: dict[str, np.ndarray], name: str, shape: tuple[int, ...],
            source: str) -> np.ndarray:
  if name not in state_dict:
    raise UserError(f'{source}: tensor {name!r} is missing (expected shape {shape})')
  value = np.asarray(state_dict[name], np.float32)
  if value.shape != shape:
    raise UserError(f'{source}: tensor {name!r} has shape {value.shape}, expected {shape}')
  return value


def read_weights(path: str, what: str) -> dict[str, np.ndarray]:
  """A state dict from a .pth (torch zip or legacy format), .npz or .safetensors file."""
  if not path:
    raise UserError(f'{what}: no file given')
  if not fileio.isfile(path):
    raise UserError(f'{what} {path!r}: no such file')
  if path.endswith('.npz'):
    return fileio.load_npz(path)
  if path.endswith('.safetensors'):
    return inception.read_safetensors(path)
  return inception.read_torch_state_dict(path, what)


LPIPSFn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def load_lpips(vgg_path: str, lin_path: str) -> tuple[LPIPSFn, dict]:
  """The LPIPS distance function and its parameters, from local weight files.

  Args:
    vgg_path: torchvision's vgg16 state dict (`.pth`, `.safetensors` or `.npz`).
    lin_path: the lpips package's `weights/v0.1/vgg.pth` (or the same as `.npz`).

  Returns:
    (lpips_fn, params): `lpips_fn(params, x, y)` maps two [B, H, W, C] batches in
    [-1, 1] (C = 1 or 3) to [B] distances; it is jittable and differentiable in x, y.

  Raises:
    UserError: a missing or unreadable file or a tensor of the wrong shape.
  """
  vgg = read_weights(vgg_path, 'LPIPS vgg16 weights')
  lin = read_weights(lin_path, 'LPIPS linear-head weights')
  params = params_from_state_dicts(vgg, lin, f'LPIPS vgg16 weights {vgg_path}',
                                   f'LPIPS linear-head weights {lin_path}')
  return lpips_fn, params


def lpips_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """LPIPS distances [B] of two [B, H, W, C] batches in [-1, 1] under `params`."""
  return _MODULE.apply({'params': params}, x, y)


_MODULE = LPIPS()

