"""`TrainState`: everything a training run needs, as one pytree.

It is created once, stepped by a jitted `train_step`, and saved/restored whole by
orbax. The optimizer `tx` is static (not a leaf); everything else is an array.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Params = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # [] int32, number of updates applied.
  params: Params
  ema_params: Params              # Exponential moving average of `params`.
  opt_state: optax.OptState
  rng: jax.Array                  # [2] uint32 base key; a step's key is fold_in(rng, step).
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Params, *, ema_decay: float) -> 'TrainState':
    """One optimizer update followed by the EMA update (decay 0 copies `params`)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    decay = ema_decay_at(self.step, ema_decay)
    ema_params = optax.incremental_update(params, self.ema_params, 1.0 - decay)
    return self.replace(step=self.step + 1, params=params, ema_params=ema_params,
                        opt_state=opt_state)


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """EMA decay with warmup, min(ema_decay, (1 + step) / (10 + step)).

  Without warmup the average would keep the random initialization for ~1/(1 - decay)
  steps; short runs would then sample from a blend of trained and untrained weights.
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


@flax.struct.dataclass
class DiffusionTrainState(TrainState):
  # Latents are multiplied by it before diffusion; kept in the state so that a
  # resumed run and `--mode=sample` use exactly the value training used.
  scale_factor: jax.Array = flax.struct.field(default_factory=lambda: jnp.ones((), jnp.float32))


def create_train_state(params: Params, tx: optax.GradientTransformation, rng: jax.Array,
                       state_cls: type[TrainState] = TrainState, **extra) -> TrainState:
  """A fresh state at step 0 with EMA initialized to the parameters."""
  return state_cls(step=jnp.zeros((), jnp.int32), params=params,
                   ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                   rng=rng, tx=tx, **extra)
