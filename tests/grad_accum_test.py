"""Gradient accumulation and the posterior draw inside the diffusion train step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax import builders, grad_accum, sharding, train
from ldm_jax import stages


def test_microbatches_keep_each_device_examples():
  x = jnp.arange(32)
  micro = grad_accum.split_microbatches({'x': x, 'none': None}, 4)
  assert micro['none'] is None
  np.testing.assert_array_equal(micro['x'][1], np.arange(1, 32, 4))
  # Every example lands in exactly one microbatch.
  np.testing.assert_array_equal(np.sort(np.ravel(micro['x'])), np.arange(32))
  # A device holding examples 0..3 (of 8 devices) keeps all its examples' rows.
  np.testing.assert_array_equal(micro['x'][:, 0], np.arange(4))


def test_mean_value_and_grad_is_the_batch_mean():
  w = jnp.array([1.0, -2.0])
  inputs = jax.random.normal(jax.random.PRNGKey(0), (12, 2))
  loss_fn = lambda w, x, rng: jnp.mean(jnp.square(x @ w - 1.0))
  full = jax.value_and_grad(loss_fn)(w, inputs, None)
  for n in (1, 3, 12):
    got = grad_accum.mean_value_and_grad(loss_fn, w, inputs, jax.random.PRNGKey(1), n)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, full)


@pytest.fixture(scope='module')
def tiny():
  from configs import tiny

  config = tiny.get_config()
  config.diffusion.prediction_type = 'x0'  # Closed form below: the loss at init is E[z0^2].
  unet = builders.build_denoiser(config, 10)
  mesh = sharding.make_mesh()  # 8 devices: microbatches of 8 stay sharded.
  # Plain SGD: the update is the gradient itself, so equal parameters mean equal
  # gradients (Adam would turn rounding noise in the exactly-zero gradients, such as
  # those of attention key biases, into steps of the learning rate's size).
  tx, lr = optax.sgd(0.1), lambda step: 0.1
  state = jax.jit(functools.partial(stages.init_diffusion_state, config, unet, tx, 1.0),
                  out_shardings=sharding.replicated(mesh))()

  def make_step(grad_accum_steps):
    step_config = config.copy_and_resolve_references()
    step_config.diffusion.grad_accum_steps = grad_accum_steps
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    return jax.jit(functools.partial(train.diffusion_train_step, denoiser=unet,
                                     config=step_config, lr_schedule=lr),
                   in_shardings=(replicated, data, replicated),
                   out_shardings=(replicated, replicated))

  return config, mesh, state, make_step, builders.make_schedule(config)


def _posterior(config, mesh, batch_size, logvar, seed=0):
  shape = (batch_size, *builders.latent_shape(config))
  mean = jax.random.normal(jax.random.PRNGKey(seed), shape)
  return sharding.global_batch({
      'latent_mean': np.asarray(mean), 'latent_logvar': np.full(shape, logvar, np.float32),
      'label': np.arange(batch_size, dtype=np.int32) % 10}, mesh)


def test_four_microbatches_of_8_equal_one_batch_of_32(tiny):
  config, mesh, state, make_step, schedule = tiny
  batch = _posterior(config, mesh, 32, logvar=-2.0)
  # Two updates: the second starts from non-zero output weights, so gradients
  # reach every layer.
  results = []
  for grad_accum_steps in (1, 4):
    step, s = make_step(grad_accum_steps), state
    for _ in range(2):
      s, metrics = step(s, batch, schedule)
    results.append((metrics, jax.device_get(s.params)))
  (metrics_1, params_1), (metrics_4, params_4) = results
  np.testing.assert_allclose(metrics_4['loss'], metrics_1['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics_4['grad_norm'], metrics_1['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params_4, params_1)
  first_layer = np.abs(params_1['conv_in']['kernel'] - state.params['conv_in']['kernel'])
  assert first_layer.max() > 1e-4


@pytest.mark.parametrize('logvar, expected', [(0.0, 1.0), (np.log(4.0), 4.0)])
def test_step_draws_from_the_posterior_not_its_mean(tiny, logvar, expected):
  """x0-prediction at init outputs 0, so the loss is E[z0^2] = mean^2 + exp(logvar)."""
  config, mesh, state, make_step, schedule = tiny
  batch = _posterior(config, mesh, 32, logvar)
  batch['latent_mean'] = jnp.zeros_like(batch['latent_mean'])
  _, metrics = make_step(1)(state, batch, schedule)
  # 32 * 16 * 16 * 2 squared normals: the mean is within 2% of its expectation.
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=0.05)


def test_a_point_posterior_trains_on_its_mean(tiny):
  config, mesh, state, make_step, schedule = tiny
  batch = _posterior(config, mesh, 32, logvar=-30.0)  # std 3e-7: z0 == mean.
  _, metrics = make_step(1)(state, batch, schedule)
  expected = float(jnp.mean(jnp.square(batch['latent_mean'])))
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-4)
