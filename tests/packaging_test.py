"""Install metadata: pyproject.toml declares what the library imports, and the extras resolve."""
import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
# Imported only when a feature asks for it, and declared as that feature's extra.
OPTIONAL_MODULES = {'matplotlib': 'plot', 'wandb': 'wandb'}
# Declared but not imported by name: what they provide is reached another way.
INDIRECT = {
    'importlib-resources': 'TFDS imports it to prepare catalogue datasets',
    'tensorboard': 'the viewer of the event files flax writes through tf.summary',
}


def _name(requirement: str) -> str:
  return re.split(r'[\s\[<>=!~;]', requirement, maxsplit=1)[0].lower().replace('_', '-')


def _applies(requirement: str) -> bool:
  """Evaluates the `sys_platform` markers used in pyproject.toml for this machine."""
  marker = requirement.partition(';')[2].strip()
  if not marker:
    return True
  match = re.fullmatch(r"sys_platform\s*(==|!=)\s*'([^']+)'", marker)
  assert match, f'unexpected marker {marker!r}'
  return (sys.platform == match[2]) == (match[1] == '==')


def _imported_modules() -> set[str]:
  """Top-level third-party modules imported anywhere in the library."""
  modules = set()
  for path in (ROOT / 'ldm_jax').rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules.update(alias.name.split('.')[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        modules.add(node.module.split('.')[0])
  return {m for m in modules if m not in sys.stdlib_module_names and m != 'ldm_jax'}


def test_runtime_dependencies_are_exactly_what_the_library_imports():
  declared = {_name(r) for r in PYPROJECT['dependencies'] if _applies(r)}
  distributions = importlib.metadata.packages_distributions()
  used = set()
  for module in _imported_modules():
    if module in OPTIONAL_MODULES:
      extra = PYPROJECT['optional-dependencies'][OPTIONAL_MODULES[module]]
      assert module in {_name(r) for r in extra}, module
      continue
    names = {_name(d) for d in distributions.get(module, [module])}
    assert names & declared, f'{module} is imported but not a runtime dependency ({names})'
    used |= names & declared
  assert declared - used == set(INDIRECT), 'declared but never imported'
  every = PYPROJECT['dependencies'] + sum(PYPROJECT['optional-dependencies'].values(), [])
  assert 'chex' not in {_name(r) for r in every}
  test_only = {_name(r) for r in PYPROJECT['optional-dependencies']['test']}
  assert not test_only & declared, 'test tools are not runtime dependencies'


def test_requirements_file_ci_and_readme_install_the_test_extra():
  lines = [line.strip() for line in (ROOT / 'requirements.txt').read_text().splitlines()]
  assert [line for line in lines if line and not line.startswith('#')] == ['-e .[test]']
  command = 'pip install -r requirements.txt && python -m pytest -q tests'
  assert command in (ROOT / '.ci' / 'run').read_text()
  assert command in (ROOT / 'README.md').read_text()
  # TensorFlow: the CPU build where it has wheels, the macOS build on macOS.
  tensorflow = {_name(r): r.partition(';')[2].strip() for r in PYPROJECT['dependencies']
                if _name(r).startswith('tensorflow') and _name(r) != 'tensorflow-datasets'}
  assert tensorflow == {'tensorflow-cpu': "sys_platform != 'darwin'",
                        'tensorflow': "sys_platform == 'darwin'"}


def _resolve(requirements: list[str], platforms: list[str], tmp_path) -> subprocess.CompletedProcess:
  """pip's resolution of `requirements` (no dependencies) for CPython 3.11 wheels on `platforms`."""
  command = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-deps',
             '--ignore-installed', '--only-binary=:all:', '--python-version', '3.11',
             '--target', str(tmp_path / 'target'), '--report', str(tmp_path / 'report.json'),
             '-q', *(f'--platform={p}' for p in platforms), *requirements]
  return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _jax_extra(extra: str) -> list[str]:
  """The requirements `jax[extra]` adds, for the installed jax, without jaxlib."""
  requires = importlib.metadata.requires('jax') or []
  found = [r.split(';')[0].replace(' ', '') for r in requires if f'extra == "{extra}"' in r]
  return [re.sub(r'\[[^\]]*\]', '', r) for r in found if _name(r) not in ('jaxlib', 'requests')]


def test_accelerator_and_macos_packages_exist(tmp_path):
  """The packages of `.[cuda12]`, `.[tpu]` and TensorFlow on Apple Silicon have wheels."""
  linux = ['manylinux_2_27_x86_64', 'manylinux_2_31_x86_64']
  for extra in ('cuda12', 'tpu'):
    assert f'jax[{extra}]' in ''.join(PYPROJECT['optional-dependencies'][extra])
  jax_version = importlib.metadata.version('jax')
  accelerators = _jax_extra('cuda12') + _jax_extra('tpu') + [f'jax-cuda12-pjrt=={jax_version}']
  assert {_name(r) for r in accelerators} == {'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'libtpu'}
  result = _resolve(accelerators, linux, tmp_path)
  if result.returncode and _resolve([f'jax=={jax_version}'], linux, tmp_path).returncode:
    pytest.skip(f'no package index reachable: {result.stderr.strip()[-200:]}')
  assert result.returncode == 0, result.stderr[-2000:]
  macos = [r.partition(';')[0].strip() for r in PYPROJECT['dependencies']
           if "sys_platform == 'darwin'" in r]
  result = _resolve(macos, ['macosx_12_0_arm64', 'macosx_14_0_arm64'], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
