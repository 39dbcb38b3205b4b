"""Tests for ldm_jax.models: layers, the KL autoencoder, the U-Net and the registry."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import AUTOENCODERS, MODELS, AutoencoderKL, UNet, count_params, get_model
from ldm_jax.models.autoencoder import LOGVAR_MAX, LOGVAR_MIN, sample_latents
from ldm_jax.models.layers import (
    AttentionBlock,
    dot_product_attention,
    Downsample,
    ResnetBlock,
    Upsample,
    timestep_embedding,
)

# Tiny test-only sizes.
AE_KWARGS = dict(
    out_channels=3, block_out_channels=(8, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4
)
UNET_KWARGS = dict(
    out_channels=4,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_heads=2,
    dropout=0.1,
    num_classes=3,
    norm_num_groups=4,
)
# The diffusers AutoencoderKL of Stable Diffusion (v1/v2 VAE).
SD_VAE_KWARGS = dict(
    out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4
)
SD_VAE_NUM_PARAMS = 83_653_863


def _key(seed: int) -> jax.Array:
  """Init key: XLA's RngBitGenerator compiles several times faster than threefry on CPU."""
  return jax.random.key(seed, impl='unsafe_rbg')


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Test data drawn on the host, so that no sampling kernel is compiled for it."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(module: nn.Module, *args) -> dict:
  """Jitted init: one compilation instead of one per eager op."""
  return jax.jit(module.init)(_key(0), *args)


