"""Preemption and resume: SIGTERM saves and exits 0; a resumed run is bit-identical."""
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from ldm_jax import builders, checkpointing, input_pipeline, optim, preemption, sharding, train
from ldm_jax import stages

ROOT = pathlib.Path(__file__).resolve().parents[1]
LONG = 100_000  # Steps the interrupted run is configured for; it never gets there.


def _overrides(num_train_steps: int) -> dict:
  # A constant learning rate: the first k steps then do not depend on the planned length,
  # so a run stopped at k and resumed to k + 2 can be compared with one run of k + 2.
  return {'autoencoder.num_train_steps': num_train_steps,
          'autoencoder.optim.lr_schedule': 'constant',
          'autoencoder.ema_decay': 0.9,
          'train.checkpoint_every': 1_000_000,
          'train.log_every': 1_000_000}


def _apply(config, overrides):
  for key, value in overrides.items():
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  return config


def _final_state(workdir, config, mesh, stage='autoencoder'):
  manager = checkpointing.make_manager(os.path.join(workdir, stage, 'checkpoints'), keep=2,
                                       read_only=True)
  if stage == 'autoencoder':
    abstract = stages.autoencoder_setup(config, mesh)[3]
  else:
    abstract = stages.diffusion_setup(config, mesh)[3]
  return manager.all_steps(), jax.device_get(checkpointing.restore(manager, abstract))


def _assert_states_equal(a, b):
  fields = ['step', 'params', 'ema_params', 'opt_state', 'rng']
  if hasattr(a, 'disc_params'):  # Stage 1 with the PatchGAN objective.
    fields += ['disc_params', 'disc_opt_state', 'logvar', 'logvar_opt_state']
  for field in fields:
    jax.tree.map(np.testing.assert_array_equal, getattr(a, field), getattr(b, field))


@pytest.fixture(scope='module')
def all_devices():
  # The command below runs on the same eight devices (the environment of conftest.py):
  # bit-identity needs the very same programs.
  return sharding.make_mesh()


