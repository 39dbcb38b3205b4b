"""ldm_jax against PyTorch diffusers on the same U-Net, optimizer, loss and sampler.

    python benchmarks/side_by_side.py --config=configs/bench_unet32.py
    python benchmarks/side_by_side.py --config=configs/bench_unet32.py --venv=/path/to/torch-venv \
        --only=train --repeats=5 --rounds=2
    python benchmarks/side_by_side.py --config=configs/bench_unet32.py --dry_run

1. A virtual environment with torch, torchvision and diffusers is created once
   (`--venv`, default ~/.cache/ldm_jax/torch-venv); one that already imports torch
   and diffusers is used as it is. PyTorch is never a dependency of ldm_jax.
2. The config's U-Net is initialized by ldm_jax and exported as a diffusers
   `UNet2DModel` folder (`ldm_jax.pretrained.save_unet`). diffusers loads it, and
   the run stops unless both have the same parameter count and, on the same inputs,
   the same output to `--tolerance` (relative to the output's scale): the two
   programs compute the same function.
3. Timed in turn, each in a fresh process, both on the CPU: `python -m ldm_jax.bench`
   on one CPU device (its train step and DDIM sampling) and, in the PyTorch environment,
   `benchmarks/torch_unet.py` (the same AdamW update on the same eps-MSE loss and
   noise schedule, then diffusers' DDIMScheduler with the same settings). With
   `--rounds` > 1 the order alternates (ldm_jax first, then PyTorch first, ...)
   and medians are reported. PyTorch uses as many threads as the process may use
   cores.
4. Prints both sides, the ratios (ldm_jax/PyTorch images/s for training,
   PyTorch/ldm_jax seconds per image for sampling: above 1 means ldm_jax is
   faster) and the peak memory per training image of each, measured the same way
   (`ldm_jax/rss.py` on the CPU), and ends with one RESULT line.

Only what both programs can run identically is accepted: an unconditional `unet`
denoiser with eps prediction and uniform loss weighting, a linear or scaled_linear
schedule, float32, no EMA and no gradient accumulation; anything else stops with
one line naming the field.
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # Run as `python benchmarks/side_by_side.py` from anywhere.
  sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.results import parse_result  # noqa: E402

FLAGS = flags.FLAGS

# Both sides run on the CPU: the PyTorch script never moves the model to a GPU.
JAX_ENV = {'JAX_PLATFORMS': 'cpu'}
TORCH_SCRIPT = os.path.join(_REPO, 'benchmarks', 'torch_unet.py')
# ldm_jax schedule name -> diffusers `beta_schedule`, for the schedules both define alike.
BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear'}
# The optimizer's epsilon: optax.adamw's default, also torch.optim.AdamW's.
ADAM_EPS = 1e-8


# --------------------------------------------------------------- the spec ----


def _refuse(field: str, value, accepted: str) -> None:
  raise UserError(f'side by side: config.{field}={value!r} has no identical PyTorch '
                  f'counterpart here; accepted: {accepted}')


def diffusers_unet_config(config) -> tuple[dict, int]:
  """The diffusers `UNet2DModel` config of the config's denoiser, and its parameter count.

  The mapping is `ldm_jax.pretrained.unet_config` (the one the exported folders
  use): block channels, layers per block, attention block placement and head
  width, GroupNorm groups and epsilon, time embedding width, `flip_sin_to_cos`,
  `freq_shift`, SiLU, conv in and out.
  """
  import jax
  import jax.numpy as jnp

  from ldm_jax import builders, models, pretrained

  c = config.diffusion
  if c.init_from:
    _refuse('diffusion.init_from', c.init_from, "'' (a U-Net built from config.diffusion.model)")
  if c.model.name != 'unet':
    _refuse('diffusion.model.name', c.model.name, "'unet'")
  if c.conditioning.name:
    _refuse('diffusion.conditioning.name', c.conditioning.name, "'' (unconditional)")
  latent_shape = builders.latent_shape(config)
  denoiser = builders.build_denoiser(config, 0)
  params = jax.eval_shape(denoiser.init, jax.random.PRNGKey(0), jnp.zeros((1, *latent_shape)),
                          jnp.zeros((1,)))['params']
  unet = pretrained.unet_config(denoiser, params, sample_size=latent_shape[0])
  unet.pop(pretrained.NULL_CLASS_KEY, None)
  return unet, models.count_params(params)


def torch_spec(config, *, batch_size: int, sample_batch_size: int, num_steps: int,
               repeats: int, tolerance: float) -> dict:
  """What the PyTorch side builds and times, from the config (checked to be representable)."""
  c = config.diffusion
  checks = (('compute_dtype', c.compute_dtype, ('float32',), "'float32'"),
            ('prediction_type', c.prediction_type, ('eps',), "'eps'"),
            ('loss_weighting', c.loss_weighting, ('uniform',), "'uniform'"),
            ('schedule', c.schedule, tuple(BETA_SCHEDULES), ', '.join(BETA_SCHEDULES)),
            ('rescale_zero_terminal_snr', c.rescale_zero_terminal_snr, (False,), 'False'),
            ('ema_decay', c.ema_decay, (0, 0.0), '0 (no EMA)'),
            ('grad_accum_steps', c.grad_accum_steps, (1,), '1'))
  for field, value, accepted, text in checks:
    if value not in accepted:
      _refuse(f'diffusion.{field}', value, text)
  unet, num_params = diffusers_unet_config(config)
  from ldm_jax import builders, diffusion

  # Both schedules run from betas[0] to betas[-1] (linearly in beta or in its root).
  betas = diffusion.make_schedule(c.schedule, c.num_timesteps, beta_start=c.beta_start or None,
                                  beta_end=c.beta_end or None).betas
  o = c.optim
  return dict(
      unet=unet, params=num_params, latent_shape=list(builders.latent_shape(config)),
      tolerance=tolerance, repeats=repeats,
      schedule=dict(num_timesteps=c.num_timesteps, beta_schedule=BETA_SCHEDULES[c.schedule],
                    beta_start=float(betas[0]), beta_end=float(betas[-1])),
      train=dict(batch_size=batch_size, learning_rate=o.learning_rate, b1=o.b1, b2=o.b2,
                 eps=ADAM_EPS, weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm),
      sample=dict(batch_size=sample_batch_size, num_steps=num_steps, eta=0.0))


# ---------------------------------------------------------------- results ----


def ratios(jax_values: dict, torch_values: dict) -> dict[str, float]:
  """Speed of ldm_jax relative to PyTorch (> 1: ldm_jax faster) and the memory ratio.

  `train_ratio` is ldm_jax's images/s over PyTorch's, `sample_ratio` PyTorch's
  seconds per image over ldm_jax's; `memory_ratio` is ldm_jax's training memory
  per image over PyTorch's (< 1: ldm_jax needs less).
  """
  out = {}
  if jax_values.get('train_img_per_s') and torch_values.get('torch_train_img_per_s'):
    out['train_ratio'] = jax_values['train_img_per_s'] / torch_values['torch_train_img_per_s']
  if jax_values.get('sample_s_per_img') and torch_values.get('torch_sample_s_per_img'):
    out['sample_ratio'] = torch_values['torch_sample_s_per_img'] / jax_values['sample_s_per_img']
  if jax_values.get('train_mib_per_img') and torch_values.get('torch_train_mib_per_img'):
    out['memory_ratio'] = (jax_values['train_mib_per_img'] /
                           torch_values['torch_train_mib_per_img'])
  return out


def medians(runs: list[dict]) -> dict[str, float]:
  """Per key, the median over the runs that have it."""
  keys = {k for run in runs for k in run}
  return {k: statistics.median(run[k] for run in runs if k in run) for k in sorted(keys)}


def report(jax_values: dict, torch_values: dict, num_steps: int) -> str:
  """The side-by-side table and the final RESULT line."""
  both = {**jax_values, **torch_values, **ratios(jax_values, torch_values)}
  rows = (('train images/s', 'train_img_per_s', 'torch_train_img_per_s', 'train_ratio',
           'ldm_jax / PyTorch'),
          (f'DDIM-{num_steps} s/image', 'sample_s_per_img', 'torch_sample_s_per_img',
           'sample_ratio', 'PyTorch / ldm_jax'),
          ('train MiB/image', 'train_mib_per_img', 'torch_train_mib_per_img', 'memory_ratio',
           'ldm_jax / PyTorch'))
  show = lambda v: '-' if v is None else f'{v:.4g}'
  lines = [f'{"":18s} {"ldm_jax":>10s} {"PyTorch":>10s} {"ratio":>7s}']
  for name, j, t, r, what in rows:
    if j in both or t in both:
      ratio = f'{both[r]:.2f}x' if r in both else '-'
      lines.append(f'{name:18s} {show(both.get(j)):>10s} {show(both.get(t)):>10s} '
                   f'{ratio:>7s}  ({what})')
  keys = ('train_img_per_s', 'torch_train_img_per_s', 'train_ratio', 'sample_s_per_img',
          'torch_sample_s_per_img', 'sample_ratio', 'train_mib_per_img',
          'torch_train_mib_per_img', 'memory_ratio')
  lines.append('RESULT ' + ' '.join(f'{k}={both[k]:.4f}' for k in keys if k in both))
  return '\n'.join(lines)


# --------------------------------------------------------------- commands ----


def venv_python(venv: str) -> str:
  return os.path.join(os.path.expanduser(venv), 'bin', 'python')


def venv_commands(venv: str, index_url: str = '') -> list[list[str]]:
  """The commands that create the PyTorch environment."""
  venv = os.path.expanduser(venv)
  pip = [venv_python(venv), '-m', 'pip', 'install', '--quiet']
  torch = [*pip, *(['--index-url', index_url] if index_url else []), 'torch', 'torchvision']
  return [[sys.executable, '-m', 'venv', venv], [*pip, '--upgrade', 'pip'], torch,
          [*pip, 'diffusers', 'safetensors']]


def venv_ready(venv: str) -> bool:
  python = venv_python(venv)
  if not os.path.exists(python):
    return False
  probe = subprocess.run([python, '-c', 'import torch, diffusers'], capture_output=True,
                         check=False)
  return probe.returncode == 0


def jax_command(config_args: list[str], *, batch_size: int, sample_batch_size: int,
                num_steps: int, repeats: int, parts: list[str]) -> list[str]:
  """`python -m ldm_jax.bench` timing the same things as the PyTorch side (run it with
  `JAX_ENV`: on one CPU device, where the PyTorch side runs)."""
  return [sys.executable, '-m', 'ldm_jax.bench', *config_args,
          f'--config.data.batch_size={batch_size}', f'--sample_batch_size={sample_batch_size}',
          f'--ddim_steps={num_steps}', f'--repeats={repeats}', f'--parts={",".join(parts)}',
          '--num_devices=1']


def torch_command(venv: str, spec_file: str, mode: str) -> list[str]:
  return [venv_python(venv), TORCH_SCRIPT, f'--spec={spec_file}', f'--mode={mode}']


def config_args(argv: list[str]) -> list[str]:
  """The `--config` flag and its `--config.x=y` overrides from this run's arguments."""
  out, take_next = [], False
  for arg in argv:
    if take_next:
      out.append(arg)
      take_next = False
    elif arg == '--config' or (arg.startswith('--config.') and '=' not in arg):
      out.append(arg)
      take_next = True
    elif arg.startswith('--config=') or arg.startswith('--config.'):
      out.append(arg)
  return out


