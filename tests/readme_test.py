"""Every shell command of README.md is run or checked here (the CI runs this file).

A command block is fenced ```bash (output and layouts are ```text). Each command in it is
- run, when that is cheap: the virtual environment line, the `python -c` snippets that
  need no trained run, the ablation runner with `--dry_run` appended (the commands it
  plans are then checked like the README's own);
- checked, when running it would train, download or need an accelerator: every
  `python -m ldm_jax.main` command goes through main's own flag parser and
  `modes.check` (config file, overrides, `--mode`, the config's values, the mode's
  options), all in one subprocess, since main's flags cannot live beside the ablation
  runner's in one process; `ldm_jax.bench` commands through bench's parser; installs,
  downloads and launch scripts for being well-formed (the extra, file or script exists,
  the flags they hand to ldm_jax.main parse);
- and a command that trains, or needs a trained run, is mapped to the end-to-end test
  that runs it that way (`E2E`; the test must exist), instead of being trained again.

`python tests/readme_test.py` prints every command with what covers it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
CI_SCRIPT = ROOT / '.ci' / 'run'
TEST_COMMAND = 'pip install -r requirements.txt && python -m pytest -q tests'
# Downloads the README's commands name -> (a committed fixture of the same format, how
# many times more the download downsamples): the checks use the fixture, at an image
# size divided by that ratio so that the latents keep their size.
DOWNLOADS = {
    'weights/sd-vae-ft-mse': ('tests/fixtures/vae', 4),  # SD's VAE is f=8, the fixture f=2.
}
_SEPARATORS = {';', '&&', '||', '&', '|'}
_SHELL_WORDS = {'for', 'do', 'done', 'wait', 'sleep', 'kill', 'echo', 'cd'}


# ------------------------------------------------------------- parsing ----


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
  """(first line number, info string, body) of every fenced code block."""
  blocks, lines, i = [], text.split('\n'), 0
  while i < len(lines):
    match = re.match(r'\s*```(\S*)\s*$', lines[i])
    if match:
      start, body = i + 1, []
      i += 1
      while not re.match(r'\s*```\s*$', lines[i]):
        body.append(lines[i])
        i += 1
      blocks.append((start + 1, match.group(1), '\n'.join(body)))
    i += 1
  return blocks


def _shell_text(script: str) -> str:
  """`script` with comments and line continuations removed, unquoted newlines as ';'."""
  out, quote, i = [], None, 0
  while i < len(script):
    c = script[i]
    if quote:
      out.append(c)
      if c == quote:
        quote = None
    elif c in '\'"':
      quote = c
      out.append(c)
    elif c == '\\' and script[i + 1:i + 2] == '\n':
      i += 1
    elif c == '#' and (not out or out[-1][-1] in ' \n;'):
      while i + 1 < len(script) and script[i + 1] != '\n':
        i += 1
    elif c == '\n':
      out.append(' ; ')
    else:
      out.append(c)
    i += 1
  return ''.join(out)


@dataclasses.dataclass
class Command:
  line: int                  # First line of its block in README.md.
  argv: list[str]
  env: dict[str, str]
  background: bool = False   # Ended by '&', or in a block that sends it a signal.

  @property
  def text(self) -> str:
    env = ' '.join(f'{k}={v}' for k, v in self.env.items())
    return (env + ' ' if env else '') + shlex.join(self.argv)


def simple_commands(script: str, line: int = 0) -> list[Command]:
  """The simple commands of a shell script (split at ; && || & | and newlines)."""
  signalled = 'kill -' in script
  lexer = shlex.shlex(_shell_text(script), posix=True, punctuation_chars=True)
  lexer.whitespace_split, lexer.commenters = True, ''
  commands, words, variables = [], [], {}

  def flush(separator: str) -> None:
    nonlocal words
    if words and words[0] in ('do', 'then'):
      words = words[1:]
    if words:
      if words[0] == 'for':  # for VAR in V1 V2 ...: checked with the first value.
        variables[f'${words[1]}'] = words[3]
      env = {}
      while words and re.fullmatch(r'[A-Z_][A-Z0-9_]*=.*', words[0]):
        key, value = words.pop(0).split('=', 1)
        env[key] = value
      argv = [functools.reduce(lambda w, kv: w.replace(*kv), variables.items(), w)
              for w in words]
      commands.append(Command(line, argv, env, background=separator == '&' or signalled))
    words = []

  for token in lexer:
    if token in _SEPARATORS:
      flush(token)
    else:
      words.append(token)
  flush('')
  return commands


def readme_commands() -> list[Command]:
  return [c for line, info, body in fenced_blocks(README.read_text()) if info == 'bash'
          for c in simple_commands(body, line)]


def _flag(argv: list[str], name: str) -> str | None:
  for arg in argv:
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return None


# ------------------------------------------------------ end-to-end map ----


def _main_e2e(args: list[str], background: bool = False) -> str:
  """The end-to-end test that runs `python -m ldm_jax.main ARGS` that way (`background`:
  started with '&', to be stopped by a signal)."""
  config = pathlib.Path(_flag(args, 'config') or '').stem
  mode = _flag(args, 'mode') or 'train'
  has = lambda fragment: any(fragment in a for a in args)
  if config == 'stable_diffusion':
    return {'train': 'sd_modes_test.py::test_lora_fine_tuning_lowers_the_loss',
            'sample': 'sd_modes_test.py::test_sample_and_edit_write_images',
            'edit': 'sd_modes_test.py::test_sample_and_edit_write_images',
            'merge_lora': 'sd_modes_test.py::test_merge_lora_exports_a_pipeline_and_a_diffusers_lora_file',
            }[mode]
  rules = [  # The most specific first.
      (has('--coordinator_address'),
       'multihost_test.py::test_two_processes_match_one_and_their_checkpoints_restore_in_one'),
      (background, 'preemption_test.py::test_sigterm_saves_exits_0_and_resume_is_bit_identical'),
      (has('--config.mesh_shape'), 'sharding_test.py::test_diffusion_step_on_a_mesh_equals_one_device'),
      (has('learning_rate=1e39'), 'faults_test.py::test_e2e_nan_run_saves_nothing_non_finite'),
      (has('--config.data.name=folder'),
       'folder_test.py::test_text_to_image_on_a_folder_trains_and_resumes_through_a_file_uri'),
      (has('model.name=identity'),
       'first_stage_test.py::test_identity_first_stage_is_pixel_space_and_skips_stage_1'),
      (has('inception_weights'), 'inception_test.py::test_flax_inception_matches_pytorch_fid'),
      (mode == 'merge_lora', 'lora_test.py::test_merge_lora_mode_writes_the_trained_merge'),
      (has('--config.diffusion.lora.rank') or has('--config.autoencoder.pretrained'),
       'lora_test.py::test_training_changes_only_adapters_and_lowers_the_loss'),
      (mode == 'eval' and config == 'digits_superres',
       'conditioners_test.py::test_superres_outputs_cover_the_eval_split'),
      (mode == 'eval',
       'evaluation_test.py::test_eval_mode_writes_all_metrics_and_reuses_the_classifier'),
      (config == 'digits_text', 'conditioners_test.py::test_text_run_end_to_end'),
      (config == 'digits_superres', 'conditioners_test.py::test_each_conditioner_trains'),
      (config == 'digits_dit' or has('--config.autoencoder.workdir'),
       'ablate_test.py::test_sweep_writes_results_table_and_plots'),
      (mode == 'train_autoencoder',
       'preemption_test.py::test_sigterm_with_discriminator_saves_and_resume_is_bit_identical'),
      (mode == 'encode', 'latent_cache_test.py::test_encode_mode_writes_shards_of_the_encoder_posterior'),
      (mode == 'edit', 'editing_test.py::test_edit_mode_writes_inpaint_and_img2img'),
      (mode in ('train', 'sample'), 'main_test.py::test_train_resume_and_sample'),
  ]
  return next(test for matches, test in rules if matches)


def _assert_test_exists(test_id: str) -> None:
  path, name = test_id.split('::')
  assert re.search(rf'^def {name}\(', (ROOT / 'tests' / path).read_text(), re.M), test_id


# ------------------------------------------------------------ checking ----


# Run in a subprocess: `python -m ldm_jax.main`'s parser and modes.check on each argv.
_CHECK_MAIN = r'''
import json, sys
from absl import flags
from ldm_jax import main, modes
from ldm_jax.errors import UserError

results = []
for argv in json.load(sys.stdin):
  sys.argv = ['ldm_jax.main', *argv]  # config_flags reads its overrides from sys.argv.
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # The previous command's override flags.
  try:
    rest = main.parse_flags(sys.argv)
    if len(rest) > 1:
      raise UserError(f'unexpected arguments {rest[1:]}')
    modes.check(flags.FLAGS.mode, flags.FLAGS.config, main.options_from_flags())
    results.append('ok')
  except SystemExit as e:
    results.append(str(e))
  except UserError as e:
    results.append(f'error: {e}')
print('RESULTS ' + json.dumps(results))
'''


def check_main_commands(argvs: list[list[str]], cwd: pathlib.Path) -> list[str]:
  """'ok' or the one-line error of each `python -m ldm_jax.main` argv, in one process."""
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu',
         'TF_CPP_MIN_LOG_LEVEL': '3'}
  result = subprocess.run([sys.executable, '-c', _CHECK_MAIN], input=json.dumps(argvs),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith('RESULTS '))
  return json.loads(line[len('RESULTS '):])


def _with_fixtures(args: list[str]) -> list[str]:
  for download, (fixture, ratio) in DOWNLOADS.items():
    if any(download in a for a in args):
      args = [a.replace(download, fixture) for a in args]
      size = int(_flag(args, 'config.data.image_size'))
      args = [a for a in args if not a.startswith('--config.data.image_size=')]
      args.append(f'--config.data.image_size={size // ratio}')
  return args


@dataclasses.dataclass
class Coverage:
  how: str                           # What this file does with the command.
  main_args: list[list[str]] = dataclasses.field(default_factory=list)  # To check.
  e2e: list[str] = dataclasses.field(default_factory=list)              # Mapped tests.


def cover(command: Command, workspace: pathlib.Path) -> Coverage:
  """Runs or checks `command` (except main's flags, returned to check in one batch)."""
  argv = command.argv
  program = argv[0]
  if program == 'python' and argv[1:3] == ['-m', 'ldm_jax.main']:
    args = argv[3:]
    how = 'parsed by main, modes.check'
    if _with_fixtures(args) != args:
      how += ' (with the committed fixture in place of the download)'
    return Coverage(how, [args], [_main_e2e(args, command.background)])
  if program == 'python' and argv[1:3] == ['-m', 'pytest']:
    assert TEST_COMMAND in CI_SCRIPT.read_text()
    assert shlex.join(argv) == TEST_COMMAND.split(' && ')[1]
    return Coverage('run by the CI (.ci/run), verbatim')
  if program == 'pip':
    return _cover_pip(argv)
  if program == 'python' and argv[1:3] == ['-m', 'venv']:
    return Coverage('run (with the block, --without-pip)')
  if program == 'source':
    assert argv[1] == '.venv/bin/activate'
    return Coverage('run (with the block)')
  if program == 'python' and argv[1] == '-c':
    return _cover_snippet(argv[2], workspace)
  if program == 'python' and argv[1:3] == ['-m', 'ldm_jax.bench']:
    return _cover_bench(argv[3:])
  if program == 'python' and argv[1:3] == ['-m', 'ldm_jax.ablate']:
    return _cover_ablate(argv[3:])
  if program == 'python' and argv[1] == 'benchmarks/side_by_side.py':
    return _cover_side_by_side(argv[2:])
  if program == 'tensorboard':
    assert shutil.which('tensorboard', path=os.path.dirname(sys.executable)), 'not installed'
    assert _flag(argv, 'logdir')
    return Coverage('well-formed: tensorboard is installed (a viewer)')
  if program in ('wget', 'sha256sum'):
    from ldm_jax.models import inception

    assert os.path.basename(argv[-1]) == inception.WEIGHTS_FILE
    assert inception.WEIGHTS_SHA256_PREFIX in argv[-1]
    return Coverage('well-formed: the file ldm_jax.models.inception expects (a download)',
                    e2e=['inception_test.py::test_flax_inception_matches_pytorch_fid'])
  if program == 'ldm_jax/launch/tpu_pod.sh':
    assert os.access(ROOT / program, os.X_OK)
    _, tpu, zone, workdir, *flags = argv
    assert workdir.startswith('gs://') and tpu and zone
    return Coverage('well-formed: the script exists; the flags it passes parse',
                    [[f'--workdir={workdir}', *flags]],
                    ['launch_test.py::test_tpu_pod_script_copies_installs_and_launches_on_every_worker'])
  if program == 'sbatch':
    script = next(a for a in argv[1:] if not a.startswith('-'))
    assert (ROOT / script).is_file()
    flags = argv[argv.index(script) + 1:]
    return Coverage('well-formed: the script exists; the flags it passes parse', [flags],
                    ['launch_test.py::test_slurm_script_installs_once_then_runs_one_task_per_node'])
  if program == 'srun':
    inner = argv[next(i for i, a in enumerate(argv) if a == 'python'):]
    coverage = cover(Command(command.line, inner, {}), workspace)
    coverage.how = 'well-formed: srun options, then ' + coverage.how
    return coverage
  if program == 'gcloud':
    assert argv[1:5] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in argv
    inner = simple_commands(_flag(argv, 'command'), command.line)
    parts = [cover(c, workspace) for c in inner if c.argv[0] != 'cd']
    return Coverage('well-formed: ssh to every worker, then ' + '; '.join(p.how for p in parts),
                    sum((p.main_args for p in parts), []), sum((p.e2e for p in parts), []))
  if program in _SHELL_WORDS:
    return Coverage('shell (the block passes bash -n)')
  raise AssertionError(f'README line {command.line}: no check for {command.text!r}')


def _cover_pip(argv: list[str]) -> Coverage:
  assert argv[1] == 'install'
  if argv[2] == '-r':
    assert (ROOT / argv[3]).is_file()
    return Coverage('run by the CI (.ci/run), verbatim')
  assert argv[2] == '-e'
  extra = re.fullmatch(r'\.\[(\w+)\]', argv[3]).group(1)
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  assert extra in project['optional-dependencies'], extra
  return Coverage(f'well-formed: the {extra!r} extra exists (an accelerator install)',
                  e2e=['packaging_test.py::test_accelerator_and_macos_packages_exist'])


def _cover_snippet(code: str, workspace: pathlib.Path) -> Coverage:
  if 'perceptual.load_lpips' in code:  # The test computes exactly this.
    return Coverage('mapped', e2e=[
        'perceptual_test.py::test_lpips_matches_reference_package_values_and_input_gradient'])
  if 'samples_2200.npz' in code:
    how = 'run on a stand-in of the default run\'s samples (ran before the main checks)'
    assert (workspace / 'image.png').is_file() and (workspace / 'mask.png').is_file()
    return Coverage(how)
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', code], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return Coverage('run')


def _parse_absl(module, argv: list[str]) -> list[str]:
  """Parses `argv` with the absl flags `module` defined in this process; returns the rest."""
  from absl import flags

  saved = sys.argv
  sys.argv = [module.__name__, *argv]  # config_flags reads its overrides from sys.argv.
  try:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)  # The previous command's override flags.
    return flags.FLAGS(sys.argv)
  finally:
    sys.argv = saved