def _paths(params) -> set[str]:
  """'a/b/c' for every module path (not leaf) in a param tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = set()
  for path, _ in flat:
    keys = [k.key for k in path][:-1]  # drop 'kernel' / 'bias' / 'scale'
    for i in range(1, len(keys) + 1):
      out.add('/'.join(keys[:i]))
  return out


def _identity_kernel(channels: int) -> jax.Array:
  """3x3 conv kernel that copies its input from the centre tap."""
  return jnp.zeros((3, 3, channels, channels)).at[1, 1].set(jnp.eye(channels))


# ---------------------------------------------------------------------------- layers


def test_timestep_embedding_closed_form():
  # dim 8 -> half 4, freqs 10000 ** (-k / 4) = 1, 0.1, 0.01, 0.001.
  t = jnp.array([0.0, 1.5, 250.0])
  emb = np.asarray(timestep_embedding(t, 8))
  freqs = np.array([1.0, 0.1, 0.01, 0.001])
  args = np.array([0.0, 1.5, 250.0])[:, None] * freqs
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_sin_first_with_frequency_shift():
  # The original DDPM form: dim 8, shift 1 -> freqs 10000 ** (-k / 3), sines first.
  t = np.array([0.0, 1.5, 250.0])
  emb = np.asarray(timestep_embedding(jnp.asarray(t), 8, flip_sin_to_cos=False,
                                      downscale_freq_shift=1.0))
  args = t[:, None] * 10000.0 ** (-np.arange(4) / 3)
  np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], -1),
                             rtol=1e-5, atol=1e-5)


def test_timestep_embedding_odd_dim_and_fractional_t():
  emb = timestep_embedding(jnp.array([3.0, 3.25]), 5)
  assert emb.shape == (2, 5)
  np.testing.assert_array_equal(emb[:, -1], 0.0)
  assert not np.allclose(emb[0], emb[1])  # fractional timesteps are distinguished


def test_attention_matches_explicit_softmax():
  b, h, w, c, heads, groups = 2, 3, 4, 8, 2, 4
  x = _normal(0, (b, h, w, c))
  block = AttentionBlock(norm_num_groups=groups, norm_eps=1e-5, num_heads=heads)
  params = _init(block, x)['params']
  out = jax.jit(block.apply)({'params': params}, x)

  xn = np.asarray(x, np.float64).reshape(b, h * w, groups, c // groups)
  mu = xn.mean(axis=(1, 3), keepdims=True)
  var = xn.var(axis=(1, 3), keepdims=True)
  gn = ((xn - mu) / np.sqrt(var + 1e-5)).reshape(b, h * w, c)
  gn = gn * np.asarray(params['group_norm']['scale']) + np.asarray(params['group_norm']['bias'])
  dense = lambda v, n: v @ np.asarray(params[n]['kernel']) + np.asarray(params[n]['bias'])
  d = c // heads
  q, k, v = (dense(gn, n).reshape(b, h * w, heads, d) for n in ('to_q', 'to_k', 'to_v'))
  logits = np.einsum('bqnd,bknd->bnqk', q, k) / np.sqrt(d)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  att = np.einsum('bnqk,bknd->bqnd', probs, v).reshape(b, h * w, c)
  expected = np.asarray(x) + dense(att, 'to_out').reshape(b, h, w, c)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  # head_dim=4 on 8 channels is the same layer as num_heads=2.
  by_dim = AttentionBlock(norm_num_groups=groups, norm_eps=1e-5, head_dim=c // heads)
  np.testing.assert_allclose(jax.jit(by_dim.apply)({'params': params}, x), out, rtol=1e-6, atol=1e-6)


def test_attention_implementations_compute_the_softmax_attention():
  b, t, s, heads, d = 2, 16, 12, 4, 32
  q, k, v = (_normal(i, shape) for i, shape in enumerate(
      [(b, t, heads, d), (b, s, heads, d), (b, s, heads, d)]))
  logits = np.einsum('bqnd,bknd->bnqk', np.float64(q), np.float64(k)) / np.sqrt(d)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum('bnqk,bknd->bqnd', probs / probs.sum(-1, keepdims=True), np.float64(v))
  attend = {impl: jax.jit(functools.partial(dot_product_attention, impl=impl))
            for impl in ('auto', 'xla')}
  xla = attend['xla'](q, k, v)
  np.testing.assert_allclose(xla, expected, rtol=1e-5, atol=1e-5)
  # Without a GPU 'auto' is the XLA program itself, in float32 and bfloat16 alike.
  assert jax.default_backend() == 'cpu'
  np.testing.assert_array_equal(attend['auto'](q, k, v), xla)
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  np.testing.assert_array_equal(attend['auto'](q16, k16, v16), attend['xla'](q16, k16, v16))
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    dot_product_attention(q16, k16, v16, 'cudnn')
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    dot_product_attention(q, k, v, 'flash')


@pytest.mark.parametrize('b,t,s', [(2, 16, 12), (4, 320, 256)])
def test_softmax_attention_gradients_equal_jax_attention(b, t, s):
  """The recomputing backward pass gives JAX's own attention gradients (and values):
  at few tokens the five products of every backend, at many (on the CPU) the fused
  kernels, which write no [B, N, T, S] array (nor its transpose) between them."""
  from ldm_jax.models.layers import FUSED_ATTENTION_MIN_TOKENS, softmax_attention

  heads, d = 4, 32
  q, k, v, d_out = (_normal(i, shape) for i, shape in enumerate(
      [(b, t, heads, d), (b, s, heads, d), (b, s, heads, d), (b, t, heads, d)]))
  reference = functools.partial(jax.nn.dot_product_attention, implementation='xla')
  for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    args = [a.astype(dtype) for a in (q, k, v)]
    ours, vjp = jax.vjp(jax.jit(softmax_attention), *args)
    expected, vjp_expected = jax.vjp(reference, *args)
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.float32(ours), np.float32(expected), rtol=tolerance,
                               atol=tolerance)
    for got, want in zip(vjp(d_out.astype(dtype)), vjp_expected(d_out.astype(dtype))):
      assert got.dtype == dtype
      np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tolerance,
                                 atol=tolerance * float(jnp.abs(np.float32(want)).max()))
  grads = jax.jit(jax.grad(lambda *args: jnp.sum(softmax_attention(*args[:3]) * args[3]),
                           argnums=(0, 1, 2)))
  entry = grads.lower(q, k, v, d_out).compile().as_text().split('ENTRY')[1]
  written = set(re.findall(r'= (f32\[[\d,]+\])', entry))
  weights = {f'f32[{b},{heads},{t},{s}]', f'f32[{b},{heads},{s},{t}]'}
  assert weights.isdisjoint(written) == (min(t, s) >= FUSED_ATTENTION_MIN_TOKENS), written


def test_group_norm_values_and_gradients_equal_flax_group_norm():
  """The hand-written backward pass gives Flax's GroupNorm gradients (x, scale, bias)."""
  import flax.linen as nn

  from ldm_jax.models.layers import GroupNorm

  x = _normal(0, (3, 5, 6, 16)) * 3 + 2  # Off-centre, so the mean matters.
  d_y = _normal(1, x.shape)
  flax_norm = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False,
                           force_float32_reductions=True)
  params = flax_norm.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + _normal(2, p.shape), params)
  def loss(module):
    return jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * d_y), argnums=(0, 1)))
  (value, grads), (expected_value, expected_grads) = (
      loss(m)(params, x) for m in (GroupNorm(num_groups=4, epsilon=1e-5), flax_norm))
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # On the CPU the per-group statistics reach the passes over x as per-channel [B, C]
  # arrays of their own, never as [B, groups] broadcast inside each element's loop.
  hlo = loss(GroupNorm(num_groups=4, epsilon=1e-5)).lower(params, x).compile().as_text()
  entry = hlo[hlo.index('ENTRY'):]
  shapes = dict(re.findall(r'%([\w.\-]+) = (\w+\[[\d,]*\])', entry))
  full_size = [re.findall(r'%([\w.\-]+)', operands) for size, operands in
               re.findall(r'= f32\[([\d,]+)\]\S* fusion\((.*?)\), kind', entry)
               if np.prod([int(n) for n in size.split(',')]) == x.size]
  operand_shapes = {shapes[name] for operands in full_size for name in operands}
  assert full_size and 'f32[3,16]' in operand_shapes, operand_shapes
  assert 'f32[3,4]' not in operand_shapes, operand_shapes


