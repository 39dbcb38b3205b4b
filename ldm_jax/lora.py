"""LoRA: low-rank adapters over a frozen parameter tree (Hu et al. 2021).

Functional, so the U-Net needs no change: for each targeted kernel W (a dense
[in, out] or a conv [kh, kw, in, out]) the adapters hold A [kh·kw·in, r] and
B [r, out], and the model runs with

    W' = W + (alpha / r) · reshape(A @ B, W.shape)

B starts at zero, so an adapted model starts exactly at its base. An adapted layer
has r · (in·kh·kw + out) trainable scalars. The adapter tree mirrors the parameter
tree: `params[...]['to_q']['kernel']` is adapted by `adapters[...]['to_q']['lora_a']`
and `['lora_b']`.
"""
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from ldm_jax.errors import UserError

Params = Any

# Attention projections of every AttentionBlock.
ATTENTION_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out')
# Self- and cross-attention projections of the spatial transformers (Stable Diffusion).
TRANSFORMER_ATTENTION_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out_0')
# Submodule names whose kernels may be adapted: attention projections, ResnetBlock
# convs and time projection, resampling convs, the U-Net's outer convs and time MLP.
TARGETS = ATTENTION_TARGETS + ('to_out_0', 'conv1', 'conv2', 'conv_shortcut', 'time_emb_proj', 'conv',
                               'conv_in', 'conv_out', 'linear_1', 'linear_2')


def target_kernels(params: Params, targets: Sequence[str]) -> list[tuple[str, ...]]:
  """Paths of the kernels whose submodule name is one of `targets`, in tree order."""
  return [path for path in traverse_util.flatten_dict(params)
          if path[-1] == 'kernel' and len(path) > 1 and path[-2] in targets]


def num_adapter_params(kernel_shape: Sequence[int], rank: int) -> int:
  """Trainable scalars adapting a kernel: r · (in·kh·kw + out)."""
  return rank * (math.prod(kernel_shape[:-1]) + kernel_shape[-1])


def init_adapters(rng: jax.Array, params: Params, *, rank: int,
                  targets: Sequence[str]) -> Params:
  """Adapters for every targeted kernel of `params`: A ~ N(0, 1/fan_in), B = 0.

  Args:
    rng: PRNG key.
    params: the base parameter tree (arrays or ShapeDtypeStructs).
    rank: r > 0.
    targets: submodule names to adapt (see `TARGETS`).

  Returns:
    The adapter tree (see the module docstring).

  Raises:
    UserError: when no kernel matches `targets`.
  """
  flat = traverse_util.flatten_dict(params)
  paths = target_kernels(params, targets)
  if not paths:
    raise UserError(f'config.diffusion.lora.targets={tuple(targets)} match no layer of the '
                    f'U-Net; accepted: names from {", ".join(TARGETS)}')
  adapters = {}
  for i, path in enumerate(paths):
    shape, dtype = flat[path].shape, flat[path].dtype
    fan_in = math.prod(shape[:-1])
    a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, rank), dtype) / math.sqrt(fan_in)
    adapters[path[:-1] + ('lora_a',)] = a
    adapters[path[:-1] + ('lora_b',)] = jnp.zeros((rank, shape[-1]), dtype)
  return traverse_util.unflatten_dict(adapters)


def merge(params: Params, adapters: Params, scale: float) -> Params:
  """`params` with every adapted kernel replaced by W + scale · reshape(A @ B)."""
  flat = dict(traverse_util.flatten_dict(params))
  flat_adapters = traverse_util.flatten_dict(adapters)
  for path in {p[:-1] for p in flat_adapters}:
    kernel = flat[path + ('kernel',)]
    delta = flat_adapters[path + ('lora_a',)] @ flat_adapters[path + ('lora_b',)]
    flat[path + ('kernel',)] = kernel + scale * delta.reshape(kernel.shape)
  return traverse_util.unflatten_dict(flat)


class Adapted:
  """A model seen through adapters: `apply({'params': adapters}, ...)` runs the merged model.

  Every other attribute (e.g. `num_classes`) is the wrapped model's, so code that
  applies a U-Net works unchanged on an adapted one. Built inside a jitted function,
  `base_params` are traced arguments, not constants.
  """

  def __init__(self, model, base_params: Params, scale: float):
    self.model, self.base_params, self.scale = model, base_params, scale

  def apply(self, variables, *args, **kwargs):
    params = merge(self.base_params, variables['params'], self.scale)
    return self.model.apply({'params': params}, *args, **kwargs)

  def __getattr__(self, name: str):
    if name == 'model':  # Not set yet (e.g. during copying): no recursion.
      raise AttributeError(name)
    return getattr(self.model, name)