def _cover_side_by_side(args: list[str]) -> Coverage:
  """Its plan and commands (--dry_run builds nothing); the timing itself needs PyTorch."""
  result = subprocess.run([sys.executable, 'benchmarks/side_by_side.py', *args, '--dry_run'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ldm_jax.bench' in result.stdout, result.stdout[-3000:]
  return Coverage('run with --dry_run (the timing needs a PyTorch environment)',
                  e2e=['side_by_side_test.py::test_side_by_side_against_diffusers'])


def _cover_bench(args: list[str]) -> Coverage:
  from absl import flags

  from ldm_jax import bench
  from ldm_jax.validation import validate_config

  try:
    rest = _parse_absl(bench, args)
    name = bench.benchmark_of(rest)
    validate_config(flags.FLAGS.config)
  finally:
    flags.FLAGS.unparse_flags()
  # Timing runs, not trainings: only the train benchmark has an end-to-end test.
  return Coverage(f'parsed by bench ({name} benchmark), config validated',
                  e2e=['bench_test.py::test_train_benchmark_prints_a_parsable_result']
                  if name == 'train' else [])


def _cover_ablate(args: list[str]) -> Coverage:
  from absl import flags

  from ldm_jax import ablate

  # The runner's own flags, apart from the other command-line tools' in this process.
  own = flags.FlagValues()
  for flag in flags.FLAGS.get_flags_for_module(ablate.__name__):
    own[flag.name] = copy.deepcopy(flag)
  assert own(['ldm_jax.ablate', *args]) == ['ldm_jax.ablate'], args
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ablate.run_sweep(own.sweep, '/nonexistent/ablate_root', dry_run=True, only=own.only)
  commands = [shlex.split(c) for line in printed.getvalue().splitlines()
              for c in line.split(' && ')]
  # Besides main's commands, a sweep with several samplers moves each evaluation's record.
  assert all(c[:3] == ['python', '-m', 'ldm_jax.main'] or (c[0] == 'mv' and len(c) == 3)
             for c in commands), commands
  planned = [c[3:] for c in commands if c[0] != 'mv']
  assert planned and all(c and c[0].startswith('--config=') for c in planned)
  # Seeds differ only in their workdir and seed: one of each variant and mode is checked.
  distinct = {tuple(a for a in c if not a.startswith(('--workdir=', '--config.seed='))): c
              for c in planned}
  return Coverage(f'run with --dry_run; its {len(planned)} planned commands checked like '
                  f'main commands (one per variant and mode)', list(distinct.values()),
                  ['ablate_test.py::test_sweep_writes_results_table_and_plots'])


# --------------------------------------------------------------- tests ----


def make_workspace(root: pathlib.Path) -> pathlib.Path:
  """`root` made to look like the repository root after the README's first runs."""
  for name in ('configs', 'tests', 'experiments', 'ldm_jax'):
    (root / name).symlink_to(ROOT / name)
  samples = root / 'runs' / 'default' / 'samples'
  samples.mkdir(parents=True)
  rng = np.random.default_rng(0)
  np.savez(samples / 'samples_2200.npz', images=rng.integers(0, 256, (4, 32, 32, 1), np.uint8))
  snippet = next(c for c in readme_commands() if c.argv[:2] == ['python', '-c']
                 and 'samples_2200.npz' in c.argv[2])
  subprocess.run([sys.executable, '-c', snippet.argv[2]], cwd=root, check=True, timeout=60)
  for name in ('cat.png', 'room.png'):  # The Stable Diffusion edit inputs.
    shutil.copy(root / 'image.png', root / name)
  return root


@pytest.fixture(scope='module')
def workspace(tmp_path_factory) -> pathlib.Path:
  return make_workspace(tmp_path_factory.mktemp('readme'))


@pytest.fixture(scope='module')
def coverage(workspace) -> list[tuple[Command, Coverage]]:
  return [(c, cover(c, workspace)) for c in readme_commands()]


def test_every_code_block_is_tagged():
  untagged = [line for line, info, _ in fenced_blocks(README.read_text())
              if info not in ('bash', 'text', 'python')]
  assert not untagged, f'README lines {untagged}: tag blocks bash, text or python'


def test_every_command_block_is_valid_shell():
  for line, info, body in fenced_blocks(README.read_text()):
    if info == 'bash':
      result = subprocess.run(['bash', '-n'], input=body, capture_output=True, text=True)
      assert result.returncode == 0, f'README line {line}: {result.stderr}'


def test_venv_command_runs(tmp_path):
  command = next(c for c in readme_commands() if c.argv[1:3] == ['-m', 'venv'])
  line = next(body for _, info, body in fenced_blocks(README.read_text())
              if info == 'bash' and 'venv' in body)
  result = subprocess.run(['bash', '-c', line.replace('-m venv', '-m venv --without-pip')
                           + ' && test "$VIRTUAL_ENV" = "$PWD/.venv"'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert command.argv[-1] == '.venv'


def test_every_command_is_run_or_checked(coverage, workspace):
  args = [_with_fixtures(a) for _, c in coverage for a in c.main_args]
  results = check_main_commands(args, workspace)
  failed = [f'{" ".join(a)}\n  -> {r}' for a, r in zip(args, results) if r != 'ok']
  assert not failed, '\n'.join(failed)
  for _, c in coverage:
    for test_id in c.e2e:
      _assert_test_exists(test_id)


def test_links_point_to_sections_and_files():
  text = README.read_text()
  outside = re.sub(r'```.*?```', '', text, flags=re.S)
  anchors = {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
             for h in re.findall(r'^#+ (.*)$', outside, re.M)}
  for target in re.findall(r'\]\(([^)]+)\)', outside):
    if target.startswith('#'):
      assert target[1:] in anchors, target
    elif '://' not in target:
      assert (ROOT / target.split('#')[0]).exists(), target


if __name__ == '__main__':  # The coverage table of the README's commands.
  import tempfile

  sys.path.insert(0, str(ROOT))

  with tempfile.TemporaryDirectory() as tmp:
    space = make_workspace(pathlib.Path(tmp))
    for command in readme_commands():
      c = cover(command, space)
      covered = '; '.join([c.how, *(f'tests/{t}' for t in c.e2e)])
      print(f'- line {command.line}: `{command.text}`\n    {covered}')
