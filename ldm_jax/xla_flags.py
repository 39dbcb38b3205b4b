"""XLA flags the programs of ldm_jax set for themselves, under the user's own XLA_FLAGS.

`python -m ldm_jax.main` and `python -m ldm_jax.bench` call `apply_defaults()` before
JAX starts its backends (XLA reads XLA_FLAGS once, then). Each flag of
`DEFAULT_FLAGS` is added to XLA_FLAGS unless XLA_FLAGS already names it: the user's
setting always wins, e.g.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=default python -m ldm_jax.bench ...

restores XLA's own choice for that flag, and `LDM_JAX_XLA_DEFAULTS=0` leaves
XLA_FLAGS exactly as given. Libraries importing ldm_jax are not affected: only the
program entry points apply them.
"""
import os
import re
from collections.abc import Mapping

# name -> value. They change which kernels run, not what is computed.
DEFAULT_FLAGS: dict[str, str] = {}
# Set to 0 (or false/no/off) to add none of DEFAULT_FLAGS.
OPT_OUT_VARIABLE = 'LDM_JAX_XLA_DEFAULTS'

_FLAG_NAME = re.compile(r'--?([A-Za-z0-9_]+)')


def named_flags(xla_flags: str) -> set[str]:
  """The flag names in an XLA_FLAGS string (`--name=value`, `--name` or `--noname`)."""
  names = set()
  for token in xla_flags.split():
    match = _FLAG_NAME.match(token)
    if match:
      name = match.group(1)
      names.add(name)
      if name.startswith('no'):
        names.add(name[2:])  # `--noxla_foo` names xla_foo too.
  return names


def merged(xla_flags: str, defaults: Mapping[str, str]) -> str:
  """`xla_flags` with each default the user did not name appended.

  Args:
    xla_flags: the user's XLA_FLAGS ('' when unset).
    defaults: flag name -> value.

  Returns:
    The new XLA_FLAGS: the user's flags first, unchanged, then the defaults they
    do not mention.
  """
  named = named_flags(xla_flags)
  added = [f'--{name}={value}' for name, value in defaults.items() if name not in named]
  return ' '.join([xla_flags.strip(), *added]).strip()


def apply_defaults(environ: dict[str, str] | None = None,
                   defaults: Mapping[str, str] | None = None) -> str:
  """Adds `DEFAULT_FLAGS` to XLA_FLAGS in `environ` (default `os.environ`) as `merged` does.

  Must run before JAX initializes a backend to take effect. Does nothing when
  `LDM_JAX_XLA_DEFAULTS` is 0/false/no/off.

  Returns:
    The resulting XLA_FLAGS.
  """
  environ = os.environ if environ is None else environ
  defaults = DEFAULT_FLAGS if defaults is None else defaults
  current = environ.get('XLA_FLAGS', '')
  if environ.get(OPT_OUT_VARIABLE, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return current
  value = merged(current, defaults)
  if value:
    environ['XLA_FLAGS'] = value
  return value