def test_group_norm_with_fused_silu_equals_group_norm_then_silu():
  """GroupNorm+SiLU as one function (`fuse_norm_activation=True`) gives the values and
  gradients of GroupNorm followed by `nn.silu` (the default); a bad activation is one line."""
  from ldm_jax.models import layers

  x = _normal(0, (3, 5, 6, 16)) * 3 + 2
  d_y = _normal(1, x.shape)
  scale, bias = _normal(2, (16,)) + 1, _normal(3, (16,))
  def loss(fused, dtype):
    def f(x, scale, bias):
      if fused:
        y = layers.group_norm_apply(x, scale, bias, 4, 1e-5, dtype, 'silu')
      else:
        y = nn.silu(layers.group_norm_apply(x, scale, bias, 4, 1e-5, jnp.float32)).astype(dtype)
      return jnp.sum(jnp.sin(y.astype(jnp.float32)) * d_y)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, scale, bias)
  for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    (value, grads), (expected_value, expected_grads) = loss(True, dtype), loss(False, dtype)
    np.testing.assert_allclose(value, expected_value, rtol=tolerance)
    for got, want in zip(grads, expected_grads):
      np.testing.assert_allclose(got, want, rtol=tolerance,
                                 atol=tolerance * float(jnp.abs(want).max()))
  # The U-Net's field reaches every GroupNorm+SiLU: another program, the same function.
  x, t = _normal(4, (2, 8, 8, 4)), jnp.array([3.0, 700.0])
  unets = [UNet(**{**UNET_KWARGS, 'num_classes': 0, 'fuse_norm_activation': fuse})
           for fuse in (True, False)]
  init = functools.partial(unets[1].init, jax.random.key(0))
  def outer_silus(unet):  # SiLUs outside any norm's function (jax.nn.silu is jitted).
    eqns = jax.make_jaxpr(unet.apply)(jax.eval_shape(init, x, t), x, t).jaxpr.eqns
    return sum(eqn.params.get('name') == 'silu' for eqn in eqns)
  # 17 GroupNorm+SiLUs: two in each of the 8 ResnetBlocks (down 2, mid 2, up 4), conv_norm_out.
  assert outer_silus(unets[1]) - outer_silus(unets[0]) == 17
  @jax.jit  # One program for both, initialized inside it.
  def both(x, t):
    params = init(x, t)
    return [unet.apply(params, x, t) for unet in unets]
  np.testing.assert_allclose(*both(x, t), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="GroupNorm 'norm1': unknown activation 'gelu'"):
    layers.group_norm(16, 4, 1e-5, 'norm1', activation='gelu')


