"""Learning-rate schedules and the optimizer built from a stage's `optim` config."""
import jax
import jax.numpy as jnp
import numpy as np
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
