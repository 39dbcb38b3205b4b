"""The DiT backbone: adaLN-Zero init, patches, conditioning, remat, bfloat16, sharding."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import models, sharding
from ldm_jax.models import dit as dit_lib

# A tiny class- and context-conditional DiT: 4x4 = 16 tokens of width 32. The batch
# of 8 also splits over the 8 devices of the sharding test, so one program serves all.
_DIT = dict(out_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=3,
            context_dim=8)
_BATCH, _SIZE, _CONTEXT_LEN = 8, 8, 5


def _normal(seed, shape):
  # NumPy, not jax.random: eager JAX ops would compile one small program per shape.
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope='module')
def dit():
  """Model, initial and perturbed params, inputs, and one jitted forward per dtype."""
  model = models.get_model('dit', **_DIT)
  x = _normal(0, (_BATCH, _SIZE, _SIZE, 4))
  t = np.linspace(10.0, 900.5, _BATCH, dtype=np.float32)
  y = np.arange(_BATCH, dtype=np.int32) % 3
  context = _normal(1, (_BATCH, _CONTEXT_LEN, _DIT['context_dim']))
  # Padding at the end, in the middle, or none.
  mask = np.array([[True, True, True, False, False], [True, False, True, True, True],
                    [True] * 5, [True, False, False, False, False]] * 2)
  params = jax.jit(model.init)(jax.random.PRNGKey(2), x, t, y, context=context,
                               context_mask=mask)['params']
  # Zero-initialised gates, modulations and output layers hide everything upstream:
  # perturb every parameter so that each input matters.
  leaves, treedef = jax.tree.flatten(params)
  perturbed = treedef.unflatten([np.asarray(p) + 0.1 * _normal(10 + i, p.shape)
                                 for i, p in enumerate(leaves)])

  def forward(dtype):
    module = models.get_model('dit', **_DIT, dtype=dtype)
    return jax.jit(lambda p, x, t, y, c, m: module.apply({'params': p}, x, t, y, context=c,
                                                        context_mask=m))

  return dict(model=model, params=params, perturbed=perturbed, x=x, t=t, y=y, context=context,
              mask=mask, f32=forward(jnp.float32), bf16=forward(jnp.bfloat16))


def _inputs(dit, **changes):
  return tuple(changes.get(k, dit[k]) for k in ('x', 't', 'y', 'context', 'mask'))


def test_initial_output_is_exactly_zero_and_float32_in_bfloat16(dit):
  for dtype in ('f32', 'bf16'):
    out = dit[dtype](dit['params'], *_inputs(dit))
    assert out.shape == (_BATCH, _SIZE, _SIZE, _DIT['out_channels']) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)
  assert {leaf.dtype for leaf in jax.tree.leaves(dit['params'])} == {jnp.dtype('float32')}
  # The protocol every stage-2 denoiser shares with the U-Net.
  assert {'out_channels', 'num_classes', 'context_dim', 'remat', 'dtype'} <= set(
      models.model_fields('dit'))
  assert dit['model'].null_class == _DIT['num_classes']
  assert dit['params']['class_embedding']['embedding'].shape == (_DIT['num_classes'] + 1, 32)


def test_patchify_layout_and_round_trip():
  rng = np.random.default_rng(0)  # NumPy arrays: pure index shuffling, nothing to compile.
  x = rng.normal(size=(2, 6, 4, 3))
  tokens = dit_lib.patchify(x, 2)  # 3 x 2 patches of 2 x 2 x 3.
  assert tokens.shape == (2, 6, 12)
  # Token i * (W/p) + j is patch (i, j), flattened in (row, column, channel) order.
  np.testing.assert_array_equal(tokens[:, 1 * 2 + 1], x[:, 2:4, 2:4, :].reshape(2, 12))
  np.testing.assert_array_equal(dit_lib.unpatchify(tokens, 2, 6, 4), x)
  other = rng.normal(size=(2, 6, 12))
  np.testing.assert_array_equal(dit_lib.patchify(dit_lib.unpatchify(other, 2, 6, 4), 2), other)


def test_position_embedding_closed_form():
  emb = dit_lib.sincos_position_embedding(3, 5, 16)  # Rows of 5 tokens.
  assert emb.shape == (15, 16)
  omega = 1.0 / 10000 ** (np.arange(4) / 4)
  row, col = 2, 3
  expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                             np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(emb[row * 5 + col], expected, rtol=1e-6, atol=1e-7)
  assert len(np.unique(emb.round(5), axis=0)) == 15  # Every position is told apart.


def test_time_and_labels_change_the_output_and_none_is_the_null_class(dit):
  p, forward = dit['perturbed'], dit['f32']
  out = forward(p, *_inputs(dit))
  assert np.abs(out).max() > 1e-2
  t = dit['t'].copy()
  t[1] = 3.25
  other_t = forward(p, *_inputs(dit, t=t))
  # Each example sees its own t only.
  np.testing.assert_allclose(np.delete(other_t, 1, 0), np.delete(out, 1, 0), atol=1e-5)
  assert not np.allclose(other_t[1], out[1], atol=1e-3)
  assert not np.allclose(forward(p, *_inputs(dit, y=(dit['y'] + 1) % 3)), out, atol=1e-3)
  null = np.full((_BATCH,), dit['model'].null_class, np.int32)
  np.testing.assert_allclose(forward(p, *_inputs(dit, y=None)),
                             forward(p, *_inputs(dit, y=null)), atol=1e-6)
  assert not np.allclose(forward(p, *_inputs(dit, y=None)), out, atol=1e-3)


def test_context_matters_except_at_masked_positions(dit):
  p, forward, context, mask = dit['perturbed'], dit['f32'], dit['context'], dit['mask']
  out = forward(p, *_inputs(dit))
  noise = 10.0 * _normal(3, context.shape)
  at_padding = np.where(mask[..., None], context, context + noise)
  np.testing.assert_allclose(forward(p, *_inputs(dit, context=at_padding)), out, atol=1e-5)
  at_real = np.where(mask[..., None], context + noise, context)
  changed = forward(p, *_inputs(dit, context=at_real))
  for b in range(_BATCH):
    assert not np.allclose(changed[b], out[b], atol=1e-3)


def test_bad_shapes_name_the_field(dit):
  model, x, t, context = dit['model'], dit['x'], dit['t'], dit['context']
  init = lambda *args, **kw: jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kw)
  with pytest.raises(ValueError, match='not divisible by patch_size=2'):
    init(x[:, :7], t, context=context)
  with pytest.raises(ValueError, match='context_dim=8 needs a context'):
    init(x, t)
  with pytest.raises(ValueError, match='context_dim=8 needs a context'):
    init(x, t, context=context[..., :4])
  heads = models.get_model('dit', **{**_DIT, 'num_heads': 3})
  with pytest.raises(ValueError, match='num_heads=3 is not valid; accepted: a divisor of hidden_size=32'):
    jax.eval_shape(heads.init, jax.random.PRNGKey(0), x, t, context=context)


def test_remat_gives_the_same_output_and_gradients(dit):
  target = _normal(4, dit['x'].shape)

  def grad_fn(policy):
    module = models.get_model('dit', **_DIT, remat=policy)

    def loss(p):
      out = module.apply({'params': p}, dit['x'], dit['t'], dit['y'], context=dit['context'],
                         context_mask=dit['mask'])
      return jnp.mean(jnp.square(out - target))
    return jax.value_and_grad(loss)

  plain, rematted = grad_fn(''), grad_fn('full')
  # The checkpoint primitive prints as `remat2` (older JAX: `checkpoint`).
  has_remat = lambda fn: bool(re.search(r'\bremat|\bcheckpoint\[',
                                        str(jax.make_jaxpr(fn)(dit['perturbed']))))
  assert has_remat(rematted) and not has_remat(plain)
  (loss_a, grads_a), (loss_b, grads_b) = (jax.jit(plain)(dit['perturbed']),
                                          jax.jit(rematted)(dit['perturbed']))
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_b, grads_a)


def test_bfloat16_is_close_to_float32(dit):
  out32 = dit['f32'](dit['perturbed'], *_inputs(dit))
  out16 = dit['bf16'](dit['perturbed'], *_inputs(dit))
  assert out16.dtype == jnp.float32
  error = np.abs(np.asarray(out16 - out32)).max()
  scale = np.abs(np.asarray(out32)).max()
  # bfloat16 has an 8-bit mantissa: visibly different, yet within a few percent.
  assert 1e-4 * scale < error < 5e-2 * scale, (error, scale)


def test_forward_with_fsdp_sharded_params_equals_unsharded(dit):
  mesh = sharding.make_mesh(jax.devices()[:8], (2, 4))
  params = dit['perturbed']
  param_sharding = sharding.state_sharding(params, mesh)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(param_sharding))
  # The batch split over all devices, parameters split over `fsdp`.
  x, t, y, context, mask = _inputs(dit)
  data, replicated = sharding.data_sharding(mesh), sharding.replicated(mesh)
  model = dit['model']
  forward = jax.jit(lambda p, x, t, y, c, m: model.apply({'params': p}, x, t, y, context=c,
                                                         context_mask=m),
                    in_shardings=(param_sharding, data, data, data, data, data),
                    out_shardings=replicated)
  sharded = forward(jax.device_put(params, param_sharding), x, t, y, context, mask)
  np.testing.assert_allclose(sharded, dit['f32'](params, x, t, y, context, mask),
                             rtol=1e-5, atol=1e-5)


def _stage_two_config(conditioning_name):
  """configs/digits_dit.py shrunk, with class labels or text captions as the condition."""
  from configs import digits_dit
  config = digits_dit.get_config()
  config.diffusion.model.update(hidden_size=16, depth=1, num_heads=2)
  config.diffusion.conditioning.name = conditioning_name
  if conditioning_name == 'text':
    config.data.name = 'digits_captions'
    config.diffusion.model.context_dim = 16
    config.diffusion.conditioning.text.update(vocab_size=20, max_length=6, num_layers=1,
                                              num_heads=2)
  return config


@pytest.mark.parametrize('name', ['class', 'text'])
def test_class_and_text_conditioning_reach_the_dit_through_the_builders(name):
  from ldm_jax import builders
  from ldm_jax.models.conditioners import ConditionedDenoiser
  from ldm_jax.validation import validate_config

  config = _stage_two_config(name)
  validate_config(config)
  denoiser = builders.build_denoiser(config, 10 if name == 'class' else 0)
  backbone = denoiser.denoiser if name == 'text' else denoiser
  assert isinstance(backbone, dit_lib.DiT)
  assert isinstance(denoiser, ConditionedDenoiser) == (name == 'text')
  batch, latent_shape = 4, builders.latent_shape(config)
  x = _normal(5, (batch, *latent_shape))
  t = np.full((batch,), 500.0, np.float32)
  y = np.array([1, 2, 3, 4], np.int32)
  tokens = np.random.default_rng(6).integers(3, 20, (batch, 6)).astype(np.int32)
  kwargs = (lambda c: dict(cond={'tokens': c})) if name == 'text' else (lambda c: {})
  params = jax.jit(lambda x, t, y, c: denoiser.init(jax.random.PRNGKey(0), x, t, y, **kwargs(c)))(
      x, t, y, tokens)['params']
  if name == 'text':
    assert set(params) == {'denoiser', 'conditioner'}
    assert 'cross_attn' in params['denoiser']['blocks_0']
  else:
    assert params['class_embedding']['embedding'].shape == (11, 16)
  leaves, treedef = jax.tree.flatten(params)
  params = treedef.unflatten([np.asarray(p) + 0.1 * _normal(20 + i, p.shape)
                              for i, p in enumerate(leaves)])
  forward = jax.jit(lambda p, y, c: denoiser.apply({'params': p}, x, t, y, **kwargs(c)))
  out = forward(params, y, tokens)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # The condition of each example changes that example's prediction.
  if name == 'class':
    other = forward(params, (y + 1) % 10, tokens)
  else:  # Every token another word (ids 3..19; 0..2 are the special tokens).
    other = forward(params, y, (tokens - 3 + 1) % 17 + 3)
  for b in range(batch):
    assert not np.allclose(other[b], out[b], atol=1e-3)