def test_cudnn_attention_is_not_chosen_for_a_program_lowered_for_the_cpu(monkeypatch):
  from ldm_jax.models import layers

  q = jnp.zeros((1, 4, 2, 32), jnp.bfloat16)

  class FakeGpu:
    platform, compute_capability = 'gpu', '9.0'
    client = type('Client', (), {'platform_version': 'PJRT CUDA 12.8'})()

  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(jax, 'devices', lambda *a: [FakeGpu()])
  assert layers.cudnn_attention_supported(q, q, q)
  assert not layers.cudnn_attention_supported(q.astype(jnp.float32), q, q)
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    assert not layers.cudnn_attention_supported(q, q, q)


def test_unet_attention_impl_is_a_checked_field():
  from ldm_jax.models import unet as unet_module
  from ldm_jax.models.denoiser import FieldError

  fields = dict(channel_mult=(1, 2), attention_resolutions=(4,))
  unet_module.check_fields({**fields, 'attention_impl': 'xla'}, 8)
  with pytest.raises(FieldError, match="attention_impl='flash' is not valid; accepted: 'auto'"):
    unet_module.check_fields({**fields, 'attention_impl': 'flash'}, 8)
  x, t = _normal(0, (1, 8, 8, 4)), jnp.array([3.0])
  module = functools.partial(UNet, out_channels=4, base_channels=16, channel_mult=(1, 2),
                             attention_resolutions=(4,), norm_num_groups=8)
  params = module().init(jax.random.PRNGKey(0), x, t)['params']
  params = jax.tree.map(lambda p: p + 0.01, params)  # conv_out is zero at init.
  out = {impl: module(attention_impl=impl).apply({'params': params}, x, t)
         for impl in ('auto', 'xla')}
  np.testing.assert_array_equal(out['auto'], out['xla'])
  assert float(jnp.abs(out['xla']).max()) > 0


def test_attention_is_permutation_equivariant_over_tokens():
  b, h, w, c = 2, 4, 4, 8
  x = _normal(0, (b, h, w, c))
  block = AttentionBlock(norm_num_groups=4, norm_eps=1e-5, num_heads=2)
  params = _init(block, x)
  apply = jax.jit(block.apply)
  perm = np.random.default_rng(2).permutation(h * w)
  permute = lambda a: a.reshape(b, h * w, c)[:, perm].reshape(b, h, w, c)
  np.testing.assert_allclose(apply(params, permute(x)), permute(apply(params, x)), rtol=1e-5, atol=1e-5)


def test_attention_needs_exactly_one_of_heads_and_head_dim():
  x = jnp.zeros((1, 2, 2, 8))
  with pytest.raises(ValueError, match='exactly one'):
    jax.eval_shape(AttentionBlock(norm_num_groups=4, norm_eps=1e-5).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='8 channels are not divisible into 3 heads'):
    jax.eval_shape(AttentionBlock(norm_num_groups=4, norm_eps=1e-5, num_heads=3).init, jax.random.key(0), x)


def test_resnet_block_structure_and_residual():
  x = _normal(0, (2, 4, 4, 8))
  temb = _normal(1, (2, 16))
  same = ResnetBlock(out_channels=8, norm_num_groups=4, norm_eps=1e-5)
  params = _init(same, x, temb)['params']
  assert set(params) == {'norm1', 'conv1', 'time_emb_proj', 'norm2', 'conv2'}
  assert 'time_emb_proj' not in jax.eval_shape(same.init, _key(0), x)['params']
  wider = ResnetBlock(out_channels=16, norm_num_groups=4, norm_eps=1e-5)
  assert 'conv_shortcut' in jax.eval_shape(wider.init, _key(0), x)['params']

  apply = jax.jit(lambda p, temb: same.apply({'params': p}, x, temb))
  out = apply(params, temb)
  assert out.shape == x.shape
  assert not np.allclose(out, apply(params, 2.0 * temb))  # uses temb
  # With the last conv zeroed the residual branch vanishes: the block is the identity.
  zeroed = jax.tree_util.tree_map(jnp.zeros_like, params['conv2'])
  np.testing.assert_array_equal(apply({**params, 'conv2': zeroed}, temb), x)


def test_group_norm_divisibility_error():
  x = jnp.zeros((1, 4, 4, 6))
  with pytest.raises(ValueError, match=r"'norm1': 6 channels are not divisible by norm_num_groups=4"):
    jax.eval_shape(ResnetBlock(out_channels=8, norm_num_groups=4, norm_eps=1e-5).init, _key(0), x)
  model = get_model('unet', out_channels=4, base_channels=12, norm_num_groups=8)
  with pytest.raises(ValueError, match='12 channels are not divisible by norm_num_groups=8'):
    jax.eval_shape(model.init, _key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)))


