"""Building blocks shared by the autoencoder and the U-Net.

Submodule names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `to_q`, ...,
`down_blocks_{i}/resnets_{j}`) so that pretrained PyTorch weights map onto these
modules by renaming alone. All modules take NHWC inputs.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.transformer import TRANSFORMER_NORM_EPS, SpatialTransformer

Dtype = Any

# Rematerialisation policies for the U-Net blocks (`remat` model field): '' keeps
# every activation for the backward pass; 'full' keeps only each block's inputs and
# recomputes the rest; 'dots_saveable' keeps matmul outputs (attention projections
# and time-embedding projections) and recomputes convolutions and elementwise ops.
REMAT_POLICIES = {
    '': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}

# How self-attention is computed (`attention_impl` model field); every choice computes
# softmax(q k^T / sqrt(D)) v with a float32 softmax:
#   'xla': `softmax_attention`, einsums and a float32 softmax compiled by XLA, on
#     every backend;
#   'cudnn': cuDNN's fused flash attention (NVIDIA GPU, float16/bfloat16 only; an
#     unsupported device, dtype or shape is an error);
#   'auto': 'cudnn' where it is supported, otherwise 'xla'; never fails.
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
# cuDNN's fused attention kernels: half-precision inputs, head widths up to 128 in
# steps of 8, on Ampere (compute capability 8.0) or newer.
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_CUDNN_MAX_HEAD_DIM = 128
_CUDNN_MIN_COMPUTE_CAPABILITY = 8.0


def cudnn_attention_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether cuDNN fused attention can take q, k, v [B, T, N, D] on the default device."""
  if jax.default_backend() != 'gpu':
    return False
  # Under `jax.default_device(cpu)` (e.g. `bench.model_flops` counting FLOPs on the
  # CPU lowering of a GPU machine) the program is lowered for that device.
  device = jax.config.jax_default_device or jax.devices()[0]
  if getattr(device, 'platform', device) != 'gpu':
    return False
  if 'cuda' not in getattr(device.client, 'platform_version', '').lower():
    return False  # ROCm GPUs have no cuDNN.
  try:
    capability = float(getattr(device, 'compute_capability', '0'))
  except ValueError:
    return False
  head_dim = q.shape[-1]
  return (capability >= _CUDNN_MIN_COMPUTE_CAPABILITY
          and q.dtype == k.dtype == v.dtype and any(q.dtype == d for d in _CUDNN_DTYPES)
          and head_dim <= _CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0
          and k.shape[-1] == head_dim == v.shape[-1])


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          impl: str = 'auto') -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, computed as `impl` (see `ATTENTION_IMPLS`).

  Args:
    q: [B, T, N, D] queries.
    k: [B, S, N, D] keys.
    v: [B, S, N, D] values.
    impl: 'auto', 'xla' or 'cudnn'.

  Returns:
    [B, T, N, D].

  Raises:
    ValueError: an unknown `impl`, or 'cudnn' where cuDNN cannot run these inputs.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'unknown attention_impl {impl!r}; accepted: '
                     f'{", ".join(map(repr, ATTENTION_IMPLS))}')
  if impl == 'xla' or (impl == 'auto' and not cudnn_attention_supported(q, k, v)):
    return softmax_attention(q, k, v)
  if impl == 'cudnn':
    if not cudnn_attention_supported(q, k, v):
      raise ValueError(
          f"attention_impl='cudnn' needs an NVIDIA GPU of compute capability >= "
          f'{_CUDNN_MIN_COMPUTE_CAPABILITY}, float16 or bfloat16 inputs and a head width '
          f'that is a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}; got backend '
          f'{jax.default_backend()!r}, dtype {q.dtype}, head width {q.shape[-1]}; '
          f"accepted: 'auto' (falls back to XLA) or 'xla'")
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  try:  # 'auto' on a supported device: a check inside JAX may still refuse the shapes.
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  except (ValueError, NotImplementedError, RuntimeError):
    return softmax_attention(q, k, v)


def _heads_first(x: jax.Array) -> jax.Array:
  """[B, T, N, D] <-> [B, N, T, D]: each head's tokens contiguous, so that every
  product below is a plain batched matmul (XLA:CPU runs the token-major forms of
  these einsums 3x slower)."""
  return jnp.swapaxes(x, 1, 2)


def _attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """q k^T / sqrt(D) per head in float32, q, k [B, N, T|S, D]: [B, N, T, S]."""
  logits = jnp.einsum('bntd,bnsd->bnts', q, k, preferred_element_type=jnp.float32)
  return logits * (q.shape[-1] ** -0.5)


