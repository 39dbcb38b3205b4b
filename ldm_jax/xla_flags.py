"""XLA flags ldm_jax sets for itself, under the user's own XLA_FLAGS.

`import ldm_jax` calls `apply_defaults()`, before JAX starts its backends (XLA reads
XLA_FLAGS once, when the first backend starts). Each flag of `DEFAULT_FLAGS` is added
to XLA_FLAGS unless XLA_FLAGS already names it, so the user's setting always wins:

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution python -m ldm_jax.bench ...

gives XLA's own choice back, and `LDM_JAX_XLA_DEFAULTS=0` leaves XLA_FLAGS exactly as
given. A program that started a JAX backend before importing ldm_jax keeps the flags
it started with.

The one default (see benchmarks/README.md, "XLA CPU flags", for the measurements):
XLA:CPU runs each convolution through YNNPACK unless told otherwise; its Eigen
convolutions compute the same convolution 1.2-1.8x faster for this project's shapes
(3x3, 64-256 channels, 8x8-32x32 maps), most of all for the weight gradients, which
took the U-Net train step of `configs/bench_unet32.py` from 4.1 to 2.8 s on a 2-core
AMD EPYC. The flag only changes the CPU backend's kernels; GPU and TPU ignore it.
"""
import importlib.metadata
import os
import re
from collections.abc import Mapping

# name -> value. They change which kernels run, not what is computed.
DEFAULT_FLAGS: dict[str, str] = {
    # Leave convolutions out of YNNPACK's fusions (its dots, reductions and
    # elementwise fusions stay): XLA then calls Eigen's convolutions.
    'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
}
# XLA aborts on a flag it does not know: the defaults are added only for the jaxlib
# versions they were checked with (tests/xla_flags_test.py starts one with them).
JAXLIB_VERSIONS = ((0, 10), (0, 11))  # [first, last) as (major, minor).
# Set to 0 (or false/no/off) to add none of DEFAULT_FLAGS (nor the huge pages of
# ldm_jax/host_memory.py).
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


def jaxlib_supported(version: str | None = None) -> bool:
  """Whether `version` (default: the installed jaxlib's) is one the defaults were checked with."""
  if version is None:
    try:
      version = importlib.metadata.version('jaxlib')
    except importlib.metadata.PackageNotFoundError:
      return False
  match = re.match(r'(\d+)\.(\d+)', version)
  if not match:
    return False
  major_minor = (int(match.group(1)), int(match.group(2)))
  return JAXLIB_VERSIONS[0] <= major_minor < JAXLIB_VERSIONS[1]


def opted_out(environ: Mapping[str, str]) -> bool:
  """Whether `LDM_JAX_XLA_DEFAULTS` turns ldm_jax's runtime defaults off (0/false/no/off)."""
  return environ.get(OPT_OUT_VARIABLE, '1').strip().lower() in ('0', 'false', 'no', 'off')


def apply_defaults(environ: dict[str, str] | None = None,
                   defaults: Mapping[str, str] | None = None,
                   jaxlib_version: str | None = None) -> str:
  """Adds `DEFAULT_FLAGS` to XLA_FLAGS in `environ` (default `os.environ`) as `merged` does.

  Takes effect only before JAX starts a backend. Does nothing when
  `LDM_JAX_XLA_DEFAULTS` is 0/false/no/off or jaxlib is not a checked version.

  Returns:
    The resulting XLA_FLAGS.
  """
  environ = os.environ if environ is None else environ
  defaults = DEFAULT_FLAGS if defaults is None else defaults
  current = environ.get('XLA_FLAGS', '')
  if opted_out(environ) or not jaxlib_supported(jaxlib_version):
    return current
  value = merged(current, defaults)
  if value:
    environ['XLA_FLAGS'] = value
  return value
