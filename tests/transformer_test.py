"""Tests for ldm_jax.models.transformer and the U-Net's cross-attention wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import UNet
from ldm_jax.models.transformer import Attention, SpatialTransformer

CONTEXT_DIM = 6
# Tiny test-only sizes: attention at 8x8 (down level 0, up level 1) and in the middle.
UNET_KWARGS = dict(out_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8,), num_heads=2, norm_num_groups=4,
                   context_dim=CONTEXT_DIM, transformer_depth=1)


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl='unsafe_rbg')


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomized(params, seed: int, scale: float = 0.3):
  """Every parameter redrawn: zero-initialised output layers would hide the context."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32) for leaf in leaves])


def _paths(params) -> set[str]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {'/'.join(k.key for k in path) for path, _ in flat}


@pytest.fixture(scope='module')
def unet():
  """(model, randomized params, jitted apply) of a tiny cross-attention U-Net."""
  model = UNet(**UNET_KWARGS)
  x, context = jnp.zeros((2, 8, 8, 2)), jnp.zeros((2, 5, CONTEXT_DIM))
  params = jax.jit(model.init)(_key(0), x, jnp.zeros((2,)), context=context)['params']
  apply = jax.jit(lambda p, x, t, c, m: model.apply({'params': p}, x, t, context=c,
                                                     context_mask=m))
  return model, _randomized(params, 1), apply


def test_attention_matches_explicit_masked_softmax():
  attention = Attention(num_heads=2, head_dim=3)
  x, context = _normal(0, (2, 4, 5)), _normal(1, (2, 3, 7))
  mask = jnp.array([[True, True, False], [True, False, True]])
  params = jax.jit(attention.init)(_key(0), x, context, mask)['params']
  params = _randomized(params, 2)
  out = attention.apply({'params': params}, x, context, mask)

  def heads(h):  # [B, n, 6] -> [B, 2, n, 3]
    return np.asarray(h).reshape(h.shape[0], h.shape[1], 2, 3).transpose(0, 2, 1, 3)

  q = heads(x @ params['to_q']['kernel'])
  k = heads(context @ params['to_k']['kernel'])
  v = heads(context @ params['to_v']['kernel'])
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(3.0)  # [B, N, T, S]
  logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(2, 4, 6)
  expected = mixed @ params['to_out_0']['kernel'] + params['to_out_0']['bias']
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_spatial_transformer_diffusers_names_and_identity_at_init():
  block = SpatialTransformer(num_heads=2, depth=2, norm_num_groups=2)
  x, context = _normal(0, (1, 4, 4, 8)), _normal(1, (1, 3, 6))
  params = jax.jit(block.init)(_key(0), x, context)['params']
  expected = {'norm/scale', 'norm/bias', 'proj_in/kernel', 'proj_in/bias',
              'proj_out/kernel', 'proj_out/bias'}
  for i in range(2):
    prefix = f'transformer_blocks_{i}'
    for norm in ('norm1', 'norm2', 'norm3'):
      expected |= {f'{prefix}/{norm}/scale', f'{prefix}/{norm}/bias'}
    for attn in ('attn1', 'attn2'):
      expected |= {f'{prefix}/{attn}/{p}/kernel' for p in ('to_q', 'to_k', 'to_v', 'to_out_0')}
      expected.add(f'{prefix}/{attn}/to_out_0/bias')
    expected |= {f'{prefix}/ff/net_0/proj/kernel', f'{prefix}/ff/net_0/proj/bias',
                 f'{prefix}/ff/net_2/kernel', f'{prefix}/ff/net_2/bias'}
  assert _paths(params) == expected
  # Shapes as in diffusers: 1x1 conv projections, keys/values from the context width,
  # a GEGLU projection twice the 4x hidden width.
  assert params['proj_in']['kernel'].shape == (1, 1, 8, 8)
  assert params['transformer_blocks_0']['attn2']['to_k']['kernel'].shape == (6, 8)
  assert params['transformer_blocks_0']['attn1']['to_k']['kernel'].shape == (8, 8)
  assert params['transformer_blocks_0']['ff']['net_0']['proj']['kernel'].shape == (8, 64)
  # proj_out starts at zero: the untrained block passes its input through.
  np.testing.assert_array_equal(block.apply({'params': params}, x, context), x)


