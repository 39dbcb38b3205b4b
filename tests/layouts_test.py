"""Train steps over state kept in device layouts of XLA's choosing (`ldm_jax.layouts`).

XLA:CPU picks row-major layouts, so these tests lay a convolution kernel out as cuDNN
reads it (output channels outermost) by hand, as a GPU step's state would be, and check
that the step, the host and the checkpoints all see the same values.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.layout import Format, Layout

from ldm_jax import checkpointing, layouts, sharding
from ldm_jax.train_state import TrainState, create_train_state

# An HWIO kernel stored O-major, the layout a GPU step keeps its convolution kernels in.
KRSC = Layout(major_to_minor=(3, 0, 1, 2))
TX = optax.adam(1e-2)  # One optimizer object: it is part of the state's tree structure.


def _state():
  params = {'conv': {'kernel': jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 8)),
                     'bias': jnp.zeros((8,))}}
  return create_train_state(params, TX, jax.random.PRNGKey(1))


def _step(state, x):
  def loss_fn(params):
    y = jax.lax.conv_general_dilated(x, params['conv']['kernel'], (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.mean(jnp.square(y + params['conv']['bias'] - 1.0))
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads, ema_decay=0.9), loss


def _krsc(state, replicated):
  """`state` with every 4-D array (kernel, its moments and EMA) laid out KRSC."""
  return jax.tree.map(lambda a: jax.device_put(a, Format(KRSC if a.ndim == 4 else None,
                                                         replicated)), state)


def _order(a):
  return a.format.layout.major_to_minor


def _host(tree):
  return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh()


def test_step_moves_only_what_is_not_in_its_layouts_and_computes_the_same(mesh, monkeypatch):
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(2), (8, 6, 6, 4)), data)
  state_sharding = jax.tree.map(lambda _: replicated, _state())
  reference = jax.jit(_step, in_shardings=(state_sharding, data),
                      out_shardings=(state_sharding, replicated))
  want, want_losses = _state(), []
  for _ in range(3):
    want, loss = reference(want, x)
    want_losses.append(float(loss))

  moved = []  # The shapes of the arrays the step moved into its layouts (donating them).
  device_put = jax.device_put

  def counted_device_put(x, *args, donate=False, **kwargs):
    if donate:
      moved.append(x.shape)
    return device_put(x, *args, donate=donate, **kwargs)
  monkeypatch.setattr(jax, 'device_put', counted_device_put)
  step = layouts.StateStep(_step, state_sharding, (data,), replicated, 'auto')
  state = _krsc(_state(), replicated)
  assert _order(state.params['conv']['kernel']) == KRSC.major_to_minor
  losses = []
  for _ in range(3):
    state, loss = step(state, x)
    losses.append(float(loss))
  # Once, on the first call, and only the kernel, its two Adam moments and its EMA:
  # every other array already is as the step (row-major on the CPU) wants it.
  assert moved == [(3, 3, 4, 8)] * 4
  assert losses == want_losses
  for got, expected in zip(_host(state), _host(want)):
    np.testing.assert_array_equal(got, expected)
  assert all(_order(a) == f.layout.major_to_minor
             for a, f in zip(jax.tree.leaves(state), jax.tree.leaves(step.formats)))
  step(jax.tree.map(jnp.copy, state), x)  # A new state, already in the step's layouts.
  assert len(moved) == 4
  state, _ = step(_krsc(state, replicated), x)  # A new state in other layouts: moved.
  assert len(moved) == 8

  # Row-major state ('default'), a plain jitted step: it too reads a KRSC state right.
  row_major = layouts.StateStep(_step, state_sharding, (data,), replicated, 'default')
  state, loss = row_major(_krsc(_state(), replicated), x)
  assert float(loss) == want_losses[0]
  assert _order(state.params['conv']['kernel']) == (0, 1, 2, 3)


def test_checkpoint_of_a_state_in_other_layouts_restores_the_same_values(mesh, tmp_path):
  replicated = sharding.replicated(mesh)
  state = _krsc(_state(), replicated)
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), keep=1)
  checkpointing.save(manager, state)  # Checksums taken from the KRSC arrays ...
  checkpointing.finish(manager)
  # ... and verified against the restored row-major ones.
  restored = checkpointing.restore(manager, checkpointing.abstract_like(state, replicated))
  assert _order(restored.params['conv']['kernel']) == (0, 1, 2, 3)
  for got, expected in zip(_host(restored), _host(state)):
    np.testing.assert_array_equal(got, expected)


def test_unknown_setting_is_refused():
  with pytest.raises(ValueError, match="layouts='tiled'; accepted: default, auto"):
    layouts.StateStep(_step, None, (), None, 'tiled')
