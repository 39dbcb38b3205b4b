"""Benchmarks that print numbers.

    python -m ldm_jax.bench --config=configs/bench_unet32.py       # = the `train` benchmark
    python -m ldm_jax.bench sample --config=configs/default.py
    python -m ldm_jax.bench sample --config=configs/default.py --methods=ddim,heun --steps=10,50
    python -m ldm_jax.bench first_stage --config=configs/celebahq256_ldm_vq4.py --batch_size=2

`train` (the default) times, after compilation, the project's jitted diffusion train
step on random latents and DDIM sampling (`sampling.sample`) of the U-Net alone,
against a large float32 matmul timed in the same run, and ends with one line
`RESULT train_img_per_s=... sample_s_per_img=... params=... train_gflops=...
matmul_gflops=...`. Model FLOPs come from XLA's cost analysis of the step lowered for
the CPU, the same count on every device (train: per image of the batch), and of one
U-Net forward pass (sampling: times the number of DDIM steps, one model evaluation each).

`first_stage` times the stage-1 step with LPIPS + PatchGAN against the plain one on
the same model (see `bench_first_stage`).

`sample` times the whole jitted sample-and-decode function of `--mode=sample` for
each method and step count: compile seconds, then images/s over `--repeats` calls.
Throughput does not depend on the parameter values, so freshly initialized models
are used and no checkpoint is needed.
"""
import functools
import os
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ldm_jax import builders, conditioning, first_stage, generate, host_memory, models, optim
from ldm_jax import layouts, observe, perceptual
from ldm_jax import rss, sampling, sharding, stages, train
from ldm_jax.errors import UserError
from ldm_jax.results import parse_result
from ldm_jax.models.autoencoder import LOGVAR_MIN

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_list('methods', list(sampling.SAMPLERS), 'Samplers to time.')
flags.DEFINE_list('steps', ['10', '25', '50'], 'Step counts to time.')
flags.DEFINE_integer('batch_size', None, 'Images per call (default: config.sample.batch_size).')
flags.DEFINE_integer('repeats', 3, 'Timed calls after compilation.')
flags.DEFINE_integer('num_classes', 10, 'Label count when the config is class-conditional.')
flags.DEFINE_integer('sample_batch_size', 16, 'train benchmark: images per DDIM call.')
flags.DEFINE_integer('ddim_steps', 50, 'train benchmark: DDIM steps timed.')
flags.DEFINE_integer('matmul_size', 2048, 'train benchmark: side of the float32 matmul.')
flags.DEFINE_float('peak_tflops', 0.0, 'train benchmark: the device\'s peak TFLOP/s for the '
                   'model FLOPs utilization (MFU); 0 looks the device up in PEAK_BF16_TFLOPS.')
flags.DEFINE_list('parts', ['train', 'sample'], 'train benchmark: what to time, of train, sample.')
flags.DEFINE_integer('num_devices', 0, 'train benchmark: run on the first N devices (0: all).')
flags.DEFINE_bool('fsdp', False, 'train benchmark: shard the state over the devices (FSDP mesh) '
                  'instead of replicating it (data-parallel mesh).')
flags.DEFINE_list('devices', [], 'train benchmark: time the train step on each of these device '
                  'counts (e.g. 1,2,4,8), data-parallel and FSDP, one process each (on the CPU '
                  'with that many host devices), with the per-device batch of the config, and '
                  'print the scaling efficiency.')
flags.DEFINE_string('profile_dir', '', 'train benchmark: after timing, trace --profile_steps train '
                    'steps into this directory with the JAX profiler and print the ops that '
                    'take the most time (device kernels on GPUs and TPUs).')
flags.DEFINE_integer('profile_steps', 3, 'train benchmark: steps traced with --profile_dir.')
flags.mark_flags_as_required(['config'])


def _denoiser(config, num_classes: int):
  """The configured denoiser with `num_classes` labels when class-conditional (no dataset read)."""
  return builders.build_denoiser(
      config, num_classes if conditioning.spec(config).denoiser_labels else 0)


def _init_params(config, autoencoder, denoiser):
  rng_ae, rng_denoiser = jax.random.split(jax.random.PRNGKey(config.seed))
  size, channels = config.data.image_size, config.data.num_channels
  ae_params = jax.jit(autoencoder.init)(rng_ae, jnp.zeros((1, size, size, channels)))['params']
  params = jax.jit(functools.partial(stages.init_denoiser_params, config, denoiser))(rng_denoiser)
  return ae_params, params


