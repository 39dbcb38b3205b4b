"""Benchmarks that print numbers.

    python -m ldm_jax.bench sample --config=configs/default.py
    python -m ldm_jax.bench sample --config=configs/default.py --methods=ddim,heun --steps=10,50

`sample` times the whole jitted sample-and-decode function of `--mode=sample` for
each method and step count: compile seconds, then images/s over `--repeats` calls.
Throughput does not depend on the parameter values, so freshly initialized models
are used and no checkpoint is needed.
"""
import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from ldm_jax import builders, generate, sampling, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_list('methods', list(sampling.SAMPLERS), 'Samplers to time.')
flags.DEFINE_list('steps', ['10', '25', '50'], 'Step counts to time.')
flags.DEFINE_integer('batch_size', None, 'Images per call (default: config.sample.batch_size).')
flags.DEFINE_integer('repeats', 3, 'Timed calls after compilation.')
flags.DEFINE_integer('num_classes', 10, 'Label count when the config is class-conditional.')
flags.mark_flags_as_required(['config'])


def _init_params(config, autoencoder, unet):
  rng_ae, rng_unet = jax.random.split(jax.random.PRNGKey(config.seed))
  size, channels = config.data.image_size, config.data.num_channels
  ae_params = jax.jit(autoencoder.init)(rng_ae, jnp.zeros((1, size, size, channels)))['params']
  latents = jnp.zeros((1, *builders.latent_shape(config)))
  unet_params = jax.jit(unet.init)(rng_unet, latents, jnp.zeros((1,)),
                                   jnp.zeros((1,), jnp.int32))['params']
  return ae_params, unet_params


def bench_sample(config, methods: list[str], steps: list[int], batch_size: int,
                 repeats: int, num_classes: int) -> list[dict]:
  """Compile seconds and images/s of sample-and-decode per (method, steps)."""
  mesh = sharding.make_mesh()
  num_classes = num_classes if config.diffusion.class_conditional else 0
  autoencoder = builders.build_autoencoder(config)
  unet = builders.build_unet(config, num_classes)
  ae_params, unet_params = _init_params(config, autoencoder, unet)
  schedule = builders.make_schedule(config)
  labels = jax.device_put(jnp.arange(batch_size, dtype=jnp.int32) % max(num_classes, 1),
                          sharding.data_sharding(mesh))
  rows = []
  for method in methods:
    for num_steps in steps:
      sample_config = config.sample.copy_and_resolve_references()
      sample_config.unlock().update(method=method, num_steps=num_steps)
      fn = jax.jit(functools.partial(
          generate.generate_images, unet=unet, autoencoder=autoencoder,
          sample_config=sample_config, prediction_type=config.diffusion.prediction_type,
          latent_shape=builders.latent_shape(config), class_conditional=num_classes > 0))
      args = (unet_params, ae_params, jnp.float32(1.0), labels, jax.random.PRNGKey(0), schedule)
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


BENCHMARKS = {'sample': lambda config: bench_sample(
    config, FLAGS.methods, [int(s) for s in FLAGS.steps],
    FLAGS.batch_size or config.sample.batch_size, FLAGS.repeats, FLAGS.num_classes)}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(f'usage: python -m ldm_jax.bench {{{",".join(BENCHMARKS)}}} '
                         f'--config=FILE')
  unknown = sorted(set(FLAGS.methods) - set(sampling.SAMPLERS))
  if unknown:
    raise app.UsageError(f'unknown --methods {unknown}; accepted: {", ".join(sampling.SAMPLERS)}')
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}')
  BENCHMARKS[argv[1]](FLAGS.config)


if __name__ == '__main__':
  app.run(main)
