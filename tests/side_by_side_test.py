"""benchmarks/side_by_side.py: the config -> diffusers mapping, the checks, the ratios.

Everything here runs without PyTorch. The end-to-end run against diffusers needs a
virtual environment with torch and diffusers, named by LDM_JAX_TORCH_VENV.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import side_by_side
from ldm_jax import bench, pretrained
from ldm_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_VENV = os.environ.get('LDM_JAX_TORCH_VENV', '')


def _bench_config():
  from configs import bench_unet32

  return bench_unet32.get_config()


def test_bench_unet32_maps_onto_the_same_diffusers_unet():
  unet, num_params = side_by_side.diffusers_unet_config(_bench_config())
  assert num_params == 6_804_868
  assert unet == {
      '_class_name': 'UNet2DModel', 'in_channels': 4, 'out_channels': 4, 'sample_size': 32,
      'block_out_channels': [64, 128, 128], 'layers_per_block': 2,
      'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'],
      'up_block_types': ['AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
      'attention_head_dim': 32, 'add_attention': True, 'norm_num_groups': 32, 'norm_eps': 1e-5,
      'time_embedding_dim': 256, 'flip_sin_to_cos': True, 'freq_shift': 0.0, 'dropout': 0.0,
      'act_fn': 'silu', 'num_class_embeds': None}
  # Read back the way a diffusers folder is: the same module, the same parameter count.
  import jax
  import jax.numpy as jnp

  from ldm_jax import models

  module, in_channels = pretrained.unet_from_config(unet)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)),
                          jnp.zeros((1,)))['params']
  assert in_channels == 4 and models.count_params(params) == 6_804_868


def test_spec_has_the_benchmark_optimizer_and_schedule():
  spec = side_by_side.torch_spec(_bench_config(), batch_size=32, sample_batch_size=16,
                                 num_steps=50, repeats=3, tolerance=1e-4)
  assert spec['schedule'] == dict(num_timesteps=1000, beta_schedule='linear',
                                  beta_start=pytest.approx(1e-4), beta_end=pytest.approx(0.02))
  assert spec['train'] == dict(batch_size=32, learning_rate=1e-4, b1=0.9, b2=0.99, eps=1e-8,
                               weight_decay=0.01, grad_clip_norm=0.0)
  assert spec['sample'] == dict(batch_size=16, num_steps=50, eta=0.0)
  assert spec['latent_shape'] == [32, 32, 4] and spec['params'] == 6_804_868
  config = _bench_config()
  config.diffusion.update(schedule='scaled_linear', beta_start=0.0, beta_end=0.0)
  schedule = side_by_side.torch_spec(config, batch_size=2, sample_batch_size=2, num_steps=2,
                                     repeats=1, tolerance=1e-4)['schedule']
  # diffusers' scaled_linear: linspace(sqrt(start), sqrt(end), T) ** 2.
  from ldm_jax import diffusion

  assert schedule['beta_start'] == pytest.approx(0.00085)
  betas = np.linspace(schedule['beta_start']**0.5, schedule['beta_end']**0.5, 1000)**2
  np.testing.assert_allclose(diffusion.make_schedule('scaled_linear', 1000).betas, betas,
                             rtol=1e-6)


@pytest.mark.parametrize('field, value, message', [
    ('compute_dtype', 'bfloat16', "compute_dtype='bfloat16'"),
    ('prediction_type', 'v', "accepted: 'eps'"),
    ('schedule', 'cosine', 'accepted: linear, scaled_linear'),
    ('ema_decay', 0.999, 'no EMA'),
])
def test_what_pytorch_cannot_mirror_is_refused_in_one_line(field, value, message):
  config = _bench_config()
  config.diffusion[field] = value
  with pytest.raises(UserError, match=message):
    side_by_side.torch_spec(config, batch_size=2, sample_batch_size=2, num_steps=2, repeats=1,
                            tolerance=1e-4)
  config = _bench_config()
  config.diffusion.conditioning.name = 'class'
  with pytest.raises(UserError, match="conditioning.name='class'"):
    side_by_side.diffusers_unet_config(config)


def test_ratios_say_how_much_faster_ldm_jax_is():
  jax_values = {'train_img_per_s': 7.4, 'sample_s_per_img': 1.51, 'train_mib_per_img': 30.0}
  torch_values = {'torch_train_img_per_s': 18.8, 'torch_sample_s_per_img': 0.87,
                  'torch_train_mib_per_img': 60.0}
  r = side_by_side.ratios(jax_values, torch_values)
  assert r == pytest.approx({'train_ratio': 7.4 / 18.8, 'sample_ratio': 0.87 / 1.51,
                             'memory_ratio': 0.5})
  assert side_by_side.ratios({'train_img_per_s': 2.0}, {}) == {}
  text = side_by_side.report(jax_values, torch_values, 50)
  result = bench.parse_result(text)
  assert result['train_ratio'] == pytest.approx(0.3936, abs=1e-4)
  assert result['sample_ratio'] == pytest.approx(0.5762, abs=1e-4)
  assert 'DDIM-50 s/image' in text
  assert side_by_side.medians([{'a': 1.0, 'b': 5.0}, {'a': 3.0}, {'a': 2.0}]) == {'a': 2.0,
                                                                                 'b': 5.0}


def test_commands_carry_the_config_and_its_overrides():
  argv = ['--config=configs/bench_unet32.py', '--venv=/x', '--config.seed', '3',
          '--config.diffusion.dropout=0.1', '--repeats=2']
  args = side_by_side.config_args(argv)
  assert args == ['--config=configs/bench_unet32.py', '--config.seed', '3',
                  '--config.diffusion.dropout=0.1']
  command = side_by_side.jax_command(args, batch_size=8, sample_batch_size=4, num_steps=10,
                                     repeats=2, parts=['train'])
  assert command[1:3] == ['-m', 'ldm_jax.bench']
  assert command[-6:] == ['--config.data.batch_size=8', '--sample_batch_size=4',
                          '--ddim_steps=10', '--repeats=2', '--parts=train', '--num_devices=1']
  assert side_by_side.JAX_ENV == {'JAX_PLATFORMS': 'cpu'}
  created = side_by_side.venv_commands('/tmp/v', 'https://download.pytorch.org/whl/cpu')
  assert created[0][1:] == ['-m', 'venv', '/tmp/v']
  assert created[2][-4:] == ['--index-url', 'https://download.pytorch.org/whl/cpu', 'torch',
                             'torchvision']
  assert 'diffusers' in created[3]


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path):
  venv = tmp_path / 'venv'
  run = subprocess.run(
      [sys.executable, 'benchmarks/side_by_side.py', '--config=configs/bench_unet32.py',
       f'--venv={venv}', '--only=train', '--dry_run'],
      cwd=_REPO, capture_output=True, text=True, check=True)
  lines = run.stdout.splitlines()
  assert lines[0].startswith('side by side: 6,804,868 parameters')
  assert any(line.endswith(f'-m venv {venv}') for line in lines)
  assert any('torch_unet.py' in line and line.endswith('--mode=check') for line in lines)
  assert any(line.startswith('JAX_PLATFORMS=cpu ') and '-m ldm_jax.bench' in line
             and '--parts=train' in line for line in lines)
  assert not any(line.endswith('--mode=sample') for line in lines)
  assert not venv.exists()


@pytest.mark.skipif(not os.path.exists(os.path.join(_TORCH_VENV, 'bin', 'python')),
                    reason='set LDM_JAX_TORCH_VENV to a virtual environment with torch and '
                           'diffusers to run ldm_jax against diffusers')
def test_side_by_side_against_diffusers(tmp_path):
  small = ['--config.diffusion.model.channel_mult=(1,2)',
           '--config.diffusion.model.attention_resolutions=(16,)',
           '--config.diffusion.model.base_channels=32', '--config.diffusion.model.num_heads=2',
           '--config.diffusion.model.norm_num_groups=8']
  run = subprocess.run(
      [sys.executable, 'benchmarks/side_by_side.py', '--config=configs/bench_unet32.py', *small,
       f'--venv={_TORCH_VENV}', f'--workdir={tmp_path}', '--batch_size=2',
       '--sample_batch_size=2', '--steps=2', '--repeats=1'],
      cwd=_REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  # The check: diffusers, given ldm_jax's weights, has its parameter count and output.
  check_line = next(line for line in run.stdout.splitlines() if 'torch_params=' in line)
  check = bench.parse_result(check_line)
  params = int(run.stdout.split(' parameters')[0].split()[-1].replace(',', ''))
  assert check['torch_params'] == params
  assert check['max_abs_diff'] <= 1e-4 * check['output_scale']
  result = bench.parse_result(run.stdout)
  for key in ('train_ratio', 'sample_ratio', 'memory_ratio'):
    assert result[key] > 0