@pytest.mark.parametrize('asymmetric, offset', [(False, 0), (True, 1)])
def test_downsample_padding_picks_pixels(asymmetric, offset):
  # With a centre-tap identity kernel, output (i, j) reads input (2i + o, 2j + o):
  # symmetric padding samples even pixels, the VAE's bottom/right padding odd ones.
  x = _normal(0, (2, 6, 6, 3))
  layer = Downsample(out_channels=3, asymmetric_padding=asymmetric)
  params = {'conv': {'kernel': _identity_kernel(3), 'bias': jnp.zeros(3)}}
  out = layer.apply({'params': params}, x)
  np.testing.assert_allclose(out, x[:, offset::2, offset::2], atol=1e-6)


def test_upsample_is_nearest_then_conv():
  x = _normal(0, (2, 3, 3, 4))
  params = {'conv': {'kernel': _identity_kernel(4), 'bias': jnp.zeros(4)}}
  out = Upsample(out_channels=4).apply({'params': params}, x)
  # Every input pixel becomes a 2x2 block.
  np.testing.assert_allclose(out, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2), atol=1e-6)


# ----------------------------------------------------------------------- autoencoder


@pytest.fixture(scope='module')
def ae():
  """Tiny autoencoder, its params, a batch and jitted entry points (compiled once)."""
  model = AutoencoderKL(**AE_KWARGS)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, (2, 16, 16, 3)), jnp.float32)
  params = _init(model, x)['params']
  apply = lambda method: jax.jit(functools.partial(model.apply, method=method))
  return dict(
      model=model,
      params=params,
      x=x,
      call=jax.jit(lambda p, x, rng=None: model.apply({'params': p}, x, rng)),
      encode=apply(model.encode),
      decode=apply(model.decode),
  )


def test_autoencoder_shapes(ae):
  mean, logvar = ae['encode']({'params': ae['params']}, ae['x'])
  assert ae['model'].downsample_factor == 2
  assert mean.shape == logvar.shape == (2, 8, 8, 4)
  recon = ae['decode']({'params': ae['params']}, mean)
  assert recon.shape == ae['x'].shape


@pytest.mark.parametrize('block_out_channels, size', [((8,), 16), ((8, 16, 16), 4), ((8, 8, 16, 16), 2)])
def test_autoencoder_downsampling_factor(block_out_channels, size):
  model = AutoencoderKL(**{**AE_KWARGS, 'block_out_channels': block_out_channels})
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  recon, mean, _ = jax.eval_shape(model.apply, variables, x)
  assert mean.shape == (1, size, size, 4)
  assert recon.shape == (1, 16, 16, 3)
  assert model.downsample_factor == 16 // size


def test_autoencoder_rejects_indivisible_size(ae):
  with pytest.raises(ValueError, match=r'divisible by the downsampling factor 2.*\(1, 15, 16, 3\)'):
    ae['model'].apply({'params': ae['params']}, jnp.zeros((1, 15, 16, 3)))


def test_call_without_rng_decodes_the_mean(ae):
  params = ae['params']
  recon, mean, logvar = ae['call'](params, ae['x'])
  mean2, logvar2 = ae['encode']({'params': params}, ae['x'])
  np.testing.assert_allclose(mean, mean2, atol=1e-6)
  np.testing.assert_allclose(logvar, logvar2, atol=1e-6)
  np.testing.assert_allclose(recon, ae['decode']({'params': params}, mean), atol=1e-5)


def test_call_with_rng_samples_the_posterior(ae):
  params = ae['params']
  rng = jax.random.key(7)
  recon_a, mean, logvar = ae['call'](params, ae['x'], rng)
  recon_b, _, _ = ae['call'](params, ae['x'], jax.random.key(8))
  recon_mean, _, _ = ae['call'](params, ae['x'])
  assert not np.allclose(recon_a, recon_b)
  assert not np.allclose(recon_a, recon_mean)
  np.testing.assert_array_equal(recon_a, ae['call'](params, ae['x'], rng)[0])
  z = sample_latents(mean, logvar, rng)
  np.testing.assert_allclose(recon_a, ae['decode']({'params': params}, z), atol=1e-5)


