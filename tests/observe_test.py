"""Progress bars, the W&B writer beside TensorBoard, profiler traces, the compilation cache."""
import glob
import os
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import observe
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config


class FakeRun:
  def __init__(self, **kwargs):
    self.init_kwargs, self.logged, self.metrics = kwargs, [], []

  def define_metric(self, name, step_metric=None):
    self.metrics.append((name, step_metric))

  def log(self, values):
    self.logged.append(values)


@pytest.fixture
def fake_wandb(monkeypatch):
  module = types.SimpleNamespace(run=None, Image=lambda array: ('image', array.shape))
  module.init = lambda **kwargs: FakeRun(**kwargs)
  monkeypatch.setitem(sys.modules, 'wandb', module)
  return module


def _config(**train):
  from configs import tiny

  config = tiny.get_config()
  config.train.update(train)
  return config


def test_wandb_mirrors_tensorboard_per_stage(fake_wandb, tmp_path):
  workdir = tmp_path / 'run'
  log_dir = str(workdir / 'autoencoder' / 'tensorboard')
  writer = observe.summary_writer(log_dir, _config(report_to='wandb'), str(workdir))
  writer.scalar('train/loss', 0.5, 3)
  writer.image('autoencoder/reconstructions', jnp.zeros((4, 4, 3)), 3)
  writer.flush()
  run = writer._wandb
  assert run.logged == [{'autoencoder/step': 3, 'autoencoder/train/loss': 0.5},
                        {'autoencoder/step': 3,
                         'autoencoder/autoencoder/reconstructions': ('image', (4, 4, 3))}]
  assert ('autoencoder/*', 'autoencoder/step') in run.metrics  # Each stage its own step.
  assert run.init_kwargs['resume'] == 'allow' and run.init_kwargs['name'] == 'run'
  assert run.init_kwargs['config']['train']['report_to'] == 'wandb'
  assert glob.glob(os.path.join(log_dir, 'events.out.tfevents.*'))  # TensorBoard too.
  # The same workdir resumes the same W&B run.
  again = observe.summary_writer(log_dir, _config(report_to='wandb'), str(workdir))._wandb
  assert again.init_kwargs['id'] == run.init_kwargs['id']


def test_wandb_missing_is_one_clear_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError.
  with pytest.raises(UserError, match='needs the wandb package; accepted: pip install wandb'):
    observe.summary_writer(str(tmp_path / 'tb'), _config(report_to='wandb'))
  with pytest.raises(UserError, match='needs the wandb package'):  # Before any work.
    validate_config(_config(report_to='wandb'))
  with pytest.raises(UserError, match="report_to='tensorboard!' is not valid"):
    validate_config(_config(report_to='tensorboard!'))
  assert observe.summary_writer(str(tmp_path / 'tb'), _config()) is not None  # TensorBoard only.


def test_profiler_traces_the_steps_after_the_compiling_one(tmp_path):
  profiler = observe.StepProfiler(2, start_step=10, log_dir=str(tmp_path))
  assert (profiler.first, profiler.last) == (12, 13)
  step = jax.jit(lambda x: x * 2 + 1)
  x = jnp.ones((8,))
  for i in range(11, 16):
    profiler.before(i)
    x = step(x)
    profiler.after(i, x)
    assert profiler._active == (i == 12), i
  profiler.stop()
  traces = glob.glob(str(tmp_path / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert not observe.StepProfiler(0, 0, str(tmp_path)).enabled
  # The trace's op table: each op of the step's program ran once per traced step.
  rows, measured = observe.op_times(str(tmp_path))
  assert measured == 'CPU thunks' and rows
  assert all(seconds > 0 and calls == 2 for _, seconds, calls, _ in rows), rows
  report = observe.op_time_report(str(tmp_path), num_steps=2)
  assert report.startswith('profile: ') and '(2 steps, ' in report and rows[0][0] in report
  assert observe.op_kind('loop_add_fusion.12') == 'loop_add_fusion'
  assert observe.op_kind('cudnn-conv-bw-filter') == 'cudnn-conv-bw-filter'
  with pytest.raises(UserError, match='no profiler trace'):
    observe.op_times(str(tmp_path / 'empty'))


def test_compilation_cache_directory_settings(monkeypatch, tmp_path):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/from/env')
  assert observe.compilation_cache_dir('default', 'gs://b/run') == '/from/env'
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert observe.compilation_cache_dir('default', 'w') == str(tmp_path / 'ldm_jax' / 'jax')
  assert observe.compilation_cache_dir('workdir', 'gs://b/run') == 'gs://b/run/jax_cache'
  assert observe.compilation_cache_dir('', 'w') == ''
  assert observe.compilation_cache_dir('/opt/cache', 'w') == '/opt/cache'


def test_progress_bar_counts_items_with_a_rate(capsys):
  assert list(observe.progress(range(3), desc='sampling', min_total=2)) == [0, 1, 2]
  err = capsys.readouterr().err
  assert 'sampling:' in err and '/3 [' in err and 'batch/s' in err  # Count, ETA, rate.
  assert list(observe.progress(range(1), desc='single')) == [0]
  assert 'single' not in capsys.readouterr().err  # One item: no bar.


def test_sampling_steps_are_counted_once_from_inside_a_sharded_jit():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from ldm_jax import generate

  steps = observe.StepProgress(total=3)
  model_fn = generate._reporting_steps(lambda x, t: x * 0.5 + t[:, None], steps.tick)

  def loop(x, timesteps):  # Two evaluations per step, as with Heun or guidance.
    def body(x, t):
      t = jnp.full((x.shape[0],), t)
      return model_fn(model_fn(x, t), t), None
    return jax.lax.scan(body, x, timesteps)[0]

  mesh = Mesh(jax.devices(), ('data',))
  x = jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, PartitionSpec('data')))
  steps.start()
  jax.block_until_ready(jax.jit(loop)(x, jnp.array([9.0, 5.0, 1.0])))
  assert steps._bar.n == 3  # Not 6 evaluations, nor once per device.
  steps.close()