def _conditions(config, batch_size: int):
  """Zero conditioning features of a conditioner module (their values do not change timing)."""
  return conditioning.example_batch(config, batch_size) if conditioning.has_module(config) else None


def bench_sample(config, methods: list[str], steps: list[int], batch_size: int,
                 repeats: int, num_classes: int) -> list[dict]:
  """Compile seconds and images/s of sample-and-decode per (method, steps)."""
  mesh = sharding.make_mesh()
  autoencoder = builders.build_autoencoder(config)
  denoiser = _denoiser(config, num_classes)
  ae_params, params = _init_params(config, autoencoder, denoiser)
  schedule = builders.make_schedule(config)
  labels, conditions = jax.device_put(
      (jnp.arange(batch_size, dtype=jnp.int32) % max(denoiser.num_classes, 1),
       _conditions(config, batch_size)), sharding.data_sharding(mesh))
  rows = []
  for method in methods:
    for num_steps in steps:
      sample_config = config.sample.copy_and_resolve_references()
      sample_config.unlock().update(method=method, num_steps=num_steps)
      fn = jax.jit(functools.partial(
          generate.generate_images, denoiser=denoiser, autoencoder=autoencoder,
          sample_config=sample_config, prediction_type=config.diffusion.prediction_type,
          latent_shape=builders.latent_shape(config)))
      args = (params, ae_params, jnp.float32(1.0), labels, jax.random.PRNGKey(0), schedule,
              conditions)
      start = time.perf_counter()
      compiled = fn.lower(*args).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(compiled(*args))  # Warm-up call, not timed.
      start = time.perf_counter()
      for _ in range(repeats):
        out = compiled(*args)
      jax.block_until_ready(out)
      seconds = (time.perf_counter() - start) / repeats
      row = dict(method=method, steps=num_steps, batch=batch_size, compile_s=compile_s,
                 images_per_s=batch_size / seconds, s_per_batch=seconds)
      print(f"{method:>13s} steps={num_steps:<4d} batch={batch_size:<4d} "
            f"compile={compile_s:6.2f}s  {row['images_per_s']:8.2f} images/s  "
            f"({seconds:.3f} s/batch)", flush=True)
      rows.append(row)
  return rows


def _timed(fn, *args) -> tuple[Any, float]:
  """`fn(*args)` and the wall seconds it took."""
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def _compile(fn, *args) -> tuple[jax.stages.Compiled, float]:
  """The `jax.jit` function `fn` compiled for `args`, and the seconds it took."""
  return _timed(lambda *a: fn.lower(*a).compile(), *args)


def model_flops(fn, *args) -> float:
  """FLOPs of one call of `fn(*args)`, from XLA's cost analysis of its HLO lowered for the CPU.

  Counted before compilation and on the CPU on every machine, so that the count does not
  depend on the device: a GPU compiler turns convolutions into library calls that the
  compiled program's cost analysis counts as zero (34.6 of 583.6 GFLOP per image for the
  LDM-4 CelebA-HQ train step on an H100), and GPU backends give no analysis of the
  lowered program. Only shapes and dtypes of `args` (arrays or `jax.ShapeDtypeStruct`s)
  are used.
  """
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX was started without its CPU backend (JAX_PLATFORMS=cuda).
    cpu = None  # The default device's count, then.
  with jax.default_device(cpu):
    analysis = jax.jit(fn).lower(*shapes).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def train_flops_per_image(config, num_classes: int) -> float:
  """Model FLOPs of the configured diffusion train step, per image of `data.batch_size`.

  The count of `bench_train` (forward, backward and optimizer update, as `model_flops`
  counts them), from shapes alone: nothing is initialized or run, so it takes seconds
  on any machine and compares backbones of equal training cost.

  Args:
    config: an experiment config; its denoiser, latent shape, conditioner, optimizer,
      `data.batch_size` and `diffusion.compute_dtype` are what is counted.
    num_classes: label count when the config is class-conditional (as `bench_train`).
  """
  denoiser = _denoiser(config, num_classes)
  tx, lr_schedule = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  state = jax.eval_shape(functools.partial(stages.init_diffusion_state, config, denoiser, tx), 1.0)
  batch_size = config.data.batch_size
  latents = jax.ShapeDtypeStruct((batch_size, *builders.latent_shape(config)), jnp.float32)
  batch = {'latent_mean': latents, 'latent_logvar': latents,
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           **jax.eval_shape(lambda: conditioning.example_batch(config, batch_size))}
  train_step = functools.partial(train.diffusion_train_step, denoiser=denoiser, config=config,
                                 lr_schedule=lr_schedule)
  return model_flops(train_step, state, batch, builders.make_schedule(config)) / batch_size


