"""bfloat16 compute with float32 parameters, and rematerialised U-Net blocks."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import builders, diffusion, losses, models, sharding, train
from ldm_jax import optim, stages

_UNET = dict(out_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,), num_heads=2, norm_num_groups=4, num_classes=0)
_SHAPE = (4, 16, 16, 2)


def _inputs():
  rng_x, rng_t = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(rng_x, _SHAPE)
  t = jax.random.uniform(rng_t, (_SHAPE[0],), minval=0, maxval=999)
  return x, t


@pytest.fixture(scope='module')
def params():
  x, t = _inputs()
  params = jax.jit(models.get_model('unet', **_UNET).init)(jax.random.PRNGKey(1), x, t)['params']
  # conv_out starts at zero; random output weights make every layer matter.
  kernel = params['conv_out']['kernel']
  return {**params, 'conv_out': {**params['conv_out'],
                                 'kernel': 0.1 * jax.random.normal(jax.random.PRNGKey(2),
                                                                   kernel.shape)}}


def test_bfloat16_output_is_float32_and_close_to_float32(params):
  x, t = _inputs()
  outputs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    unet = models.get_model('unet', **_UNET, dtype=dtype)
    outputs[dtype] = jax.jit(unet.apply)({'params': params}, x, t)
  assert outputs[jnp.bfloat16].dtype == jnp.float32
  error = np.abs(np.asarray(outputs[jnp.bfloat16] - outputs[jnp.float32])).max()
  scale = np.abs(np.asarray(outputs[jnp.float32])).max()
  # bfloat16 has an 8-bit mantissa: visibly different, yet within a few percent.
  assert 1e-4 * scale < error < 5e-2 * scale, (error, scale)


def test_bfloat16_keeps_float32_params_and_its_loss_falls(digits_data_dir):
  from configs import tiny

  config = tiny.get_config()
  config.diffusion.compute_dtype = 'bfloat16'
  config.diffusion.class_conditional = False
  unet = builders.build_denoiser(config, 0)
  mesh = sharding.make_mesh(jax.devices()[:1])
  tx, lr = optim.make_optimizer(config.diffusion.optim, 100)
  state = jax.jit(functools.partial(stages.init_diffusion_state, config, unet, tx, 1.0))()
  step = jax.jit(functools.partial(train.diffusion_train_step, denoiser=unet,
                                   config=config, lr_schedule=lr))
  schedule = builders.make_schedule(config)
  shape = (8, *builders.latent_shape(config))
  z0 = jax.random.normal(jax.random.PRNGKey(0), shape)
  batch = sharding.global_batch({'latent_mean': z0, 'latent_logvar': jnp.full(shape, -30.0),
                                 'label': jnp.zeros((8,), jnp.int32)}, mesh)
  # Fixed timesteps and noise: the evaluation is noise-free.
  t = jnp.linspace(0, config.diffusion.num_timesteps - 1, 8).astype(jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(1), shape)
  x_t = diffusion.q_sample(schedule, z0, t, noise)

  @jax.jit
  def eval_loss(params):
    return losses.diffusion_loss(unet.apply({'params': params}, x_t, t.astype(jnp.float32)),
                                 noise)[0]

  initial = float(eval_loss(state.params))
  np.testing.assert_allclose(initial, float(jnp.mean(noise**2)), rtol=1e-6)  # Zero output.
  for _ in range(40):
    state, metrics = step(state, batch, schedule)
  assert np.isfinite(float(metrics['loss']))
  for tree in (state.params, state.opt_state, state.ema_params):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree) if leaf.ndim} == {jnp.dtype('float32')}
  assert float(eval_loss(state.params)) < 0.75 * initial


@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_gives_the_same_loss_and_gradients(params, policy):
  x, t = _inputs()
  target = jax.random.normal(jax.random.PRNGKey(3), _SHAPE)

  def grad_fn(remat):
    unet = models.get_model('unet', **_UNET, dropout=0.2, remat=remat)

    def loss(p):
      out = unet.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.PRNGKey(4)})
      return jnp.mean(jnp.square(out - target))
    return jax.value_and_grad(loss)

  plain, rematted = grad_fn(''), grad_fn(policy)
  # The checkpoint primitive prints as `remat2` (older JAX: `checkpoint`).
  has_remat = lambda fn: bool(re.search(r'\bremat|\bcheckpoint\[', str(jax.make_jaxpr(fn)(params))))
  assert has_remat(rematted) and not has_remat(plain)
  (loss_a, grads_a), (loss_b, grads_b) = jax.jit(plain)(params), jax.jit(rematted)(params)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_b, grads_a)


def test_unknown_remat_policy_names_the_accepted_ones():
  x, t = _inputs()
  with pytest.raises(ValueError, match="'full', 'dots_saveable'"):
    jax.eval_shape(models.get_model('unet', **_UNET, remat='some').init,
                   jax.random.PRNGKey(0), x, t)
