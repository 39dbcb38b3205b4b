"""The TPU pod and SLURM launch scripts, run against recording stand-ins for gcloud and srun."""
import os
import pathlib
import shlex
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'ldm_jax' / 'launch'


def _recorder(path: pathlib.Path, log: pathlib.Path) -> str:
  """An executable that appends its arguments to `log` (NUL after each, RS after each call)."""
  path.write_text(f"#!/usr/bin/env bash\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done >> {log}\n"
                  f"printf '\\036' >> {log}\n")
  path.chmod(0o755)
  return str(path)


def _calls(log: pathlib.Path) -> list[list[str]]:
  return [call.split('\0')[:-1] for call in log.read_text().split('\036')[:-1]]


def test_tpu_pod_script_copies_installs_and_launches_on_every_worker(tmp_path):
  log = tmp_path / 'gcloud.log'
  gcloud = _recorder(tmp_path / 'gcloud', log)
  result = subprocess.run(
      [str(LAUNCH / 'tpu_pod.sh'), 'my-tpu', 'us-central2-b', 'gs://bucket/runs/a',
       '--config=configs/cifar10.py', '--config.data.data_dir=gs://bucket/tfds dir'],
      env={**os.environ, 'GCLOUD': gcloud}, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  scp, extract, install, launch = _calls(log)
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  for call in (extract, install, launch):
    assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu'] and '--worker=all' in call
  command = lambda call: next(a for a in call if a.startswith('--command='))[len('--command='):]
  assert 'pip install -q -e ".[tpu]"' in command(install)
  assert 'python3.11 -m venv .venv' in command(install)
  launched = shlex.split(command(launch).split('python -m ldm_jax.main', 1)[1].split('>')[0])
  assert launched == ['--workdir=gs://bucket/runs/a', '--config=configs/cifar10.py',
                      '--config.data.data_dir=gs://bucket/tfds dir']

  # The archive the workers unpack holds the tracked files of the repository.
  home = tmp_path / 'worker'
  home.mkdir()
  archive = next(a for a in scp if a.endswith('ldm_jax.tar.gz') and os.path.isfile(a))
  (home / 'ldm_jax.tar.gz').write_bytes(pathlib.Path(archive).read_bytes())
  subprocess.run(['bash', '-c', command(extract)], env={**os.environ, 'HOME': str(home)},
                 check=True)
  for tracked in ('pyproject.toml', 'ldm_jax/main.py', 'configs/cifar10.py'):
    assert (home / 'ldm_jax' / tracked).is_file(), tracked


def test_slurm_script_installs_once_then_runs_one_task_per_node(tmp_path):
  log = tmp_path / 'srun.log'
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _recorder(bin_dir / 'srun', log)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_SUBMIT_DIR': str(ROOT),
         'VENV': str(tmp_path / 'venv')}
  args = ['--config=configs/cifar10.py', '--workdir=/shared/runs/a']
  run = lambda: subprocess.run(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), *args], env=env,
                               capture_output=True, text=True, timeout=60, check=True)
  run()
  install, train = _calls(log)
  assert install[:4] == ['--nodes=1', '--ntasks=1', 'bash', '-c']
  assert "pip' install -q -e '.[cuda12]'" in install[4]
  assert train == [f'{tmp_path}/venv/bin/python', '-m', 'ldm_jax.main', *args]

  # With the environment in place, a later job only trains.
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  _recorder(tmp_path / 'venv' / 'bin' / 'python', tmp_path / 'unused.log')
  log.unlink()
  run()
  assert _calls(log) == [train]