def _attention_output(logits, v):
  """softmax(logits) v and the log of each row's softmax total, logits [B, N, T, S]."""
  peak = jnp.max(logits, axis=-1, keepdims=True)  # [B, N, T, 1]
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  # Normalized after the product with v: one division per output, not per weight.
  out = jnp.einsum('bnts,bnsd->bntd', weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out / total, peak + jnp.log(total)


def _attention_forward(q, k, v):
  """Heads-first attention: (out [B, N, T, D], log of each row's softmax total)."""
  out, log_total = _attention_output(_attention_logits(q, k), v)
  return out.astype(q.dtype), log_total


def _scaled(x: jax.Array) -> jax.Array:
  """x / sqrt(D), D = x's last axis, in x's dtype."""
  return x * jnp.asarray(x.shape[-1] ** -0.5, x.dtype)


def _attention_forward_cpu(q, k, v):
  """As `_attention_forward`, for the CPU's fused kernel (see `softmax_attention`).

  The scale goes onto q before the product, as in the backward pass's chains: a
  constant multiplying a [B, N, T, S] array is one XLA writes out in full once several
  kernels use it. The log totals are not computed (the CPU backward does not read
  them; computing them would split the kernel); zeros stand in.
  """
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  out, log_total = _attention_output(f32('bntd,bnsd->bnts', _scaled(q), k), v)
  return out.astype(q.dtype), jnp.zeros_like(log_total)


def _softmax(logits: jax.Array, axis: int) -> jax.Array:
  """softmax along `axis` of float32 logits, shifted by the maximum."""
  weights = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True))
  return weights / jnp.sum(weights, axis=axis, keepdims=True)


