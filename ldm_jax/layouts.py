"""Train steps, with the train state kept in the device layouts XLA picks.

A train state is stored row-major, in the logical order of each array (a convolution
kernel as HWIO). cuDNN convolves with kernels laid out KRSC (O, H, W, I), so a GPU
step over row-major state transposes every kernel into that order in the forward
pass and every kernel gradient back, and runs the optimizer and EMA updates on
row-major arrays: 6 of the 87 ms of the LDM-4 bfloat16 step on an H200
(benchmarks/README.md, rows 36 and 38).

`StateStep` jits `fn(state, *args) -> (state, aux)` with the state donated. With
`config.train.state_layouts='auto'` (the default) it compiles with `Layout.AUTO` for
the state's inputs and outputs: XLA then stores each state array in the order its
users want and keeps it there from step to step. Values, shapes and shardings are
unchanged, and so is everything read from them on the host (checkpoints, logs). On an
H200 the LDM-4 bfloat16 step took 0.95x the time of the row-major one, through this
class and through the benchmark (0.080 against 0.084 s a step, MFU 35.7% against
33.9%). 'default' keeps the state row-major, a plain `jax.jit` step. XLA:CPU picks
row-major layouts: there both settings run the same program and nothing is moved.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from jax.experimental.layout import Format, Layout

from ldm_jax.errors import UserError

# 'default': row-major state, a plain `jax.jit` step; 'auto': XLA picks the layouts.
STATE_LAYOUTS = ('default', 'auto')
DEFAULT_STATE_LAYOUTS = 'auto'


def state_layouts(config: ml_collections.ConfigDict) -> str:
  """`config.train.state_layouts` (`DEFAULT_STATE_LAYOUTS` where the config predates the
  field), checked."""
  value = config.train.get('state_layouts', DEFAULT_STATE_LAYOUTS)
  if value not in STATE_LAYOUTS:
    raise UserError(f'config.train.state_layouts={value!r} is not valid; accepted: '
                    f'{", ".join(map(repr, STATE_LAYOUTS))}')
  return value


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None),
                                     weak_type=getattr(x, 'weak_type', False)), tree)


def _into(x: Any, fmt: Format) -> Any:
  """`x` in the format `fmt`: itself if it is already, else moved there (donated)."""
  return x if getattr(x, 'format', None) == fmt else jax.device_put(x, fmt, donate=True)


class StateStep:
  """`fn(state, *args) -> (state, aux)`, jitted with the state donated.

  With `layouts='default'` a call is a call of the `jax.jit` function (or of the program
  `compile` made). With 'auto' the step is compiled on the first call (or by `compile`,
  from shapes) with the state in layouts of XLA's choosing, `formats`; the arrays of a
  state that is not the one the last call returned (the first one, a restored one) are
  first moved into them where they are not already, and the state the step returns is
  already in them.

  Attributes:
    formats: the state's `Format`s (layout and sharding per array), once compiled.
  """

  def __init__(self, fn: Callable, state_sharding: Any, arg_shardings: Sequence[Any] | None,
               aux_sharding: Any, layouts: str):
    """Args: `fn`; the state's sharding (a tree or a prefix of it); the other arguments'
    (None: those of the arrays of the first call); the aux output's; one of `STATE_LAYOUTS`.
    """
    if layouts not in STATE_LAYOUTS:
      raise ValueError(f'layouts={layouts!r}; accepted: {", ".join(STATE_LAYOUTS)}')
    self._fn = fn
    self._state_sharding = state_sharding
    self._arg_shardings = arg_shardings
    self._aux_sharding = aux_sharding
    self._layouts = layouts
    self._jitted = None
    self._compiled = None
    self._last_state = None
    self.formats = None

  def _jit(self, state_in: Any, state_out: Any, args: Sequence[Any]):
    arg_shardings = (jax.tree.map(lambda x: x.sharding, args) if self._arg_shardings is None
                     else self._arg_shardings)
    return jax.jit(self._fn, in_shardings=(state_in, *arg_shardings),
                   out_shardings=(state_out, self._aux_sharding), donate_argnums=0)

  def compile(self, abstract_state: Any, *args: Any) -> jax.stages.Compiled:
    """Compiles for a state of these shapes (arrays or `jax.ShapeDtypeStruct`s) and args."""
    abstract_state = _abstract(abstract_state)
    if self._layouts == 'default':
      chosen = self._state_sharding
    else:
      auto = jax.tree.map(lambda s: Format(Layout.AUTO, s), self._state_sharding)
      compiled = self._jit(auto, auto, args).lower(abstract_state, *args).compile()
      chosen, chosen_out = compiled.input_formats[0][0], compiled.output_formats[0]
      if all(a.layout == b.layout
             for a, b in zip(jax.tree.leaves(chosen), jax.tree.leaves(chosen_out))):
        self._compiled, self.formats = compiled, chosen
        return compiled
      # The next step must read what this one writes: both ends in the input's layouts.
    self._compiled = self._jit(chosen, chosen, args).lower(abstract_state, *args).compile()
    self.formats = self._compiled.input_formats[0][0]
    return self._compiled

  def __call__(self, state: Any, *args: Any) -> tuple[Any, Any]:
    if self._layouts == 'default':  # Row-major, as every state starts: nothing to move.
      if self._compiled is None and self._jitted is None:
        self._jitted = self._jit(self._state_sharding, self._state_sharding, args)
      return (self._jitted if self._compiled is None else self._compiled)(state, *args)
    if self._compiled is None:
      self.compile(state, *args)
    if state is not self._last_state:
      state = jax.tree.map(_into, state, self.formats)
    self._last_state, aux = self._compiled(state, *args)
    return self._last_state, aux
