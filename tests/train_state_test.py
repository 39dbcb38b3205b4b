"""TrainState: optimizer step, EMA with warmup, pytree round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.train_state import DiffusionTrainState, create_train_state, ema_decay_at


def test_ema_decay_warms_up_to_the_configured_value():
  np.testing.assert_allclose(ema_decay_at(jnp.asarray(0), 0.999), 0.1)
  np.testing.assert_allclose(ema_decay_at(jnp.asarray(90), 0.999), 91 / 100)
  np.testing.assert_allclose(ema_decay_at(jnp.asarray(10**6), 0.999), 0.999)
  np.testing.assert_allclose(ema_decay_at(jnp.asarray(5), 0.0), 0.0)


def test_apply_gradients_sgd_and_ema_closed_form():
  state = create_train_state({'w': jnp.zeros(3)}, optax.sgd(0.5), jax.random.PRNGKey(0))
  grads = {'w': -jnp.ones(3)}  # Each step moves w by +0.5.
  ema = np.zeros(3)
  for step in range(4):
    state = state.apply_gradients(grads, ema_decay=0.9)
    w = 0.5 * (step + 1)
    decay = min(0.9, (1 + step) / (10 + step))
    ema = decay * ema + (1 - decay) * w
    np.testing.assert_allclose(state.params['w'], w)
    np.testing.assert_allclose(state.ema_params['w'], ema, rtol=1e-6)
  assert int(state.step) == 4


def test_diffusion_state_is_a_pytree_with_scale_factor():
  state = create_train_state({'w': jnp.ones(2)}, optax.adam(1e-3), jax.random.PRNGKey(0),
                             DiffusionTrainState, scale_factor=jnp.float32(0.18215))
  leaves, treedef = jax.tree.flatten(state)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  np.testing.assert_allclose(rebuilt.scale_factor, 0.18215)
  assert rebuilt.tx is state.tx  # The optimizer is static, not a leaf.
