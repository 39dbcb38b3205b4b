"""Learning-rate schedules and the optimizer built from a stage's `optim` config."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from ldm_jax import optim


@pytest.mark.parametrize('name', optim.LR_SCHEDULES)
def test_warmup_then_schedule(name):
  config = default.get_config().diffusion.optim
  config.update(learning_rate=1e-3, warmup_steps=10, lr_schedule=name, end_lr_factor=0.1)
  schedule = optim.make_lr_schedule(config, num_train_steps=110)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  expected_end = 1e-4 if name == 'cosine' else 1e-3
  np.testing.assert_allclose(schedule(110), expected_end, rtol=1e-5)
  if name == 'cosine':  # Halfway through the decay: the mean of peak and end.
    np.testing.assert_allclose(schedule(60), 0.5 * (1e-3 + 1e-4), rtol=1e-5)


def test_weight_decay_applies_to_kernels_not_biases():
  config = default.get_config().diffusion.optim
  config.update(learning_rate=0.1, warmup_steps=0, lr_schedule='constant',
                weight_decay=0.5, grad_clip_norm=1.0)
  tx, _ = optim.make_optimizer(config, num_train_steps=10)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only decoupled weight decay moves parameters: lr * wd * p.
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['bias'], np.zeros(2))


def test_zero_grad_clip_norm_means_no_clipping():
  config = default.get_config().diffusion.optim
  config.update(learning_rate=0.1, warmup_steps=0, lr_schedule='constant', weight_decay=0.0)
  params = {'kernel': jnp.ones((2, 2))}
  grads = [{'kernel': jnp.full((2, 2), 1000.0)}, {'kernel': jnp.full((2, 2), 1.0)}]

  def second_update(grad_clip_norm):
    config.grad_clip_norm = grad_clip_norm
    tx, _ = optim.make_optimizer(config, num_train_steps=10)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
    return updates['kernel']

  reference = optax.adam(0.1, b1=config.b1, b2=config.b2)
  state = reference.init(params)
  for g in grads:
    expected, state = reference.update(g, state, params)
  np.testing.assert_allclose(second_update(0.0), expected['kernel'], rtol=1e-6)
  # Clipped to norm 1, the first gradient no longer dwarfs the second.
  assert not np.allclose(second_update(1.0), expected['kernel'], rtol=1e-3)