def test_sample_latents_moments(ae):
  mean, logvar = ae['encode']({'params': ae['params']}, ae['x'])
  # Spread logvar over a wide range so that a wrong scale (e.g. exp(logvar)) shows.
  logvar = logvar + jnp.linspace(-4.0, 2.0, logvar.size).reshape(logvar.shape)
  n = 4096
  keys = jax.random.split(jax.random.key(3), n)
  z = jax.vmap(sample_latents, in_axes=(None, None, 0))(mean, logvar, keys)  # [N, B, h, w, c]
  std = jnp.exp(0.5 * logvar)
  # Standard errors: 1 / sqrt(2N) ~ 1.1% for the std ratio, 1 / sqrt(N) for the mean.
  np.testing.assert_allclose(z.std(0) / std, 1.0, atol=0.06)
  np.testing.assert_allclose((z.mean(0) - mean) / std, 0.0, atol=6 / np.sqrt(n))


def test_logvar_is_clipped(ae):
  params = ae['params']
  bias = params['quant_conv']['bias']  # [2 * latent]: mean channels, then logvar channels
  for shift, bound in ((1e4, LOGVAR_MAX), (-1e4, LOGVAR_MIN)):
    shifted = bias.at[4:].add(shift)
    p = {**params, 'quant_conv': {**params['quant_conv'], 'bias': shifted}}
    mean, logvar = ae['encode']({'params': p}, ae['x'])
    np.testing.assert_array_equal(logvar, bound)
    assert np.all(np.isfinite(mean))


def test_autoencoder_param_names(ae):
  paths = _paths(ae['params'])
  expected = {
      'encoder/conv_in',
      'encoder/down_blocks_0/resnets_0/conv1',
      'encoder/down_blocks_0/resnets_1/norm2',
      'encoder/down_blocks_0/downsamplers_0/conv',
      'encoder/down_blocks_1/resnets_0/conv_shortcut',
      'encoder/mid_block/resnets_0',
      'encoder/mid_block/attentions_0/group_norm',
      'encoder/mid_block/attentions_0/to_q',
      'encoder/mid_block/attentions_0/to_out',
      'encoder/mid_block/resnets_1',
      'encoder/conv_norm_out',
      'encoder/conv_out',
      'quant_conv',
      'post_quant_conv',
      'decoder/conv_in',
      'decoder/mid_block/attentions_0/to_v',
      'decoder/up_blocks_0/resnets_2',
      'decoder/up_blocks_0/upsamplers_0/conv',
      'decoder/up_blocks_1/resnets_0/conv_shortcut',
      'decoder/up_blocks_1/resnets_2/conv2',
      'decoder/conv_norm_out',
      'decoder/conv_out',
  }
  assert expected <= paths, sorted(expected - paths)
  # No downsampler on the last encoder level, no upsampler on the last decoder level,
  # no time projection anywhere in the VAE.
  assert 'encoder/down_blocks_1/downsamplers_0' not in paths
  assert 'decoder/up_blocks_1/upsamplers_0' not in paths
  assert 'decoder/up_blocks_0/resnets_3' not in paths
  assert not any('time_emb_proj' in p for p in paths)
  # The one head of the VAE mid-block attention sees all channels.
  assert ae['params']['encoder']['mid_block']['attentions_0']['to_q']['kernel'].shape == (16, 16)


def test_autoencoder_without_mid_attention():
  model = AutoencoderKL(**AE_KWARGS, mid_block_attention=False)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert not any('attentions' in p for p in _paths(variables['params']))


def test_sd_vae_param_count():
  model = get_model('autoencoder_kl', **SD_VAE_KWARGS)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  assert count_params(variables['params']) == SD_VAE_NUM_PARAMS


# ------------------------------------------------------------------------------ U-Net