def test_linear_projection_is_the_1x1_conv_map():
  x, context = _normal(0, (2, 4, 4, 8)), _normal(1, (2, 3, 6))
  conv = SpatialTransformer(num_heads=2, norm_num_groups=2)
  linear = SpatialTransformer(num_heads=2, norm_num_groups=2, use_linear_projection=True)
  conv_params = _randomized(jax.jit(conv.init)(_key(0), x, context)['params'], 3)
  linear_params = dict(conv_params)
  for name in ('proj_in', 'proj_out'):
    linear_params[name] = {'kernel': conv_params[name]['kernel'][0, 0],
                           'bias': conv_params[name]['bias']}
  np.testing.assert_allclose(linear.apply({'params': linear_params}, x, context),
                             conv.apply({'params': conv_params}, x, context),
                             rtol=1e-5, atol=1e-5)


def test_unet_uses_spatial_transformers_where_it_had_self_attention(unet):
  model, params, _ = unet
  paths = _paths(params)
  for prefix in ('down_blocks_0/attentions_0', 'mid_block/attentions_0',
                 'up_blocks_1/attentions_0', 'up_blocks_1/attentions_1'):
    assert f'{prefix}/transformer_blocks_0/attn2/to_k/kernel' in paths
    assert f'{prefix}/proj_in/kernel' in paths
  # No attention where the self-attention U-Net has none (4x4 level).
  assert not any(p.startswith('down_blocks_1/attentions') for p in paths)
  assert not any('group_norm' in p for p in paths)  # No AttentionBlock left.


def test_context_at_padded_positions_is_ignored(unet):
  _, params, apply = unet
  x, t = _normal(0, (2, 8, 8, 2)), jnp.array([10.0, 500.0])
  context = _normal(1, (2, 5, CONTEXT_DIM))
  mask = jnp.array([[True, True, True, False, False], [True, False, False, False, False]])
  out = np.asarray(apply(params, x, t, context, mask))
  assert np.abs(out).max() > 1e-2  # The randomized model's output is not trivially zero.

  padded = context.at[0, 3:].set(_normal(2, (2, CONTEXT_DIM)) * 10).at[1, 1:].set(-7.0)
  np.testing.assert_allclose(apply(params, x, t, padded, mask), out, rtol=1e-5, atol=1e-5)

  real = context.at[0, 2].set(_normal(3, (CONTEXT_DIM,)))
  changed = np.asarray(apply(params, x, t, real, mask))
  assert np.abs(changed[0] - out[0]).max() > 1e-3
  np.testing.assert_allclose(changed[1], out[1], rtol=1e-5, atol=1e-5)  # Per example.


def test_unet_without_mask_uses_every_position(unet):
  _, params, apply = unet
  x, t = _normal(0, (2, 8, 8, 2)), jnp.array([10.0, 500.0])
  context = _normal(1, (2, 5, CONTEXT_DIM))
  full = jnp.ones((2, 5), bool)
  np.testing.assert_allclose(apply(params, x, t, context, None),
                             apply(params, x, t, context, full), rtol=1e-5, atol=1e-5)
  changed = apply(params, x, t, context.at[:, 4].set(3.0), None)
  assert np.abs(np.asarray(changed) - np.asarray(apply(params, x, t, context, None))).max() > 1e-3


def test_unet_needs_a_context_of_its_width(unet):
  model, params, _ = unet
  x, t = jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,))
  with pytest.raises(ValueError, match=r'context_dim=6 needs a context of shape \[B, S, 6\]'):
    model.apply({'params': params}, x, t)
  with pytest.raises(ValueError, match='got \\(1, 3, 4\\)'):
    model.apply({'params': params}, x, t, context=jnp.zeros((1, 3, 4)))
