"""The XLA flags `import ldm_jax` sets: the user's XLA_FLAGS always win."""
import subprocess
import sys

from ldm_jax import xla_flags

_DEFAULTS = {'xla_cpu_experimental_ynn_fusion_type': '', 'xla_cpu_enable_fast_min_max': 'false'}


def test_defaults_are_added_after_the_users_flags():
  assert xla_flags.merged('', _DEFAULTS) == (
      '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_min_max=false')
  assert xla_flags.merged(' --xla_force_host_platform_device_count=8 ', {}) == (
      '--xla_force_host_platform_device_count=8')


def test_a_flag_the_user_names_is_not_overridden():
  user = '--xla_cpu_experimental_ynn_fusion_type=default --xla_dump_to=/tmp/d'
  assert xla_flags.merged(user, _DEFAULTS) == user + ' --xla_cpu_enable_fast_min_max=false'
  # Boolean spellings: `--flag` and `--noflag` name it too.
  assert xla_flags.merged('--noxla_cpu_enable_fast_min_max', _DEFAULTS) == (
      '--noxla_cpu_enable_fast_min_max --xla_cpu_experimental_ynn_fusion_type=')
  assert xla_flags.merged('--xla_cpu_enable_fast_min_max', _DEFAULTS).count('fast_min_max') == 1


def test_apply_sets_the_environment_unless_opted_out():
  environ = {'XLA_FLAGS': '--xla_cpu_enable_fast_min_max=true'}
  assert xla_flags.apply_defaults(environ, _DEFAULTS) == environ['XLA_FLAGS'] == (
      '--xla_cpu_enable_fast_min_max=true --xla_cpu_experimental_ynn_fusion_type=')
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/d', xla_flags.OPT_OUT_VARIABLE: '0'}
  assert xla_flags.apply_defaults(environ, _DEFAULTS) == '--xla_dump_to=/tmp/d'
  assert environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/d'
  environ = {}
  xla_flags.apply_defaults(environ, {})
  assert 'XLA_FLAGS' not in environ
  # A jaxlib the defaults were not checked with gets none of them.
  environ = {}
  assert xla_flags.apply_defaults(environ, _DEFAULTS, jaxlib_version='0.9.2') == ''
  assert 'XLA_FLAGS' not in environ
  assert xla_flags.jaxlib_supported('0.10.2') and not xla_flags.jaxlib_supported('0.11.0')


def test_this_jaxlib_accepts_the_default_flags():
  """XLA aborts on a flag it does not know: a jaxlib that dropped one must fail here."""
  flags = xla_flags.merged('', xla_flags.DEFAULT_FLAGS)
  run = subprocess.run(
      [sys.executable, '-c', 'import jax, jax.numpy as jnp; print(float(jnp.ones(3).sum()))'],
      env={'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu', 'PATH': ''}, capture_output=True,
      text=True, check=False)
  assert run.returncode == 0 and run.stdout.strip() == '3.0', run.stderr[-1000:]


def test_import_applies_the_defaults_and_keeps_the_users_choice():
  code = 'import os, ldm_jax; print(os.environ.get("XLA_FLAGS", ""))'
  def flags_after_import(env):
    run = subprocess.run([sys.executable, '-c', code], env={'PATH': '', **env},
                         capture_output=True, text=True, check=True)
    return run.stdout.strip()
  assert flags_after_import({}) == xla_flags.merged('', xla_flags.DEFAULT_FLAGS)
  user = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'
  assert flags_after_import({'XLA_FLAGS': user}) == user
  assert flags_after_import({xla_flags.OPT_OUT_VARIABLE: 'off'}) == ''


def test_the_defaults_take_convolutions_out_of_ynnpack():
  code = '\n'.join([
      'import jax, jax.numpy as jnp, ldm_jax',
      'conv = lambda x, w: jax.lax.conv_general_dilated(',
      "    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))",
      'hlo = jax.jit(conv).lower(jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64)))',
      "print('ynn_fusion' in hlo.compile().as_text())"])
  run = subprocess.run([sys.executable, '-c', code], env={'PATH': '', 'JAX_PLATFORMS': 'cpu'},
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-1000:]
  assert run.stdout.strip() == 'False'