def _seconds_per_call(call, repeats: int) -> float:
  """Mean wall seconds of `call()` over `repeats` calls after one untimed warm-up call."""
  jax.block_until_ready(call())
  start = time.perf_counter()
  for _ in range(repeats):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def matmul_gflops(size: int, repeats: int) -> float:
  """Achieved GFLOP/s of a [size, size] float32 matmul: the machine's practical ceiling."""
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (size, size), jnp.float32) for i in (0, 1))
  matmul = jax.jit(jnp.matmul)
  return 2 * size**3 / _seconds_per_call(lambda: matmul(a, b), max(repeats, 10)) / 1e9


def peak_memory() -> tuple[float, str]:
  """Peak memory in MiB and what was measured: device allocator, else process max RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20, 'device peak_bytes_in_use'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'process max RSS'


class MemoryWindow:
  """Peak memory of a stretch of the run, in MiB, above what was in use at its start.

  On devices with allocator statistics (GPU, TPU): the first device's
  `peak_bytes_in_use` at the end minus its `bytes_in_use` at the start. That peak
  cannot be reset, so when earlier work in the process peaked higher and the window
  never passes it, the figure is only an upper bound, and `method` says so. On the
  CPU: the process's peak RSS above its RSS at the start (`rss.PeakWindow`), the
  method the PyTorch side of `benchmarks/side_by_side.py` uses.
  """

  def __init__(self):
    self._device = jax.local_devices()[0]
    stats = self._device.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      self._start, self._earlier_peak = stats['bytes_in_use'], stats['peak_bytes_in_use']
      self._rss = None
      self.method = 'device peak_bytes_in_use above the start'
    else:
      self._rss = rss.PeakWindow()
      self.method = self._rss.method

  def peak_mib(self) -> float:
    if self._rss is not None:
      return self._rss.peak_mib()
    peak = (self._device.memory_stats() or {}).get('peak_bytes_in_use', 0)
    if self._earlier_peak > self._start and peak <= self._earlier_peak:
      self.method = ('an upper bound: device peak_bytes_in_use, which earlier work in this '
                     'process reached, above the start')
    return max(peak - self._start, 0) / 2**20


# Dense bfloat16 peak TFLOP/s of one chip by `device_kind` (lower case): the first
# entry whose key is part of the kind applies, so specific names come first.
PEAK_BF16_TFLOPS = (
    ('h100 pcie', 756.0),
    ('h100', 989.0),   # SXM.
    ('h200', 989.0),
    ('a100', 312.0),
    ('tpu v4', 275.0),
    ('tpu v5 lite', 197.0),  # v5e.
    ('tpu v5e', 197.0),
    ('tpu v5p', 459.0),
    ('tpu v5', 459.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
  """The dense bfloat16 peak of a device kind (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
  kind = device_kind.lower()
  return next((peak for key, peak in PEAK_BF16_TFLOPS if key in kind), None)


def bench_train(config, *, num_classes: int = 10, sample_batch_size: int = 16,
                ddim_steps: int = 50, repeats: int = 3, matmul_size: int = 2048,
                peak_tflops: float = 0.0, parts: tuple[str, ...] = ('train', 'sample'),
                devices: list[jax.Device] | None = None, fsdp: bool = False,
                profile_dir: str = '', profile_steps: int = 3) -> dict:
  """Times the diffusion train step and DDIM sampling; prints a report and a RESULT line.

  Args:
    config: an experiment config; its denoiser, latent shape, schedule, optimizer,
      `data.batch_size` and `diffusion.compute_dtype` are what is timed.
    num_classes: label count when the config is class-conditional.
    sample_batch_size: images per sampling call.
    ddim_steps: DDIM steps per sampling call.
    repeats: timed calls after compilation and one warm-up call.
    matmul_size: side of the reference float32 matmul.
    peak_tflops: the device's peak for the model FLOPs utilization (MFU); 0 looks the
      device kind up in `PEAK_BF16_TFLOPS` (the MFU is left out for unknown kinds).
    parts: what to time, of 'train' and 'sample'.
    devices: the devices of the mesh (default: all).
    fsdp: the state sharded over the devices (a (1, n) `data`, `fsdp` mesh) instead
      of replicated on each (a data-parallel (n, 1) mesh); the batch is split over
      the devices either way.
    profile_dir: where to trace `profile_steps` train steps after timing them; the
      report then lists the ops that take the most time (`observe.op_time_report`).
    profile_steps: steps traced into `profile_dir`.

  Returns:
    The RESULT fields and the other printed numbers. The RESULT line has
    `train_img_per_s` and `train_gflops` only when 'train' is timed and
    `sample_s_per_img` only when 'sample' is.
  """
  unknown = sorted(set(parts) - {'train', 'sample'})
  if unknown or not parts:
    raise ValueError(f'unknown parts {unknown}; accepted: train, sample')
  matmul = matmul_gflops(matmul_size, repeats)
  print(f'matmul {matmul_size}x{matmul_size} float32: {matmul:.1f} GFLOP/s', flush=True)

  mesh = sharding.make_mesh(devices, (1, -1) if fsdp else (-1, 1))
  device_kind = mesh.devices.flat[0].device_kind
  if peak_tflops <= 0:
    peak_tflops = peak_bf16_tflops(device_kind) or 0.0
    if not peak_tflops:
      print(f'MFU: left out, no peak rate known for {device_kind!r} (--peak_tflops=N sets one)')

  def report(name, what, compile_s, seconds, images, flops_per_image):
    gflops = flops_per_image * images / seconds / 1e9
    # Per device: the model FLOPs are those of the whole batch.
    mfu = (f', MFU {gflops / (peak_tflops * 1e3 * mesh.size):.1%}' if peak_tflops > 0
           else '')
    print(f'{name:>6s} ({what}): compile {compile_s:.1f} s, {seconds:.3f} s/call, '
          f'{images / seconds:.2f} images/s, {flops_per_image / 1e9:.2f} GFLOP/image, '
          f'{gflops:.1f} GFLOP/s = {gflops / matmul:.0%} of matmul{mfu}', flush=True)
    return gflops

  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  denoiser = _denoiser(config, num_classes)
  num_classes = denoiser.num_classes
  schedule = builders.make_schedule(config)
  latent_shape = builders.latent_shape(config)
  tx, lr_schedule = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  init_fn = functools.partial(stages.init_diffusion_state, config, denoiser, tx)
  abstract_state = jax.eval_shape(init_fn, 1.0)
  state_sharding = sharding.state_sharding(abstract_state, mesh)
  init, _ = _compile(jax.jit(init_fn, out_shardings=state_sharding), 1.0)
  num_params = models.count_params(abstract_state.params)
  print(f'params: {num_params:,}; dtype {config.diffusion.compute_dtype}; state layouts '
        f'{layouts.state_layouts(config)}; mesh '
        f'{dict(mesh.shape)} ({"FSDP" if fsdp else "data-parallel"})')
  rng_mean, rng_sample = jax.random.split(jax.random.PRNGKey(config.seed))
  result, extra = {}, {}

  state = None
  if 'train' in parts:
    batch_size = config.data.batch_size
    sharding.check_batch_size(batch_size, mesh)
    mean = jax.random.normal(rng_mean, (batch_size, *latent_shape))
    batch = jax.device_put({'latent_mean': mean,
                            'latent_logvar': jnp.full_like(mean, LOGVAR_MIN),
                            'label': jnp.arange(batch_size, dtype=jnp.int32) % max(num_classes, 1),
                            **conditioning.example_batch(config, batch_size)}, data)
    train_step = functools.partial(train.diffusion_train_step, denoiser=denoiser, config=config,
                                   lr_schedule=lr_schedule)
    train_flops = train_flops_per_image(config, num_classes)
    step = layouts.StateStep(train_step, state_sharding, (data, replicated), replicated,
                             layouts.state_layouts(config))
    # Compiled from shapes, so that the memory window below holds the state, the
    # activations and the update, and no compiler work.
    _, train_compile_s = _timed(step.compile, abstract_state, batch, schedule)
    memory = MemoryWindow()
    state = init(1.0)  # With 'auto', moved into the step's layouts by its warm-up call.

    def train_call():
      nonlocal state
      state, metrics = step(state, batch, schedule)
      return metrics
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_s = _seconds_per_call(train_call, repeats)
    # Averaged over the warm-up and timed calls, so the first call's one-off pages count.
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (repeats + 1)
    train_memory_mib = memory.peak_mib()
    train_gflops = report('train', f'batch {batch_size}', train_compile_s, train_s, batch_size,
                          train_flops)
    print(f'MEMORY train_peak_mib={train_memory_mib:.1f} '
          f'train_mib_per_img={train_memory_mib / batch_size:.2f} '
          f'train_page_faults_per_step={faults:.0f} ({memory.method}; state, '
          f'activations and update of batch {batch_size})', flush=True)
    result.update(train_img_per_s=batch_size / train_s)
    if profile_dir:
      with jax.profiler.trace(profile_dir):
        jax.block_until_ready([train_call() for _ in range(profile_steps)])
      print(observe.op_time_report(profile_dir, profile_steps), flush=True)
    extra.update(train_flops_per_image=train_flops, train_peak_mib=train_memory_mib,
                 train_mib_per_img=train_memory_mib / batch_size, train_page_faults=faults)

  if 'sample' in parts:
    params = (state if state is not None else init(1.0)).params
    labels, conditions = jax.device_put(
        (jnp.arange(sample_batch_size, dtype=jnp.int32) % max(num_classes, 1),
         _conditions(config, sample_batch_size)), data)
    sample_shape = (sample_batch_size, *latent_shape)

    def model(p, y, conditions):
      """The denoiser as `sampling.sample` calls it, conditions encoded once."""
      return generate.model_and_conditions(denoiser, p, y if num_classes else None, conditions)

    def forward(p, x, t, y, conditions):
      model_fn, cond, _ = model(p, y, conditions)
      return model_fn(x, t) if cond is None else model_fn(x, t, cond)

    forward_flops = model_flops(forward, params, jax.ShapeDtypeStruct(sample_shape, jnp.float32),
                                jax.ShapeDtypeStruct((sample_batch_size,), jnp.float32), labels,
                                conditions)

    def sample_fn(p, y, conditions, rng):
      model_fn, cond, _ = model(p, y, conditions)
      return sampling.sample(model_fn, schedule, sample_shape, rng, method='ddim',
                             num_steps=ddim_steps, eta=0.0,
                             prediction_type=config.diffusion.prediction_type, cond=cond)

    sample_fn, sample_compile_s = _compile(jax.jit(sample_fn), params, labels, conditions,
                                           rng_sample)
    sample_s = _seconds_per_call(lambda: sample_fn(params, labels, conditions, rng_sample),
                                 repeats)
    sample_flops = forward_flops * ddim_steps / sample_batch_size
    sample_gflops = report('sample', f'DDIM-{ddim_steps}, batch {sample_batch_size}',
                           sample_compile_s, sample_s, sample_batch_size, sample_flops)
    result.update(sample_s_per_img=sample_s / sample_batch_size)
    extra.update(sample_gflops=sample_gflops, sample_flops_per_image=sample_flops)

  memory_mib, memory_kind = peak_memory()
  print(f'peak memory: {memory_mib:,.0f} MiB ({memory_kind})')
  result['params'] = num_params
  if 'train' in parts:
    result['train_gflops'] = train_gflops
  result['matmul_gflops'] = matmul
  print('RESULT ' + ' '.join(f'{k}={v}' if isinstance(v, int) else f'{k}={v:.4f}'
                             for k, v in result.items()), flush=True)
  return {**result, **extra, 'peak_memory_mib': memory_mib}


def scaling_rows(measured: dict[tuple[int, str], float]) -> list[dict]:
  """Scaling efficiency of images/s per (device count, 'data' | 'fsdp').

  The efficiency of n devices is their images/s over n times the images/s of one
  device (the per-device batch is the same at every count): 1.0 is linear scaling.
  """
  counts = sorted({n for n, _ in measured})
  base = measured.get((1, 'data'), measured.get((1, 'fsdp')))
  rows = []
  for n in counts:
    for mesh in ('data', 'fsdp'):
      if (n, mesh) not in measured:
        continue
      img_per_s = measured[(n, mesh)]
      efficiency = img_per_s / (n * base) if base else float('nan')
      rows.append(dict(devices=n, mesh=mesh, img_per_s=img_per_s, efficiency=efficiency))
  return rows


def _child_argv(argv: list[str]) -> list[str]:
  """This run's flags without those each child sets itself or must not repeat."""
  dropped = ('--devices', '--parts', '--num_devices', '--fsdp', '--nofsdp', '--profile_dir')
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg.split('=', 1)[0]
    if name in dropped:
      skip = '=' not in arg and name not in ('--fsdp', '--nofsdp')
      continue
    out.append(arg)
  return out


def child_command(argv: list[str], num_devices: int, fsdp: bool, batch_size: int,
                  platform: str) -> tuple[list[str], dict[str, str]]:
  """The command and environment that time the train step on `num_devices` devices.

  On the CPU the child has that many host devices (`--xla_force_host_platform_device_count`
  appended to XLA_FLAGS); on accelerators it uses the first `num_devices` of them.
  """
  command = [sys.executable, '-m', 'ldm_jax.bench', *_child_argv(argv), '--parts=train',
             f'--config.data.batch_size={batch_size}', f'--num_devices={num_devices}',
             '--fsdp' if fsdp else '--nofsdp']
  env = dict(os.environ)
  if platform == 'cpu':
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={num_devices}').strip()
    env['JAX_PLATFORMS'] = 'cpu'
  return command, env


def bench_scaling(config, device_counts: list[int], argv: list[str]) -> list[dict]:
  """Images/s of the train step on each device count, data-parallel and FSDP.

  Each measurement is a fresh `python -m ldm_jax.bench --parts=train` process (on
  the CPU with that many host devices, which share the machine's cores), with the
  config's `data.batch_size` per device.
  """
  platform = jax.default_backend()
  per_device = config.data.batch_size
  available = jax.device_count()
  measured, memory = {}, {}
  for n in device_counts:
    if platform != 'cpu' and n > available:
      print(f'scaling: {n} devices left out, the machine has {available}')
      continue
    for mesh in ('data', 'fsdp'):
      if n == 1 and mesh == 'fsdp':
        continue  # One device: the same program.
      command, env = child_command(argv, n, mesh == 'fsdp', per_device * n, platform)
      run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
      values = parse_result(run.stdout)
      if run.returncode or 'train_img_per_s' not in values:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ['no output']
        print(f'scaling: {n} devices ({mesh}) failed: {tail[0]}')
        continue
      measured[(n, mesh)] = values['train_img_per_s']
      memory[(n, mesh)] = parse_result(run.stdout, 'MEMORY').get('train_mib_per_img')
      print(f'scaling: {n} devices ({mesh}): {values["train_img_per_s"]:.2f} images/s',
            flush=True)
  rows = scaling_rows(measured)
  print(f'scaling on {platform}, {per_device} images per device per step:')
  print(f'{"devices":>7s} {"mesh":>5s} {"images/s":>9s} {"efficiency":>10s} {"MiB/image":>9s}')
  for row in rows:
    mib = memory.get((row['devices'], row['mesh']))
    row['mib_per_img'] = mib
    print(f'{row["devices"]:>7d} {row["mesh"]:>5s} {row["img_per_s"]:>9.2f} '
          f'{row["efficiency"]:>10.0%} {"" if mib is None else f"{mib:.1f}":>9s}')
  return rows


def _train_benchmark(config):
  if FLAGS.devices:
    return bench_scaling(config, [int(n) for n in FLAGS.devices], sys.argv[1:])
  devices = jax.devices()[:FLAGS.num_devices] if FLAGS.num_devices else None
  return bench_train(
      config, num_classes=FLAGS.num_classes, sample_batch_size=FLAGS.sample_batch_size,
      ddim_steps=FLAGS.ddim_steps, repeats=FLAGS.repeats, matmul_size=FLAGS.matmul_size,
      peak_tflops=FLAGS.peak_tflops, parts=tuple(FLAGS.parts), devices=devices, fsdp=FLAGS.fsdp,
      profile_dir=FLAGS.profile_dir, profile_steps=FLAGS.profile_steps)


BENCHMARKS = {
    'first_stage': lambda config: bench_first_stage(config, batch_size=FLAGS.batch_size,
                                                    repeats=FLAGS.repeats),
    'train': _train_benchmark,
    'sample': lambda config: bench_sample(
        config, FLAGS.methods, [int(s) for s in FLAGS.steps],
        FLAGS.batch_size or config.sample.batch_size, FLAGS.repeats, FLAGS.num_classes),
}


def bench_first_stage(config, *, batch_size: int | None = None, repeats: int = 3) -> dict:
  """Stage-1 step cost: the plain L1 (+ KL) step against LPIPS + PatchGAN on the same model.

  Both steps are the project's own (`train.autoencoder_train_step`,
  `first_stage.train_step`, the adversarial branch on), on random images; LPIPS uses
  randomly initialized VGG16 weights (the cost does not depend on their values). For a
  VQ model the baseline is the VQ objective without LPIPS and discriminator. Prints
  seconds per step, XLA FLOPs per step (counted on the CPU lowering) and the ratios.
  """
  c = config.autoencoder
  batch_size = batch_size or config.data.batch_size
  size, channels = config.data.image_size, config.data.num_channels
  model = builders.build_autoencoder(config)
  tx, schedule = optim.make_optimizer(c.optim, c.num_train_steps)
  images = jax.random.uniform(jax.random.PRNGKey(0), (batch_size, size, size, channels),
                              minval=-1.0, maxval=1.0)
  batch = {'image': images}
  lpips_params = perceptual.LPIPS().init(jax.random.PRNGKey(1), images[:1],
                                         images[:1])['params']
  rows, calls = {}, {}
  for name, gan in (('plain', False), ('lpips_gan', True)):
    with config.unlocked():
      c.perceptual_weight = 1.0 if gan else 0.0
      c.disc.update(weight=0.5 if gan else 0.0, start=0)
      c.lpips_vgg_weights = c.lpips_lin_weights = 'unused' if gan else ''
    state = jax.jit(lambda: stages.init_autoencoder_state(config, model, tx))()
    if first_stage.uses_objective(config):
      step = jax.jit(first_stage.make_train_step(config, model, schedule))
      args = (state, batch, lpips_params if gan else None)
    else:
      step = jax.jit(functools.partial(train.autoencoder_train_step, model=model, config=config,
                                       lr_schedule=schedule))
      args = (state, batch)
    compiled, compile_s = _compile(step, *args)
    calls[name] = functools.partial(compiled, *args)
    jax.block_until_ready(calls[name]())  # Warm-up.
    rows[name] = dict(compile_s=compile_s, gflops=model_flops(step, *args) / 1e9)
  # The two steps take turns, so that a change in the machine's speed during the
  # measurement touches both; each reports its median.
  seconds = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      seconds[name].append(time.perf_counter() - start)
  for name, row in rows.items():
    row['step_s'] = float(np.median(seconds[name]))
    print(f'first_stage {name:>9}: batch {batch_size}  compile {row["compile_s"]:6.1f} s  '
          f'step {row["step_s"] * 1e3:9.1f} ms (median of {repeats}, alternating)  '
          f'{row["gflops"]:9.1f} GFLOP')
  ratio = rows['lpips_gan']['step_s'] / rows['plain']['step_s']
  flop_ratio = rows['lpips_gan']['gflops'] / max(rows['plain']['gflops'], 1e-9)
  print(f'RESULT first_stage_time_ratio={ratio:.2f} first_stage_flop_ratio={flop_ratio:.2f}')
  return dict(rows, time_ratio=ratio, flop_ratio=flop_ratio)


def benchmark_of(argv: list[str]) -> str:
  """The benchmark the parsed command line names (default train); `app.UsageError` if none."""
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in BENCHMARKS):
    raise app.UsageError(f'usage: python -m ldm_jax.bench [{"|".join(BENCHMARKS)}] '
                         f'--config=FILE (default: train)')
  unknown = sorted(set(FLAGS.methods) - set(sampling.SAMPLERS))
  if unknown:
    raise app.UsageError(f'unknown --methods {unknown}; accepted: {", ".join(sampling.SAMPLERS)}')
  unknown = sorted(set(FLAGS.parts) - {'train', 'sample'})
  if unknown or not FLAGS.parts:
    raise app.UsageError(f'unknown --parts {unknown}; accepted: train, sample (one or both)')
  return argv[1] if len(argv) == 2 else 'train'


def main(argv: list[str]) -> None:
  print(f'host memory: {host_memory.describe()}', flush=True)
  name = benchmark_of(argv)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}')
  try:
    BENCHMARKS[name](FLAGS.config)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