def _show(command: list[str], env: dict[str, str] | None = None) -> str:
  return ' '.join([*(f'{k}={shlex.quote(v)}' for k, v in (env or {}).items()),
                   shlex.join(command)])


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
  """Runs `command` from the repository root (with `env` added to the environment);
  stops with its last line when it fails."""
  print('$ ' + _show(command, env), flush=True)
  run = subprocess.run(command, cwd=_REPO, capture_output=True, text=True, check=False,
                       env={**os.environ, **(env or {})})
  if run.returncode:
    last = (run.stdout + run.stderr).strip().splitlines()
    raise UserError(f'{what} failed (exit {run.returncode}): '
                    f'{last[-1] if last else "no output"}')
  return run.stdout


# ------------------------------------------------------------------- main ----


def _export(config, workdir: str, spec: dict) -> None:
  """Writes the U-Net folder (ldm_jax's initial weights, perturbed) and the check inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ldm_jax import builders, pretrained, stages

  denoiser = builders.build_denoiser(config, 0)
  params = jax.jit(lambda rng: stages.init_denoiser_params(config, denoiser, rng))(
      jax.random.PRNGKey(config.seed))
  # conv_out starts at zero, where every U-Net agrees; a small perturbation of every
  # weight makes the check see the whole network.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])
  pretrained.save_unet(denoiser, params, spec['unet_folder'],
                       sample_size=spec['latent_shape'][0])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *spec['latent_shape'])).astype(np.float32)
  t = np.array([10.0, 500.0], np.float32)
  expected = jax.jit(denoiser.apply)({'params': params}, jnp.asarray(x), jnp.asarray(t))
  np.savez(spec['check_file'], x=x, t=t, expected=np.asarray(expected))


def main(argv: list[str]) -> None:
  del argv
  config = FLAGS.config
  batch_size = FLAGS.batch_size or config.data.batch_size
  num_steps = FLAGS.steps or config.sample.num_steps
  parts = [FLAGS.only] if FLAGS.only else ['train', 'sample']
  if FLAGS.repeats < 1 or FLAGS.rounds < 1:
    raise UserError(f'--repeats={FLAGS.repeats} --rounds={FLAGS.rounds}; accepted: >= 1 each')
  with config.unlocked():
    config.data.batch_size = batch_size
  spec = torch_spec(config, batch_size=batch_size, sample_batch_size=FLAGS.sample_batch_size,
                    num_steps=num_steps, repeats=FLAGS.repeats, tolerance=FLAGS.tolerance)
  workdir = FLAGS.workdir or (os.path.join(tempfile.gettempdir(), 'ldm_jax_side_by_side_XXXX')
                              if FLAGS.dry_run else tempfile.mkdtemp(prefix='ldm_jax_side_by_side_'))
  spec.update(unet_folder=os.path.join(workdir, 'unet'),
              check_file=os.path.join(workdir, 'check.npz'))
  spec_file = os.path.join(workdir, 'spec.json')
  jax_cmd = jax_command(config_args(sys.argv[1:]), batch_size=batch_size,
                        sample_batch_size=FLAGS.sample_batch_size, num_steps=num_steps,
                        repeats=FLAGS.repeats, parts=parts)
  torch_cmds = {mode: torch_command(FLAGS.venv, spec_file, mode)
                for mode in ('check', *parts)}
  print(f'side by side: {spec["params"]:,} parameters, latents {spec["latent_shape"]}, train '
        f'batch {batch_size}, DDIM-{num_steps} of {FLAGS.sample_batch_size}, {FLAGS.repeats} '
        f'timed calls, {FLAGS.rounds} round(s)')
  print('diffusers UNet2DModel: ' + json.dumps(spec['unet'], sort_keys=True))

  if FLAGS.dry_run:
    if venv_ready(FLAGS.venv):
      print(f'# PyTorch environment {FLAGS.venv} is ready')
    else:
      for command in venv_commands(FLAGS.venv, FLAGS.torch_index_url):
        print(shlex.join(command))
    print(f'# export the U-Net folder and the check inputs to {workdir}')
    print(shlex.join(torch_cmds['check']))
    print(_show(jax_cmd, JAX_ENV))
    for part in parts:
      print(shlex.join(torch_cmds[part]))
    return

  if not venv_ready(FLAGS.venv):
    for command in venv_commands(FLAGS.venv, FLAGS.torch_index_url):
      _run(command, 'creating the PyTorch environment')
  os.makedirs(workdir, exist_ok=True)
  _export(config, workdir, spec)
  with open(spec_file, 'w') as f:
    json.dump(spec, f, indent=1)
  check = _run(torch_cmds['check'], 'the diffusers check')
  print(check.strip().splitlines()[-1])

  jax_runs, torch_runs = [], []
  for round_index in range(FLAGS.rounds):
    sides = ['jax', 'torch'] if round_index % 2 == 0 else ['torch', 'jax']
    for side in sides:
      if side == 'jax':
        out = _run(jax_cmd, 'ldm_jax.bench', JAX_ENV)
        jax_runs.append({**parse_result(out), **parse_result(out, 'MEMORY')})
        print(f'ldm_jax: {jax_runs[-1]}', flush=True)
      else:
        values = {}
        for part in parts:
          out = _run(torch_cmds[part], f'PyTorch {part}')
          values.update(parse_result(out))
          values.update(parse_result(out, 'MEMORY'))
        torch_runs.append(values)
        print(f'PyTorch: {values}', flush=True)
  print(report(medians(jax_runs), medians(torch_runs), num_steps))


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, beside no other's)."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_string('venv', os.path.join('~', '.cache', 'ldm_jax', 'torch-venv'),
                      'Virtual environment with torch and diffusers; created when missing.')
  flags.DEFINE_string('torch_index_url', '', 'pip --index-url for torch when the environment '
                      'is created (e.g. https://download.pytorch.org/whl/cpu); empty: PyPI.')
  flags.DEFINE_integer('batch_size', None, 'Train batch (default: config.data.batch_size).')
  flags.DEFINE_integer('sample_batch_size', 16, 'Images per DDIM call.')
  flags.DEFINE_integer('steps', None, 'DDIM steps (default: config.sample.num_steps).')
  flags.DEFINE_integer('repeats', 3, 'Timed calls per measurement, after one warm-up call.')
  flags.DEFINE_integer('rounds', 1, 'Measurements per side, alternating which side goes first.')
  flags.DEFINE_enum('only', '', ['', 'train', 'sample'], 'Time only this part (default: both).')
  flags.DEFINE_float('tolerance', 1e-4, 'Largest output difference of the check, relative to '
                     'max(1, the largest output).')
  flags.DEFINE_string('workdir', '', 'Where the exported U-Net and spec go (default: a temporary '
                      'directory).')
  flags.DEFINE_bool('dry_run', False, 'Print the plan and the commands; build and run nothing.')
  flags.mark_flags_as_required(['config'])


def run() -> None:
  define_flags()

  def _main(argv):
    try:
      main(argv)
    except UserError as e:
      sys.exit(f'error: {e}')
  app.run(_main)


if __name__ == '__main__':
  run()