@pytest.fixture(scope='module')
def unet():
  """Tiny class-conditional U-Net with dropout, params, inputs and jitted calls."""
  model = UNet(**UNET_KWARGS)
  x = _normal(0, (2, 16, 16, 4))
  t = jnp.array([10.0, 500.0])
  y = jnp.array([0, 2], jnp.int32)
  params = _init(model, x, t, y)['params']
  # The zero-initialised conv_out hides everything upstream; perturb it.
  conv_out = jax.tree_util.tree_map(lambda p: 0.1 * _normal(2, p.shape), params['conv_out'])
  return dict(
      model=model,
      params=params,
      perturbed={**params, 'conv_out': conv_out},
      x=x,
      t=t,
      y=y,
      eval=jax.jit(lambda p, x, t, y=None: model.apply({'params': p}, x, t, y)),
      train=jax.jit(
          lambda p, x, t, y, rng: model.apply({'params': p}, x, t, y, train=True, rngs={'dropout': rng})
      ),
  )


def test_unet_initial_output_is_zero_with_input_shape(unet):
  out = unet['eval'](unet['params'], unet['x'], unet['t'], unet['y'])
  assert out.shape == unet['x'].shape
  np.testing.assert_array_equal(out, 0.0)


def test_unet_depends_on_t_and_y(unet):
  p, x, t, y = unet['perturbed'], unet['x'], unet['t'], unet['y']
  out = unet['eval'](p, x, t, y)
  assert not np.allclose(out, 0.0)
  assert not np.allclose(out, unet['eval'](p, x, t + 0.5, y))  # fractional t matters
  assert not np.allclose(out, unet['eval'](p, x, t, (y + 1) % 3))
  # Each example depends on its own t only.
  t_other = t.at[1].set(3.0)
  out_other = unet['eval'](p, x, t_other, y)
  np.testing.assert_allclose(out_other[0], out[0], atol=1e-5)
  assert not np.allclose(out_other[1], out[1])


def test_unet_missing_labels_use_null_class(unet):
  p, x, t = unet['perturbed'], unet['x'], unet['t']
  null = jnp.full((2,), unet['model'].null_class, jnp.int32)
  np.testing.assert_allclose(unet['eval'](p, x, t), unet['eval'](p, x, t, null), atol=1e-6)
  assert unet['params']['class_embedding']['embedding'].shape == (UNET_KWARGS['num_classes'] + 1, 32)


def test_unet_dropout_only_in_train_mode(unet):
  p, x, t, y = unet['perturbed'], unet['x'], unet['t'], unet['y']
  out_eval = unet['eval'](p, x, t, y)
  out_a = unet['train'](p, x, t, y, jax.random.key(0))
  out_b = unet['train'](p, x, t, y, jax.random.key(1))
  np.testing.assert_array_equal(out_a, unet['train'](p, x, t, y, jax.random.key(0)))
  assert not np.allclose(out_a, out_b)
  assert not np.allclose(out_a, out_eval)
  # Eval mode needs no dropout rng and is deterministic.
  np.testing.assert_array_equal(out_eval, unet['eval'](p, x, t, y))


def test_unet_param_names_and_attention_placement(unet):
  paths = _paths(unet['params'])
  for p in (
      'conv_in',
      'time_embedding/linear_1',
      'time_embedding/linear_2',
      'class_embedding',
      'down_blocks_0/resnets_0/time_emb_proj',
      'down_blocks_0/downsamplers_0/conv',
      'down_blocks_1/attentions_0/to_q',
      'mid_block/attentions_0/to_out',
      'up_blocks_0/resnets_1/conv_shortcut',  # skip-concatenated input is wider
      'up_blocks_0/attentions_1/to_k',
      'up_blocks_0/upsamplers_0/conv',
      'up_blocks_1/resnets_1',
      'conv_norm_out',
      'conv_out',
  ):
    assert p in paths, p
  # Attention only where the feature map is 8x8 (level 1 for a 16x16 input).
  assert not any(p.startswith(('down_blocks_0/attentions', 'up_blocks_1/attentions')) for p in paths)
  assert 'down_blocks_1/downsamplers_0' not in paths
  assert 'up_blocks_1/upsamplers_0' not in paths
  # The default time embedding is 4 * base_channels wide.
  assert unet['params']['time_embedding']['linear_2']['kernel'].shape == (32, 32)


def test_unet_attention_resolution_follows_input_size():
  # A 32x32 input has 32x32 and 16x16 feature maps: no 8x8 attention, only the middle one.
  model = UNet(**UNET_KWARGS)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)))
  attention = {p for p in _paths(variables['params']) if p.split('/')[-1].startswith('attentions_')}
  assert attention == {'mid_block/attentions_0'}


