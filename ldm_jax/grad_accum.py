"""Gradient accumulation: one update from several microbatches of one jitted step."""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def split_microbatches(tree: PyTree, num_microbatches: int) -> PyTree:
  """[B, ...] leaves -> [num_microbatches, B / num_microbatches, ...].

  Microbatch i holds examples i, i + n, i + 2n, ... (n = num_microbatches): with the
  batch sharded along its leading axis, every device keeps its own examples, so the
  split moves no data between devices.
  """
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f'batch of {x.shape[0]} does not split into {num_microbatches} '
                       f'microbatches')
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def mean_value_and_grad(loss_fn: Callable[[PyTree, PyTree, jax.Array], jax.Array],
                        params: PyTree, inputs: PyTree, rng: jax.Array,
                        num_microbatches: int) -> tuple[jax.Array, PyTree]:
  """Loss and gradient of a batch-mean loss, computed over `num_microbatches` parts.

  `loss_fn(params, microbatch, rng)` must be the mean of per-example terms over its
  microbatch; the parts are equal in size, so the mean of their losses and gradients
  is the loss and gradient of the whole batch. Randomness that should not depend on
  the split must already be in `inputs`; `rng` (folded with the microbatch index)
  serves only what is drawn inside the model, such as dropout masks.

  Args:
    loss_fn: (params, inputs, rng) -> scalar loss.
    params: differentiated pytree.
    inputs: pytree of [B, ...] arrays (None leaves allowed).
    rng: PRNG key.
    num_microbatches: 1 computes the batch in one go; n > 1 runs a `lax.scan` over
      n microbatches, holding the activations of one microbatch at a time.

  Returns:
    (loss, grads) averaged over the batch.
  """
  grad_fn = jax.value_and_grad(loss_fn)
  if num_microbatches == 1:
    return grad_fn(params, inputs, jax.random.fold_in(rng, 0))

  def accumulate(carry, xs):
    index, microbatch = xs
    loss, grads = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  xs = (jnp.arange(num_microbatches), split_microbatches(inputs, num_microbatches))
  total, _ = jax.lax.scan(accumulate, zeros, xs)
  return jax.tree.map(lambda x: x / num_microbatches, total)
