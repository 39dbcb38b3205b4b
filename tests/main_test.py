"""`python -m ldm_jax.main` as a user runs it: a tiny end-to-end run and bad input."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args: str) -> subprocess.CompletedProcess:
  # One device: these tests are about the command line; sharding is tested in-process.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  return subprocess.run([sys.executable, '-m', 'ldm_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def tiny_args(workdir, data_dir, *extra):
  return (f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *extra)


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), result.stderr
  for fragment in fragments:
    assert fragment in last, last


def test_train_resume_and_sample(tmp_path, digits_data_dir):
  workdir = tmp_path / 'run'
  result = run_main(*tiny_args(workdir, digits_data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reconstruction PSNR' in result.stdout
  for stage in ('autoencoder', 'diffusion'):
    assert sorted(os.listdir(workdir / stage / 'checkpoints')) == ['2', '4'], stage
    assert any(f.startswith('events') for f in os.listdir(workdir / stage / 'tensorboard'))
  samples = np.load(workdir / 'samples' / 'samples_4.npz')
  assert samples['images'].dtype == np.uint8 and samples['images'].shape == (8, 32, 32, 1)
  np.testing.assert_array_equal(samples["labels"], np.arange(8))  # One row per class.
  assert (workdir / 'samples' / 'grid_4.png').stat().st_size > 0

  # The same command with a longer budget resumes stage 2; stage 1 is finished.
  result = run_main(*tiny_args(workdir, digits_data_dir, '--config.diffusion.num_train_steps=6'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'autoencoder: finished (step 4)' in result.stderr
  assert 'diffusion: resumed from step 4' in result.stderr
  assert sorted(os.listdir(workdir / 'diffusion' / 'checkpoints')) == ['4', '6']
  assert (workdir / 'samples' / 'samples_6.npz').exists()

  result = run_main(*tiny_args(workdir, digits_data_dir, '--mode=sample', '--num_samples=3',
                               '--config.sample.method=dpm_solver++',
                               '--config.sample.guidance_scale=2',
                               '--config.diffusion.num_train_steps=6'))
  assert result.returncode == 0, result.stderr[-3000:]
  # Its own files: the training run's samples stay as they were.
  assert np.load(workdir / 'samples' / 'samples_6_sample1.npz')['images'].shape == (3, 32, 32, 1)
  assert np.load(workdir / 'samples' / 'samples_6.npz')['images'].shape == (8, 32, 32, 1)

  # Inpaint the first sample: white in the mask is the region to fill.
  image = np.load(workdir / 'samples' / 'samples_6.npz')['images'][0, ..., 0]
  Image.fromarray(image).save(tmp_path / 'input.png')
  fill = np.zeros((32, 32), np.uint8)
  fill[8:24, 8:24] = 255
  Image.fromarray(fill).save(tmp_path / 'mask.png')
  result = run_main(*tiny_args(workdir, digits_data_dir, '--mode=edit',
                               f'--config.edit.input={tmp_path}/input.png',
                               f'--config.edit.mask={tmp_path}/mask.png',
                               '--config.edit.num_samples=2', '--config.edit.jump_length=2',
                               '--config.edit.jump_n_sample=2'))
  assert result.returncode == 0, result.stderr[-3000:]
  edited = np.load(workdir / 'edits' / 'inpaint_6.npz')['images']
  assert edited.shape == (2, 32, 32, 1)
  np.testing.assert_array_equal(edited[:, fill == 0, 0], np.broadcast_to(image[fill == 0], (2, 768)))


@pytest.mark.parametrize('override, fragments', [
    ('--config.diffusion.schedul=cosine', ["'schedul'", "did you mean 'schedule'"]),
    ('--config.diffusion.schedule=cosin', ['config.diffusion.schedule', 'linear, scaled_linear, cosine']),
    ('--config.sample.method=ddimm', ['config.sample.method', 'ddpm', 'ddim']),
    ('--config.data.name=no_such_dataset', ['no_such_dataset']),
    ('--config.data.batch_size=many', ['config.data.batch_size', 'many']),
])
def test_bad_config_is_one_line(override, fragments, tmp_path, digits_data_dir):
  assert_one_line_error(run_main(*tiny_args(tmp_path / 'run', digits_data_dir, override)),
                        *fragments)


def test_unwritable_workdir_is_one_line(tmp_path, digits_data_dir):
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  assert_one_line_error(run_main(*tiny_args(blocker / 'run', digits_data_dir)),
                        'not writable', str(blocker))
  assert blocker.read_text() == 'keep me'


def test_sample_without_checkpoint_is_one_line_and_deletes_nothing(tmp_path, digits_data_dir):
  workdir = tmp_path / 'run'
  (workdir / 'diffusion').mkdir(parents=True)
  (workdir / 'diffusion' / 'notes.txt').write_text('keep me')
  assert_one_line_error(run_main(*tiny_args(workdir, digits_data_dir, '--mode=sample')),
                        'no diffusion checkpoint', '--mode=train')
  assert (workdir / 'diffusion' / 'notes.txt').read_text() == 'keep me'


def test_missing_config_file_is_one_line(tmp_path):
  result = run_main(f'--config={tmp_path}/nope.py', f'--workdir={tmp_path}')
  assert_one_line_error(result, 'nope.py')


def test_stable_diffusion_prompts_reach_its_modes(tmp_path):
  # --prompt and --negative_prompt travel to the SD sample mode, which checks them first.
  result = run_main(f'--config={ROOT}/configs/stable_diffusion.py', f'--workdir={tmp_path}',
                    f'--config.pretrained={ROOT}/tests/fixtures/sd_tiny/sd1', '--mode=sample',
                    '--prompt=a', '--prompt=b', '--negative_prompt=x', '--negative_prompt=y',
                    '--negative_prompt=z')
  assert_one_line_error(result, '3 --negative_prompt for 2 --prompt')
  assert not os.listdir(tmp_path)