def test_unet_unconditional_has_no_class_embedding():
  model = UNet(**{**UNET_KWARGS, 'num_classes': 0, 'mid_attention': False, 'time_embed_dim': 24})
  x = jnp.zeros((1, 16, 16, 4))
  variables = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)))
  paths = _paths(variables['params'])
  assert 'class_embedding' not in paths and 'mid_block/attentions_0' not in paths
  assert variables['params']['time_embedding']['linear_1']['kernel'].shape == (8, 24)
  # Labels are ignored, so callers need not branch on conditioning.
  with_labels = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  assert _paths(with_labels['params']) == paths


@pytest.mark.parametrize('head_dim, expected_heads', [(0, 2), (4, 4), (16, 1)])
def test_unet_head_dim_sets_heads(head_dim, expected_heads):
  # Attention runs at 16 channels here (level 1 and the middle).
  model = UNet(**{**UNET_KWARGS, 'head_dim': head_dim})
  heads = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, AttentionBlock) and context.method_name == '__call__':
      heads['/'.join(context.module.path)] = context.module.num_heads
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)))
  assert heads == {
      p: expected_heads
      for p in ('down_blocks_1/attentions_0', 'mid_block/attentions_0', 'up_blocks_0/attentions_0',
                'up_blocks_0/attentions_1')
  }


def test_unet_head_dim_must_divide_channels():
  bad = UNet(**{**UNET_KWARGS, 'head_dim': 3})
  with pytest.raises(ValueError, match='16 channels are not divisible by head_dim=3'):
    jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)))


def test_unet_rejects_indivisible_input():
  model = UNet(**{**UNET_KWARGS, 'channel_mult': (1, 2, 2)})
  with pytest.raises(ValueError, match=r'10x16 is not divisible by 4'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 10, 16, 4)), jnp.zeros((1,)))


# --------------------------------------------------------------------------- registry


def test_registry_builds_models():
  assert set(MODELS) == {'autoencoder_kl', 'dit', 'identity', 'unet', 'vq'}
  assert set(AUTOENCODERS) == {'autoencoder_kl', 'identity', 'vq'}  # Stage-1 models only.
  assert isinstance(get_model('unet', **UNET_KWARGS), UNet)
  assert get_model('autoencoder_kl', **AE_KWARGS) == AutoencoderKL(**AE_KWARGS)


def test_registry_unknown_name():
  with pytest.raises(ValueError, match=r"unknown model 'vqgan'; accepted: \['autoencoder_kl', 'dit', 'identity', 'unet', 'vq'\]"):
    get_model('vqgan')


def test_registry_bad_and_missing_fields():
  with pytest.raises(ValueError, match=r"unexpected field\(s\) 'num_head' for model 'unet'.*num_heads"):
    get_model('unet', out_channels=4, num_head=8)
  with pytest.raises(ValueError, match=r"cannot build model 'autoencoder_kl'.*latent_channels"):
    get_model('autoencoder_kl', out_channels=3, block_out_channels=(8,), layers_per_block=1)


def test_count_params():
  params = {'a': {'kernel': jnp.zeros((3, 3, 2, 4)), 'bias': jnp.zeros(4)}, 'b': jnp.zeros(())}
  assert count_params(params) == 3 * 3 * 2 * 4 + 4 + 1
  dense = jax.eval_shape(nn.Dense(5).init, jax.random.key(0), jnp.zeros((1, 7)))
  assert count_params(dense) == 7 * 5 + 5


@pytest.mark.parametrize('side, kernel, stride', [(2, 3, 1), (4, 4, 2), (8, 4, 2)])
def test_small_map_conv_equals_the_convolution(side, kernel, stride):
  """Both paths of `SmallMapConv` (matmul up to 4x4 maps, XLA's convolution above) give
  `nn.Conv`'s output from the same parameters."""
  from ldm_jax.models.layers import SmallMapConv

  x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, 5))
  padding = ((1, 1), (1, 1))
  conv = nn.Conv(7, (kernel, kernel), strides=stride, padding=padding)
  params = conv.init(jax.random.PRNGKey(1), x)
  small = SmallMapConv(7, (kernel, kernel), strides=(stride, stride), padding=padding)
  assert jax.tree.map(jnp.shape, small.init(jax.random.PRNGKey(1), x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(small.apply(params, x), conv.apply(params, x), atol=1e-5)
