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
import resource
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from ldm_jax import builders, conditioning, first_stage, generate, models, optim, perceptual
from ldm_jax import sampling, sharding, stages, train
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
flags.DEFINE_float('peak_tflops', 0.0, 'train benchmark: the device\'s peak TFLOP/s; > 0 '
                   'also prints the model FLOPs utilization (MFU).')
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


def _compile(fn, *args) -> tuple[jax.stages.Compiled, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


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


def bench_train(config, *, num_classes: int = 10, sample_batch_size: int = 16,
                ddim_steps: int = 50, repeats: int = 3, matmul_size: int = 2048,
                peak_tflops: float = 0.0) -> dict:
  """Times the diffusion train step and DDIM sampling; prints a report and a RESULT line.

  Args:
    config: an experiment config; its denoiser, latent shape, schedule, optimizer,
      `data.batch_size` and `diffusion.compute_dtype` are what is timed.
    num_classes: label count when the config is class-conditional.
    sample_batch_size: images per sampling call.
    ddim_steps: DDIM steps per sampling call.
    repeats: timed calls after compilation and one warm-up call.
    matmul_size: side of the reference float32 matmul.
    peak_tflops: > 0 adds the model FLOPs utilization against this peak.

  Returns:
    The RESULT fields and the other printed numbers.
  """
  matmul = matmul_gflops(matmul_size, repeats)
  print(f'matmul {matmul_size}x{matmul_size} float32: {matmul:.1f} GFLOP/s', flush=True)

  def report(name, what, compile_s, seconds, images, flops_per_image):
    gflops = flops_per_image * images / seconds / 1e9
    mfu = f', MFU {gflops / (peak_tflops * 1e3):.1%}' if peak_tflops > 0 else ''
    print(f'{name:>6s} ({what}): compile {compile_s:.1f} s, {seconds:.3f} s/call, '
          f'{images / seconds:.2f} images/s, {flops_per_image / 1e9:.2f} GFLOP/image, '
          f'{gflops:.1f} GFLOP/s = {gflops / matmul:.0%} of matmul{mfu}', flush=True)
    return gflops

  mesh = sharding.make_mesh()
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  denoiser = _denoiser(config, num_classes)
  num_classes = denoiser.num_classes
  schedule = builders.make_schedule(config)
  latent_shape = builders.latent_shape(config)
  tx, lr_schedule = optim.make_optimizer(config.diffusion.optim, config.diffusion.num_train_steps)
  state = jax.jit(functools.partial(stages.init_diffusion_state, config, denoiser, tx),
                  out_shardings=replicated)(1.0)
  num_params = models.count_params(state.params)
  batch_size = config.data.batch_size
  rng_mean, rng_sample = jax.random.split(jax.random.PRNGKey(config.seed))
  mean = jax.random.normal(rng_mean, (batch_size, *latent_shape))
  batch = jax.device_put({'latent_mean': mean, 'latent_logvar': jnp.full_like(mean, LOGVAR_MIN),
                          'label': jnp.arange(batch_size, dtype=jnp.int32) % max(num_classes, 1),
                          **conditioning.example_batch(config, batch_size)}, data)
  train_step = functools.partial(train.diffusion_train_step, denoiser=denoiser, config=config,
                                 lr_schedule=lr_schedule)
  train_flops = train_flops_per_image(config, num_classes)
  step = jax.jit(train_step, in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  step, train_compile_s = _compile(step, state, batch, schedule)

  def train_call():
    nonlocal state
    state, metrics = step(state, batch, schedule)
    return metrics
  train_s = _seconds_per_call(train_call, repeats)
  print(f'params: {num_params:,}; dtype {config.diffusion.compute_dtype}')
  train_gflops = report('train', f'batch {batch_size}', train_compile_s, train_s, batch_size,
                        train_flops)

  params = state.params
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
  sample_s = _seconds_per_call(lambda: sample_fn(params, labels, conditions, rng_sample), repeats)
  sample_flops = forward_flops * ddim_steps / sample_batch_size
  sample_gflops = report('sample', f'DDIM-{ddim_steps}, batch {sample_batch_size}',
                         sample_compile_s, sample_s, sample_batch_size, sample_flops)

  memory_mib, memory_kind = peak_memory()
  print(f'peak memory: {memory_mib:,.0f} MiB ({memory_kind})')
  result = dict(train_img_per_s=batch_size / train_s,
                sample_s_per_img=sample_s / sample_batch_size, params=num_params,
                train_gflops=train_gflops, matmul_gflops=matmul)
  print('RESULT ' + ' '.join(f'{k}={v}' if isinstance(v, int) else f'{k}={v:.4f}'
                             for k, v in result.items()), flush=True)
  return {**result, 'sample_gflops': sample_gflops, 'train_flops_per_image': train_flops,
          'sample_flops_per_image': sample_flops, 'peak_memory_mib': memory_mib}


BENCHMARKS = {
    'first_stage': lambda config: bench_first_stage(config, batch_size=FLAGS.batch_size,
                                                    repeats=FLAGS.repeats),
    'train': lambda config: bench_train(
        config, num_classes=FLAGS.num_classes, sample_batch_size=FLAGS.sample_batch_size,
        ddim_steps=FLAGS.ddim_steps, repeats=FLAGS.repeats, matmul_size=FLAGS.matmul_size,
        peak_tflops=FLAGS.peak_tflops),
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
  rows = {}
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
    seconds = _seconds_per_call(lambda: compiled(*args), repeats)
    rows[name] = dict(compile_s=compile_s, step_s=seconds, gflops=model_flops(step, *args) / 1e9)
    print(f'first_stage {name:>9}: batch {batch_size}  compile {compile_s:6.1f} s  '
          f'step {seconds * 1e3:9.1f} ms  {rows[name]["gflops"]:9.1f} GFLOP')
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
  return argv[1] if len(argv) == 2 else 'train'


def main(argv: list[str]) -> None:
  name = benchmark_of(argv)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}')
  BENCHMARKS[name](FLAGS.config)


if __name__ == '__main__':
  app.run(main)