def test_sigterm_saves_exits_0_and_resume_is_bit_identical(tiny_config, tmp_path, all_devices):
  workdir = tmp_path / 'preempted'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  args = [f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.data_dir={tiny_config.data.data_dir}']
  args += [f'--config.{k}={v}' for k, v in _overrides(LONG).items()]
  process = subprocess.Popen([sys.executable, '-m', 'ldm_jax.main', *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  stderr = []

  def read_stderr():  # The progress bar rewrites one line with '\r': read characters.
    while chunk := process.stderr.read(1):
      stderr.append(chunk)

  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  progress = re.compile(rf'autoencoder:[^\r\n]*\| *([1-9]\d*)/{LONG}')
  deadline = time.monotonic() + 300
  while not progress.search(''.join(stderr[-2000:])):
    assert process.poll() is None and time.monotonic() < deadline, ''.join(stderr)[-3000:]
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  stdout, _ = process.communicate(timeout=120)
  reader.join(timeout=10)
  assert process.returncode == 0, ''.join(stderr)[-3000:]
  saved = re.search(r'autoencoder: preempted; saved a checkpoint at step (\d+)', stdout)
  assert saved, stdout + ''.join(stderr)[-3000:]
  stopped_at = int(saved.group(1))
  assert 1 <= stopped_at < LONG

  # Rerunning resumes from the saved step; two more steps there equal one run of k + 2.
  config = _apply(tiny_config, _overrides(stopped_at + 2))
  assert _final_state(workdir, config, all_devices)[0] == [stopped_at]
  train.train_autoencoder(config, str(workdir), all_devices)
  train.train_autoencoder(config, str(tmp_path / 'uninterrupted'), all_devices)
  steps, resumed = _final_state(workdir, config, all_devices)
  assert steps == [stopped_at, stopped_at + 2]
  steps, uninterrupted = _final_state(tmp_path / 'uninterrupted', config, all_devices)
  assert steps == [stopped_at + 2]
  _assert_states_equal(resumed, uninterrupted)


def test_sigterm_with_discriminator_saves_and_resume_is_bit_identical(tiny_config, tmp_path,
                                                                      all_devices):
  """Stage 1 with the PatchGAN objective, FSDP over 2 devices: SIGTERM after step 1."""
  overrides = {'autoencoder.disc.weight': 0.5, 'autoencoder.disc.start': 0,
               'autoencoder.disc.ndf': 8, 'autoencoder.disc.num_layers': 2,
               'autoencoder.disc.optim.learning_rate': 1e-3, 'autoencoder.learn_logvar': True,
               'train.image_every': 1_000_000}
  config = _apply(tiny_config, {**_overrides(LONG), **overrides})
  mesh = sharding.make_mesh(mesh_shape=dict(data=4, fsdp=2))
  with preemption.handle_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # Seen by the loop after its first step.
    deadline = time.monotonic() + 5
    while not preemption.reached() and time.monotonic() < deadline:
      time.sleep(0.01)
    with pytest.raises(preemption.Preempted):
      train.train_autoencoder(config, str(tmp_path / 'preempted'), mesh)
  config = _apply(config, _overrides(3))
  steps, state = _final_state(tmp_path / 'preempted', config, mesh)
  assert steps == [1] and int(state.step) == 1
  assert np.any(np.asarray(state.disc_params['main_0']['kernel']) != 0)
  train.train_autoencoder(config, str(tmp_path / 'preempted'), mesh)
  train.train_autoencoder(config, str(tmp_path / 'uninterrupted'), mesh)
  steps, resumed = _final_state(tmp_path / 'preempted', config, mesh)
  assert steps == [1, 3]
  _, uninterrupted = _final_state(tmp_path / 'uninterrupted', config, mesh)
  _assert_states_equal(resumed, uninterrupted)
  # The discriminator trained: its Adam moments are not zero.
  assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(resumed.disc_opt_state))


def test_diffusion_resume_is_bit_identical(tiny_config, tmp_path):
  """Stage 2 spends a batch on the scale factor; a resumed run must not shift the data."""
  one_device = sharding.make_mesh(jax.devices()[:1])
  tiny_config.diffusion.optim.lr_schedule = 'constant'
  tiny_config.diffusion.ema_decay = 0.9
  autoencoder = builders.build_autoencoder(tiny_config)
  tx, _ = optim.make_optimizer(tiny_config.autoencoder.optim, 1)
  ae_params = jax.jit(lambda: stages.init_autoencoder_state(
      tiny_config, autoencoder, tx).params)()
  ae_params = sharding.gather(ae_params, one_device)

  def run(workdir, num_train_steps, state_layouts):
    tiny_config.diffusion.num_train_steps = num_train_steps
    tiny_config.train.state_layouts = state_layouts
    train.train_diffusion(tiny_config, str(workdir), one_device, autoencoder, ae_params)

  # The resumed run keeps its state in XLA's layouts: the same bits either way.
  run(tmp_path / 'resumed', 1, 'auto')
  run(tmp_path / 'resumed', 3, 'auto')
  run(tmp_path / 'uninterrupted', 3, 'default')
  steps, resumed = _final_state(tmp_path / 'resumed', tiny_config, one_device, 'diffusion')
  assert steps == [2, 3]  # Resumed from 1 (checkpoint_every=2, the last two kept).
  _, uninterrupted = _final_state(tmp_path / 'uninterrupted', tiny_config, one_device,
                                  'diffusion')
  _assert_states_equal(resumed, uninterrupted)
  assert resumed.scale_factor == uninterrupted.scale_factor


def test_train_stream_from_a_step_continues_the_stream_from_zero(tiny_config):
  """Across an epoch boundary, with flips, for each of two processes."""
  data = tiny_config.data
  data.random_flip = True
  data.shuffle_buffer = 100  # Smaller than an epoch: the buffer is refilled across epochs.
  num_local = 750  # digits train has 1500 examples: 750 per process.
  start = num_local // (data.batch_size // 2) - 1  # Batch `start + 1` straddles the epochs.

  def batches(process_index, start_step, count):
    ds = input_pipeline.create_dataset(data, 'train', train=True, seed=3,
                                       start_step=start_step, process_index=process_index,
                                       process_count=2)
    return list(ds.take(count).as_numpy_iterator())

  for process_index in range(2):
    from_zero = batches(process_index, 0, start + 4)
    resumed = batches(process_index, start, 4)
    for a, b in zip(from_zero[start:], resumed, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    # Two epochs are different orders of the same examples.
    first, second = (np.concatenate([b['label'] for b in from_zero])[i * 90:(i + 1) * 90]
                     for i in range(2))
    assert not np.array_equal(first, second)
  other_seed = input_pipeline.create_dataset(data, 'train', train=True, seed=4,
                                             start_step=start, process_index=1, process_count=2)
  assert not np.array_equal(next(other_seed.as_numpy_iterator())['image'], resumed[0]['image'])


def test_sigterm_handler_sets_the_flag_only_while_active():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.handle_sigterm():
    assert not preemption.reached()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not preemption.reached() and time.monotonic() < deadline:
      time.sleep(0.01)
    assert preemption.reached()
  assert signal.getsignal(signal.SIGTERM) is previous
  assert not preemption.reached()
