"""Two processes on one machine (jax.distributed over 127.0.0.1) train like one process."""
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import checkpointing, input_pipeline, sharding, train
from ldm_jax import stages
from ldm_jax.errors import UserError

# Two processes that must meet within jax.distributed's deadlines: no other test beside them.
pytestmark = pytest.mark.alone

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
OVERRIDES = {
    'autoencoder.num_train_steps': 2, 'diffusion.num_train_steps': 2,
    # FSDP over all four devices: parameter shards live on both processes.
    'mesh_shape.data': 1, 'mesh_shape.fsdp': 4,
    'sample.num_steps': 1, 'sample.num_samples': 4, 'sample.batch_size': 4,
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_process_run(digits_data_dir, tmp_path_factory):
  """Runs `ldm_jax.main` as two processes of two CPU devices each; returns (workdir, outputs)."""
  workdir = tmp_path_factory.mktemp('two_processes') / 'run'
  address = f'127.0.0.1:{_free_port()}'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  args = [f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.data_dir={digits_data_dir}', f'--coordinator_address={address}',
          f'--num_processes={NUM_PROCESSES}']
  args += [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  processes = [subprocess.Popen([sys.executable, '-m', 'ldm_jax.main', *args,
                                 f'--process_id={i}'], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i in range(NUM_PROCESSES)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=500))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, (_, stderr) in zip(processes, outputs):
    # A crash ends with a long module list: show the lines that say what happened.
    errors = [line for line in stderr.splitlines()
              if re.search(r'Error|Fatal|Check failed|^F\d{4}', line)]
    assert process.returncode == 0, '\n'.join(errors)[-3000:] or stderr[-3000:]
  return workdir, outputs


def _as_two_processes(config, mesh, start_step, features=None):
  """The global batches of a two-process run, assembled in one process."""
  streams = [input_pipeline.create_dataset(
      config.data, config.data.train_split, train=True, seed=config.seed,
      start_step=start_step, process_index=i, process_count=NUM_PROCESSES,
      features=features).as_numpy_iterator()
             for i in range(NUM_PROCESSES)]
  for parts in zip(*streams):
    yield sharding.global_batch(
        {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, mesh)


def _restore(workdir, stage, config, mesh):
  manager = checkpointing.make_manager(os.path.join(workdir, stage, 'checkpoints'), keep=2,
                                       read_only=True)
  setup = stages.autoencoder_setup if stage == 'autoencoder' else stages.diffusion_setup
  return manager.all_steps(), checkpointing.restore(manager, setup(config, mesh)[3])


def _assert_close(path, a, b):
  name = jax.tree_util.keystr(path)
  if 'to_k' in name and 'bias' in name:
    # Softmax ignores a bias added to every key, so its gradient is float rounding
    # noise, which Adam's normalisation turns into full-size, order-dependent steps.
    return
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_match_one_and_their_checkpoints_restore_in_one(
    two_process_run, tiny_config, tmp_path, monkeypatch):
  workdir, _ = two_process_run
  for key, value in OVERRIDES.items():
    section, name = key.split('.')
    tiny_config[section][name] = value
  # One process, one device, reading the data as the two processes did.
  mesh = sharding.make_mesh(jax.devices()[:1])
  monkeypatch.setattr(train, '_train_batches', _as_two_processes)
  autoencoder, ae_params = train.train_autoencoder(tiny_config, str(tmp_path), mesh)
  train.train_diffusion(tiny_config, str(tmp_path), mesh, autoencoder, ae_params)

  for stage in ('autoencoder', 'diffusion'):
    steps, written = _restore(workdir, stage, tiny_config, mesh)
    assert steps == [2]
    _, expected = _restore(tmp_path, stage, tiny_config, mesh)
    for field in ('params', 'ema_params', 'opt_state'):
      jax.tree_util.tree_map_with_path(
          _assert_close, jax.device_get(getattr(written, field)),
          jax.device_get(getattr(expected, field)))
  np.testing.assert_allclose(float(written.scale_factor), float(expected.scale_factor),
                             rtol=1e-5)


def test_only_process_0_writes_samples_logs_and_progress(two_process_run):
  workdir, ((stdout_0, stderr_0), (stdout_1, stderr_1)) = two_process_run
  assert 'samples:' in stdout_0 and 'reconstruction PSNR' in stdout_0
  # Only the collectives library's own connection notes, nothing of ours. Its threads write
  # each note in pieces, so notes interleave mid-line: what is left after removing the
  # note's words, numbers and whitespace must be empty.
  gloo_words = r'\[Gloo\]|Rank|is|connected|to|peer|ranks\.?|Expected|number|of|:|\d+|\s+'
  assert not re.sub(gloo_words, '', stdout_1), stdout_1
  assert 'diffusion: 100%' in stderr_0 and 'processes: 2' in stderr_0
  assert 'diffusion:' not in stderr_1 and 'autoencoder:' not in stderr_1
  assert np.load(workdir / 'samples' / 'samples_2.npz')['images'].shape == (4, 32, 32, 1)
  for stage in ('autoencoder', 'diffusion'):
    events = [f for f in os.listdir(workdir / stage / 'tensorboard') if f.startswith('events')]
    # Event files are named events.out.tfevents.<time>.<host>.<pid>...: one writing process.
    assert events and len({f.split('.')[4] for f in events}) == 1, events


@pytest.mark.parametrize('kwargs, fragment', [
    (dict(coordinator_address='127.0.0.1:1234'), '--num_processes, --process_id missing'),
    (dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=2),
     '0 <= process_id < num_processes'),
    (dict(coordinator_address='localhost', num_processes=2, process_id=0), 'host:port'),
])
def test_incomplete_distributed_flags_are_one_line(kwargs, fragment):
  with pytest.raises(UserError, match='accepted') as error:
    sharding.initialize_distributed(**kwargs)
  assert fragment in str(error.value)