def _softmax_backward(weights, d_weights, axis):
  """dL/dlogits = w * (dL/dw - sum_axis w dL/dw), the sum over each softmax's axis."""
  return weights * (d_weights - jnp.sum(weights * d_weights, axis=axis, keepdims=True))


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, the softmax in float32 (XLA, any backend).

  The same function as `jax.nn.dot_product_attention(implementation='xla')`,
  computed with fewer passes over the [B, N, T, S] weights, and keeping only q, k, v
  and the output for the backward pass (as flash attention does, without its
  tiling): the backward pass recomputes the weights.

  On most backends the forward pass keeps each row's log-sum-exp and the backward
  pass recomputes the weights once from it, for five products that pass [B, N, T, S]
  arrays between them. On the CPU, where T and S both reach
  `FUSED_ATTENTION_MIN_TOKENS` (and B N min(T, S) reaches 4,096, what XLA:CPU needs
  to fuse the softmax statistics), the forward pass and each gradient are instead one
  chain of products that YNNPACK, XLA:CPU's kernel library, runs as a single fused
  kernel without writing the weights to memory: d_q from the weights row by row, d_k
  and d_v from them column by column (key by key), so that each product contracts the
  matrix's last axis. That recomputes q k^T three times and d_out v^T twice, and at
  16x16 (T = S = 256, batch 32) took 0.85x the wall time and 0.87x the CPU time of
  the five products (benchmarks/README.md, row 40).

  Args:
    q: [B, T, N, D] queries.
    k: [B, S, N, D] keys.
    v: [B, S, N, D] values.

  Returns:
    [B, T, N, D] in q's dtype.
  """
  return _softmax_attention_fwd(q, k, v)[0]


# Where the CPU runs attention as fused kernels (`softmax_attention`): they pay for
# recomputing q k^T and d_out v^T only where the [T, S] weights are large. With T and
# S from 256 tokens on (16x16 maps) the gradient took 0.66-0.92x the CPU time of the
# five separate products; at 128 or fewer tokens, or against 77 text tokens, 1.06-1.3x
# (benchmarks/README.md, row 40).
FUSED_ATTENTION_MIN_TOKENS = 256
# XLA:CPU takes an elementwise op into a YNNPACK kernel only if it or an operand holds
# this many elements; smaller [B, N, T] softmax statistics would split each kernel.
_YNN_MIN_ELEMENTS = 4096


def _by_platform(cpu_fused, default, q, k, *args):
  """`cpu_fused(q, k, *args)` on the CPU where fused kernels pay off, else `default`.

  q and k are heads first, [B, N, T, D] and [B, N, S, D].
  """
  b, heads, t, _ = q.shape
  tokens = min(t, k.shape[2])
  if tokens < FUSED_ATTENTION_MIN_TOKENS or b * heads * tokens < _YNN_MIN_ELEMENTS:
    return default(q, k, *args)
  return jax.lax.platform_dependent(q, k, *args, cpu=cpu_fused, default=default)


def _softmax_attention_fwd(q, k, v):
  q, k, v = map(_heads_first, (q, k, v))
  out, log_total = _by_platform(_attention_forward_cpu, _attention_forward, q, k, v)
  return _heads_first(out), (q, k, v, out, log_total)


def _attention_grads(q, k, v, out, log_total, d_out):
  """Heads-first (d_q, d_k, d_v) from the weights recomputed once from `log_total`."""
  weights = jnp.exp(_attention_logits(q, k) - log_total)  # [B, N, T, S], rows sum to 1.
  d_v = jnp.einsum('bnts,bntd->bnsd', weights.astype(d_out.dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_weights = jnp.einsum('bntd,bnsd->bnts', d_out, v, preferred_element_type=jnp.float32)
  # sum_s w dL/dw is the row's d_out . out.
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (weights * (d_weights - row) * (q.shape[-1] ** -0.5)).astype(q.dtype)
  d_q = jnp.einsum('bnts,bnsd->bntd', d_logits, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum('bnts,bntd->bnsd', d_logits, q, preferred_element_type=jnp.float32)
  return d_q, d_k, d_v


def _attention_grads_fused(q, k, v, out, log_total, d_out):
  """Heads-first (d_q, d_k, d_v), each as one chain of products (the CPU's fused kernels).

  Each chain recomputes what it needs from q, k, v and d_out alone: a value that two
  chains shared would be written to memory between kernels. So each computes the
  logits as a different product (q/sqrt(D) k^T in the forward pass, q (k/sqrt(D))^T
  for d_q, k (q/sqrt(D))^T for d_k, (k/sqrt(D)) q^T for d_v), which keeps XLA from
  merging them into one array, and no constant multiplies a [B, N, T, S] array.
  """
  del out, log_total
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  q_scaled, k_scaled = _scaled(q), _scaled(k)
  # d_q: the weights row by row ([B, N, T, S]), as in the forward pass.
  weights = _softmax(f32('bntd,bnsd->bnts', q, k_scaled), axis=-1)
  d_weights = f32('bntd,bnsd->bnts', d_out, v)
  d_logits = _softmax_backward(weights, d_weights, axis=-1).astype(k.dtype)
  d_q = f32('bnts,bnsd->bntd', d_logits, k_scaled)
  # d_k and d_v: the weights column by column ([B, N, S, T]), each softmax over axis 2,
  # so that their products, too, contract the matrix's last axis.
  weights_t = _softmax(f32('bnsd,bntd->bnst', k, q_scaled), axis=2)
  d_weights_t = f32('bnsd,bntd->bnst', v, d_out)
  d_logits_t = _softmax_backward(weights_t, d_weights_t, axis=2).astype(q.dtype)
  d_k = f32('bnst,bntd->bnsd', d_logits_t, q_scaled)
  weights_v = _softmax(f32('bnsd,bntd->bnst', k_scaled, q), axis=2)
  d_v = f32('bnst,bntd->bnsd', weights_v.astype(d_out.dtype), d_out)
  return d_q, d_k, d_v


def _softmax_attention_bwd(residuals, d_out):
  q, k, v, _, _ = residuals  # Heads first.
  d_out = _heads_first(d_out)
  grads = _by_platform(_attention_grads_fused, _attention_grads, *residuals, d_out)
  return tuple(_heads_first(d.astype(x.dtype)) for d, x in zip(grads, (q, k, v)))


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


# Input maps up to this side are convolved as one matmul over the kernel's shifted
# inputs (`SmallMapConv`): below 4x4, XLA:CPU's convolution is ~100x slower than that
# matmul for hundreds of channels (VGG16's 2x2x512 maps) and its gradients more so (the
# PatchGAN's last layers, from 4x4 maps); at 4x4 both take about the same time.
MATMUL_CONV_MAX_SIDE = 4


def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) as one matmul over the shifted inputs (im2col).

  Args:
    x: [B, H, W, C_in].
    kernel: [kh, kw, C_in, C_out].
    strides: (sy, sx).
    padding: ((top, bottom), (left, right)) zeros.

  Returns:
    [B, H', W', C_out], the convolution's output.
  """
  kh, kw, c_in, c_out = kernel.shape
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h = (padded.shape[1] - kh) // strides[0] + 1
  out_w = (padded.shape[2] - kw) // strides[1] + 1
  columns = jnp.concatenate([
      padded[:, dy:dy + strides[0] * (out_h - 1) + 1:strides[0],
             dx:dx + strides[1] * (out_w - 1) + 1:strides[1]]
      for dy in range(kh) for dx in range(kw)], axis=-1)  # [B, H', W', kh * kw * C_in]
  return columns @ kernel.reshape(kh * kw * c_in, c_out)


class SmallMapConv(nn.Module):
  """`nn.Conv` (same parameters: HWIO `kernel`, `bias`) that runs as `conv_as_matmul` on
  maps of at most `MATMUL_CONV_MAX_SIDE` on a side; the same function either way.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sy, sx).
    padding: ((top, bottom), (left, right)).
    use_bias: add a bias.
    kernel_init: the kernel's initializer.
    dtype: compute dtype (parameters stay float32).
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if min(x.shape[1:3]) <= MATMUL_CONV_MAX_SIDE:
      y = conv_as_matmul(x, kernel, self.strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *,
                       flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Matches diffusers `get_timestep_embedding`: frequencies
  `max_period ** (-k / (half - downscale_freq_shift))` for `k = 0 .. half - 1`,
  output `[cos(t * freqs), sin(t * freqs)]` (sin first without `flip_sin_to_cos`).

  Args:
    t: timesteps, [B], any real values.
    dim: embedding width; an odd width gets a trailing zero column.
    max_period: controls the lowest frequency.
    flip_sin_to_cos: cosines first (diffusers' default); False puts sines first, as
      the original DDPM code does.
    downscale_freq_shift: 0 in diffusers' default, 1 in the original DDPM code.

  Returns:
    [B, dim] float32 embedding.
  """
  if dim < 2:
    raise ValueError(f'timestep embedding dim must be >= 2, got {dim}')
  t = jnp.asarray(t, jnp.float32)
  if t.ndim != 1:
    raise ValueError(f'timesteps must have shape [B], got {t.shape}')
  half = dim // 2
  exponent = jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  freqs = jnp.exp(-jnp.log(max_period) * exponent)  # [half]
  args = t[:, None] * freqs[None, :]  # [B, half]
  waves = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
  emb = jnp.concatenate(waves, axis=-1)  # [B, 2 * half]
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _own_buffer_on_cpu(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """`fn(x)`, which XLA:CPU computes into buffers of its own.

  XLA fuses a cheap computation into every loop that reads its result. For GroupNorm's
  [B, groups] -> [B, C] statistics that puts a division by the group size into each
  element of the [B, H, W, C] passes that read them, which made those passes 2-3.5x
  slower on the CPU than reading [B, C] arrays (benchmarks/README.md, row 34).
  `lax.optimization_barrier` did not keep them apart (row 30); a conditional does: on
  the CPU, `fn` runs inside `lax.cond` whose two branches are both `fn`, on a predicate
  XLA cannot fold (x's first element equals itself, false only for NaN). With x split
  over several CPU devices, that predicate costs one small all-reduce. Other platforms
  run `fn` as it is.
  """
  def on_cpu(x):
    first = x.reshape(-1)[0]
    return jax.lax.cond(first == first, fn, fn, x)
  return jax.lax.platform_dependent(x, cpu=on_cpu, default=fn)


def _group_sums(per_channel: jax.Array, num_groups: int) -> jax.Array:
  """[B, C] per-channel sums -> [B, C], each channel holding its group's sum.

  An array of its own on the CPU (`_own_buffer_on_cpu`), not recomputed per element.
  """
  b, c = per_channel.shape

  def sums(per_channel):
    groups = per_channel.reshape(b, num_groups, c // num_groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(groups, (b, num_groups, c // num_groups)).reshape(b, c)
  return _own_buffer_on_cpu(sums, per_channel)


def _group_moments(x: jax.Array, num_groups: int, epsilon: float):
  """x [B, P, C] float32 -> per-channel (group mean, 1 / group std), each [B, 1, C].

  Two passes (the mean, then the squared deviations from it): E[x^2] - E[x]^2 loses
  precision for large activations. Each pass sums over positions first, a
  reduction along contiguous channel vectors, and then over a group's channels.
  """
  count = x.shape[1] * (x.shape[2] // num_groups)
  mean = _group_sums(x.sum(1), num_groups)[:, None] / count
  variance = _group_sums(jnp.square(x - mean).sum(1), num_groups)[:, None] / count
  return mean, jax.lax.rsqrt(variance + epsilon)


# What GroupNorm may apply to its output (`activation`): '' nothing, 'silu' x * sigmoid(x).
GROUP_NORM_ACTIVATIONS = ('', 'silu')


def _normalized(x3, scale, bias, mean, inv_std):
  """(x - mean) / std * scale + bias in float32; x3 [B, P, C], statistics [B, 1, C]."""
  return (x3 - mean) * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm_apply(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                     epsilon: float, dtype: Dtype, activation: str = '') -> jax.Array:
  """GroupNorm of x [B, ..., C] with per-channel `scale` and `bias`, then `activation`.

  Computed in float32 and returned as `dtype`. Without an activation it is the
  function of `flax.linen.GroupNorm(use_fast_variance=False,
  force_float32_reductions=True)`; with 'silu' it is `nn.silu` of that (in float32).
  The backward pass keeps only x and the [B, C] statistics and takes every reduction
  it needs in one pass over the gradient.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype, activation)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype, activation):
  x3 = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)  # [B, P, C]
  mean, inv_std = _group_moments(x3, num_groups, epsilon)
  y = _normalized(x3, scale, bias, mean, inv_std)
  if activation == 'silu':
    y = jax.nn.silu(y)
  # The bias is needed again only to recompute the activation's input.
  return (y.reshape(x.shape).astype(dtype),
          (x, scale, bias if activation else None, mean, inv_std))


def _group_norm_bwd(num_groups, epsilon, dtype, activation, residuals, d_y):
  del epsilon, dtype
  x, scale, bias, mean, inv_std = residuals  # scale and bias are float32 parameters.
  b, c = x.shape[0], x.shape[-1]
  x3 = x.reshape(b, -1, c).astype(jnp.float32)
  x_hat = (x3 - mean) * inv_std  # [B, P, C]
  d_y = d_y.reshape(x_hat.shape).astype(jnp.float32)
  if activation == 'silu':  # d silu(n) / dn = s (1 + n (1 - s)), s = sigmoid(n).
    n = _normalized(x3, scale, bias, mean, inv_std)
    s = jax.nn.sigmoid(n)
    d_y = d_y * (s * (1 + n * (1 - s)))
  d_bias_b, d_scale_b = d_y.sum(1), (d_y * x_hat).sum(1)  # [B, C] each.
  scale32 = scale.astype(jnp.float32)
  count = x_hat.shape[1] * (c // num_groups)
  # d x_hat = d_y * scale; dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
  # the means over each (image, group).
  mean_d = _group_sums(d_bias_b * scale32, num_groups)[:, None] / count
  mean_dx = _group_sums(d_scale_b * scale32, num_groups)[:, None] / count
  d_x = inv_std * (d_y * scale32 - mean_d - x_hat * mean_dx)
  return (d_x.reshape(x.shape).astype(x.dtype), d_scale_b.sum(0).astype(scale.dtype),
          d_bias_b.sum(0).astype(scale.dtype))


group_norm_apply.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm over the last axis (parameters `scale` and `bias`, as flax's GroupNorm).

  Attributes:
    num_groups: groups (must divide the channels).
    epsilon: added to the variance.
    dtype: output dtype; the statistics and the normalization run in float32.
    activation: one of `GROUP_NORM_ACTIVATIONS`, applied to the output.
    fuse_activation: compute the activation inside the norm's own function, whose
      backward pass recomputes its input from x and the statistics instead of
      keeping it. Off by default: the train step was slower fused on the CPU (1.1x)
      and on an H200 (1.02x) (benchmarks/README.md, rows 19 and 26).
  """

  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  activation: str = ''
  fuse_activation: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    if not self.activation or self.fuse_activation:
      return group_norm_apply(x, scale, bias, self.num_groups, self.epsilon, self.dtype,
                              self.activation)
    return nn.silu(group_norm_apply(x, scale, bias, self.num_groups, self.epsilon,
                                    self.dtype))


def group_norm(channels: int, num_groups: int, epsilon: float, name: str,
               dtype: Dtype = jnp.float32, activation: str = '',
               fuse_activation: bool = False) -> GroupNorm:
  """Creates a GroupNorm after checking that `channels` splits into `num_groups`.

  Flax's own error for a bad split does not say which layer failed; this one names
  the layer and the numbers so that a bad config is easy to fix.

  Args:
    channels: number of channels the norm will see.
    num_groups: number of groups.
    epsilon: added to the variance.
    name: submodule name; must be called inside a compact method.
    dtype: output dtype; the mean and variance are always reduced in float32.
    activation: '' or 'silu' (see `GROUP_NORM_ACTIVATIONS`).
    fuse_activation: the activation inside the norm's function (`GroupNorm`).

  Returns:
    An unbound `GroupNorm` registered under `name` in the calling module.
  """
  if num_groups <= 0 or channels % num_groups:
    raise ValueError(
        f'GroupNorm {name!r}: {channels} channels are not divisible by '
        f'norm_num_groups={num_groups}'
    )
  if activation not in GROUP_NORM_ACTIVATIONS:
    raise ValueError(f'GroupNorm {name!r}: unknown activation {activation!r}; accepted: '
                     f'{", ".join(map(repr, GROUP_NORM_ACTIVATIONS))}')
  return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                   activation=activation, fuse_activation=fuse_activation, name=name)


def remat(module_cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()):
  """`module_cls`, rematerialised under `REMAT_POLICIES[policy]` ('' = unchanged).

  Args:
    module_cls: the module class to wrap.
    policy: a key of `REMAT_POLICIES`.
    static_argnums: positional `__call__` arguments (counting `self` as 0) that are
      Python values, such as a `train` flag.

  Returns:
    A module class with the same fields and call signature.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {policy!r}; accepted: '
                     f'{", ".join(map(repr, REMAT_POLICIES))}')
  if not policy:
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


class ResnetBlock(nn.Module):
  """Pre-activation residual block with an optional additive time embedding.

  GroupNorm -> SiLU -> Conv3x3 -> (+ Dense(SiLU(temb)) per channel) -> GroupNorm ->
  SiLU -> Dropout -> Conv3x3, plus a 1x1 conv on the shortcut when channels change.

  Attributes:
    out_channels: output channels.
    norm_num_groups: GroupNorm groups (must divide input and output channels).
    norm_eps: GroupNorm epsilon.
    dropout: dropout rate before the second conv (active only with `train=True`).
    dtype: compute dtype of convs, projections and norm outputs (params stay float32).
    fuse_norm_activation: each SiLU inside its GroupNorm's function (`GroupNorm`).
  """

  out_channels: int
  norm_num_groups: int
  norm_eps: float
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  fuse_norm_activation: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in].
      temb: [B, D] time (and class) embedding, or None for blocks without one.
      train: enables dropout (needs the 'dropout' rng collection).

    Returns:
      [B, H, W, out_channels].
    """
    in_channels = x.shape[-1]
    h = group_norm(in_channels, self.norm_num_groups, self.norm_eps, 'norm1', self.dtype,
                   'silu', self.fuse_norm_activation)(x)
    h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name='conv1')(h)  # [B, H, W, C_out]
    if temb is not None:
      # SiLU before the projection as in diffusers and ADM: the embedding MLP ends in
      # a linear layer, so without it each block would only see a linear map of it.
      proj = nn.Dense(self.out_channels, dtype=self.dtype, name='time_emb_proj')(nn.silu(temb))  # [B, C_out]
      h = h + proj[:, None, None, :]
    h = group_norm(self.out_channels, self.norm_num_groups, self.norm_eps, 'norm2', self.dtype,
                   'silu', self.fuse_norm_activation)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name='conv2')(h)
    if in_channels != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name='conv_shortcut')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W spatial tokens, with a residual add.

  Exactly one of `num_heads` and `head_dim` must be set; with `head_dim` the number
  of heads is `C // head_dim` (the diffusers VAE uses `head_dim = C`, one head).

  Attributes:
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    num_heads: number of attention heads.
    head_dim: channels per head.
    dtype: compute dtype of the projections; the softmax runs in float32.
    attention_impl: how the attention itself is computed, one of `ATTENTION_IMPLS`.
  """

  norm_num_groups: int
  norm_eps: float
  num_heads: int | None = None
  head_dim: int | None = None
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies attention.

    Args:
      x: [B, H, W, C].

    Returns:
      [B, H, W, C].
    """
    b, height, width, c = x.shape
    if (self.num_heads is None) == (self.head_dim is None):
      raise ValueError(
          f'AttentionBlock needs exactly one of num_heads / head_dim, got '
          f'num_heads={self.num_heads}, head_dim={self.head_dim}'
      )
    if self.num_heads is not None:
      num_heads = self.num_heads
    else:
      num_heads = c // self.head_dim if self.head_dim > 0 else 0
    if num_heads <= 0 or c % num_heads:
      raise ValueError(
          f'AttentionBlock: {c} channels are not divisible into {num_heads} heads '
          f'(num_heads={self.num_heads}, head_dim={self.head_dim})'
      )
    head_dim = c // num_heads

    h = group_norm(c, self.norm_num_groups, self.norm_eps, 'group_norm', self.dtype)(x)
    h = h.reshape(b, height * width, c)  # [B, T, C]
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q = dense('to_q')(h).reshape(b, height * width, num_heads, head_dim)  # [B, T, N, D]
    k = dense('to_k')(h).reshape(b, height * width, num_heads, head_dim)
    v = dense('to_v')(h).reshape(b, height * width, num_heads, head_dim)
    # Scale 1/sqrt(D); the softmax runs in float32 in both implementations.
    out = dot_product_attention(q, k, v, self.attention_impl)  # [B, T, N, D]
    out = dense('to_out')(out.reshape(b, height * width, c))  # [B, T, C]
    return x + out.reshape(b, height, width, c)


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 conv.

  Attributes:
    out_channels: output channels.
    asymmetric_padding: pad only bottom/right by one and convolve without padding,
      as the diffusers VAE does; otherwise pad one on every side. For even H both
      give H / 2 but sample different pixels, so pretrained VAE weights need the
      asymmetric form.
    dtype: compute dtype.
  """

  out_channels: int
  asymmetric_padding: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Downsamples x: [B, H, W, C] -> [B, H/2, W/2, out_channels]."""
    if self.asymmetric_padding:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      padding = 0
    else:
      padding = 1
    return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=padding, dtype=self.dtype,
                   name='conv')(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv.

  Attributes:
    out_channels: output channels.
    dtype: compute dtype.
  """

  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Upsamples x: [B, H, W, C] -> [B, 2H, 2W, out_channels]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name='conv')(x)


class TimestepEmbedding(nn.Module):
  """Two-layer MLP on the sinusoidal timestep embedding (diffusers names).

  Attributes:
    features: output width (and hidden width).
    dtype: compute dtype.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    """Maps [B, D_in] -> [B, features]."""
    emb = nn.Dense(self.features, dtype=self.dtype, name='linear_1')(emb)
    return nn.Dense(self.features, dtype=self.dtype, name='linear_2')(nn.silu(emb))


def _resnet_block(block: nn.Module, channels: int, name: str) -> nn.Module:
  """A ResnetBlock with `block`'s norm, dropout, dtype and remat settings."""
  # `train` (argument 3, counting self) selects dropout: a Python value, not traced.
  cls = remat(ResnetBlock, block.remat, static_argnums=(3,))
  return cls(channels, block.norm_num_groups, block.norm_eps, block.dropout,
             dtype=block.dtype, fuse_norm_activation=block.fuse_norm_activation, name=name)


def _attention_block(block: nn.Module, name: str) -> nn.Module:
  """An AttentionBlock with `block`'s norm, heads, dtype and remat settings."""
  return remat(AttentionBlock, block.remat)(
      block.norm_num_groups, block.norm_eps, num_heads=block.attention_heads,
      dtype=block.dtype, attention_impl=block.attention_impl, name=name)


def _attend(block: nn.Module, x: jax.Array, name: str, context: jax.Array | None,
            context_mask: jax.Array | None) -> jax.Array:
  """Applies `block`'s attention layer `name` to x [B, H, W, C].

  Self-attention, or with `block.transformer_depth` > 0 a spatial transformer that
  also cross-attends to `context` [B, S, D] (LDM); padded positions of
  `context_mask` [B, S] get no weight.
  """
  if block.transformer_depth:
    if context is None:
      raise ValueError(f'{name}: a spatial transformer needs a context [B, S, D]')
    # Computed in the parameters' float32 whatever `block.dtype`. Its GroupNorm has
    # diffusers' Transformer2DModel epsilon, not the ResnetBlocks' `norm_eps`.
    return remat(SpatialTransformer, block.remat)(
        block.attention_heads, block.transformer_depth, block.use_linear_projection,
        block.norm_num_groups, TRANSFORMER_NORM_EPS, name=name)(x, context, context_mask)
  return _attention_block(block, name)(x)


class DownBlock(nn.Module):
  """`num_layers` ResnetBlocks (each optionally followed by attention) + a Downsample.

  Attributes:
    out_channels: channels of every layer in the block.
    num_layers: number of ResnetBlocks.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    attention_heads: heads of an AttentionBlock after each ResnetBlock; None for none.
    add_downsample: end with a stride-2 Downsample.
    asymmetric_padding: Downsample padding style (see `Downsample`).
    dropout: ResnetBlock dropout rate.
    dtype: compute dtype of every layer.
    remat: rematerialisation policy of each ResnetBlock / AttentionBlock, a key of
      `REMAT_POLICIES`.
    attention_impl: how the AttentionBlocks attend, one of `ATTENTION_IMPLS`.
    fuse_norm_activation: each ResnetBlock's SiLUs inside their GroupNorms' functions.
    transformer_depth: 0 for self-attention layers; > 0 for spatial transformers
      of this depth that also cross-attend to the `context` given at call time.
    use_linear_projection: spatial transformer projections as Dense, not 1x1 conv.
  """

  out_channels: int
  num_layers: int
  norm_num_groups: int
  norm_eps: float
  attention_heads: int | None = None
  add_downsample: bool = True
  asymmetric_padding: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = ''
  attention_impl: str = 'auto'
  fuse_norm_activation: bool = False
  transformer_depth: int = 0
  use_linear_projection: bool = False

  @nn.compact
  def __call__(
      self, x: jax.Array, temb: jax.Array | None = None, *, train: bool = False,
      context: jax.Array | None = None, context_mask: jax.Array | None = None
  ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Applies the block.

    Args:
      x: [B, H, W, C_in].
      temb: [B, D] or None.
      train: enables dropout.
      context: [B, S, D_ctx] for spatial transformers; ignored by self-attention.
      context_mask: [B, S] bool, False at padded context positions.

    Returns:
      The output [B, H', W', out_channels] (H' = H/2 with a Downsample) and the
      skip features: the output of every layer, then of the Downsample.
    """
    skips = []
    for j in range(self.num_layers):
      x = _resnet_block(self, self.out_channels, f'resnets_{j}')(x, temb, train)
      if self.attention_heads is not None:
        x = _attend(self, x, f'attentions_{j}', context, context_mask)
      skips.append(x)
    if self.add_downsample:
      x = Downsample(self.out_channels, self.asymmetric_padding, dtype=self.dtype,
                     name='downsamplers_0')(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(nn.Module):
  """ResnetBlock -> (AttentionBlock) -> ResnetBlock at constant channels.

  Attributes:
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    attention_heads: heads of the middle attention; None to leave it out.
    dropout: ResnetBlock dropout rate.
    dtype: compute dtype of every layer.
    remat: rematerialisation policy of each ResnetBlock / AttentionBlock, a key of
      `REMAT_POLICIES`.
    attention_impl: how the AttentionBlocks attend, one of `ATTENTION_IMPLS`.
    fuse_norm_activation: each ResnetBlock's SiLUs inside their GroupNorms' functions.
    transformer_depth: 0 for self-attention layers; > 0 for spatial transformers
      of this depth that also cross-attend to the `context` given at call time.
    use_linear_projection: spatial transformer projections as Dense, not 1x1 conv.
  """

  norm_num_groups: int
  norm_eps: float
  attention_heads: int | None = 1
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = ''
  attention_impl: str = 'auto'
  fuse_norm_activation: bool = False
  transformer_depth: int = 0
  use_linear_projection: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, *, train: bool = False,
               context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Maps [B, H, W, C] -> [B, H, W, C]; context as in `DownBlock`."""
    c = x.shape[-1]
    x = _resnet_block(self, c, 'resnets_0')(x, temb, train)
    if self.attention_heads is not None:
      x = _attend(self, x, 'attentions_0', context, context_mask)
    return _resnet_block(self, c, 'resnets_1')(x, temb, train)


class UpBlock(nn.Module):
  """`num_layers` ResnetBlocks (optionally on skip-concatenated inputs) + an Upsample.

  Attributes:
    out_channels: channels of every layer in the block.
    num_layers: number of ResnetBlocks.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    attention_heads: heads of an AttentionBlock after each ResnetBlock; None for none.
    add_upsample: end with a nearest x2 Upsample.
    dropout: ResnetBlock dropout rate.
    dtype: compute dtype of every layer.
    remat: rematerialisation policy of each ResnetBlock / AttentionBlock, a key of
      `REMAT_POLICIES`.
    attention_impl: how the AttentionBlocks attend, one of `ATTENTION_IMPLS`.
    fuse_norm_activation: each ResnetBlock's SiLUs inside their GroupNorms' functions.
    transformer_depth: 0 for self-attention layers; > 0 for spatial transformers
      of this depth that also cross-attend to the `context` given at call time.
    use_linear_projection: spatial transformer projections as Dense, not 1x1 conv.
  """

  out_channels: int
  num_layers: int
  norm_num_groups: int
  norm_eps: float
  attention_heads: int | None = None
  add_upsample: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = ''
  attention_impl: str = 'auto'
  fuse_norm_activation: bool = False
  transformer_depth: int = 0
  use_linear_projection: bool = False

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      skips: Sequence[jax.Array] | None = None,
      temb: jax.Array | None = None,
      *,
      train: bool = False,
      context: jax.Array | None = None,
      context_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in].
      skips: None (autoencoder decoder) or exactly `num_layers` skip features
        [B, H, W, C_j], consumed last-first: layer j is fed concat(x, skips[-1 - j]).
      temb: [B, D] or None.
      train: enables dropout.
      context: [B, S, D_ctx] for spatial transformers; ignored by self-attention.
      context_mask: [B, S] bool, False at padded context positions.

    Returns:
      [B, H', W', out_channels], H' = 2H with an Upsample.
    """
    if skips is not None and len(skips) != self.num_layers:
      raise ValueError(f'UpBlock expects {self.num_layers} skip features, got {len(skips)}')
    for j in range(self.num_layers):
      if skips is not None:
        x = jnp.concatenate([x, skips[-1 - j]], axis=-1)  # [B, H, W, C + C_skip]
      x = _resnet_block(self, self.out_channels, f'resnets_{j}')(x, temb, train)
      if self.attention_heads is not None:
        x = _attend(self, x, f'attentions_{j}', context, context_mask)
    if self.add_upsample:
      x = Upsample(self.out_channels, dtype=self.dtype, name='upsamplers_0')(x)
    return x
