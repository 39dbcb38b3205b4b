"""A/B timings of XLA CPU flags on small convolution and matmul programs.

    python benchmarks/cpu_flags_ab.py                  # every variant, 2 rounds
    python benchmarks/cpu_flags_ab.py --rounds=3 --variants=base,no_ynn_conv,no_ynn

Each (variant, round) is a fresh process (XLA reads XLA_FLAGS once, at start-up),
run in the order A B C ... A B C ..., so that a machine whose load changes affects
every variant alike. Each process times, after compilation, the median of
`--calls` calls (the fastest call: on a loaded machine the least disturbed) of:

  conv_fwd    3x3 convolution, [8, 32, 32, 64] -> 64 channels (the bench U-Net's
              first level, where the most FLOPs are)
  conv_train  value and gradient (input and kernel) of the same convolution
  matmul      [512, 512] x [512, 512], float32

and prints one RESULT line of milliseconds. The summary gives each variant's time
relative to `base` of the same round (< 1: faster), the median over rounds, and
the fastest time over all rounds relative to base's fastest. On a shared machine
only large ratios (beyond ~1.3x) mean anything.
"""
import argparse
import os
import statistics
import subprocess
import sys

VARIANTS = {
    'base': '',
    # XLA's default CPU convolutions and dots go through YNNPACK fusions; an empty
    # type list turns them off (convolutions then run on Eigen).
    'no_ynn': '--xla_cpu_experimental_ynn_fusion_type=',
    # Only convolutions leave YNNPACK (ldm_jax's default, see ldm_jax/xla_flags.py).
    'no_ynn_conv': '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
    'no_xnn': '--xla_cpu_experimental_xnn_fusion_type=',
    'onednn': '--xla_cpu_use_onednn=true',
    'no_eigen_threads': '--xla_cpu_multi_thread_eigen=false',
    'fast_math': '--xla_cpu_enable_fast_math=true',
    'no_fusion_emitters': '--xla_cpu_use_fusion_emitters=false',
}
PROGRAMS = ('conv_fwd', 'conv_train', 'matmul')

_CHILD = r'''
import statistics, sys, time
import jax, jax.numpy as jnp
calls = int(sys.argv[1])
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 64))
w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64)) * 0.05
a = jax.random.normal(jax.random.PRNGKey(2), (512, 512))
programs = {
    'conv_fwd': (jax.jit(conv), (x, w)),
    'conv_train': (jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) ** 2),
                                              argnums=(0, 1))), (x, w)),
    'matmul': (jax.jit(jnp.matmul), (a, a)),
}
out = {}
for name, (fn, args) in programs.items():
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    out[name] = 1e3 * min(times)
print('RESULT ' + ' '.join(f'{k}_ms={v:.3f}' for k, v in out.items()), flush=True)
'''


def _run(flags: str, calls: int) -> dict[str, float] | str:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
  run = subprocess.run([sys.executable, '-c', _CHILD, str(calls)], env=env,
                       capture_output=True, text=True, check=False)
  lines = [l for l in run.stdout.splitlines() if l.startswith('RESULT ')]
  if run.returncode or not lines:
    last = (run.stderr or run.stdout).strip().splitlines()
    return last[-1][:160] if last else f'exit {run.returncode}'
  return {k.removesuffix('_ms'): float(v) for k, v in
          (pair.split('=') for pair in lines[-1].split()[1:])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--calls', type=int, default=20)
  args = parser.parse_args()
  names = args.variants.split(',')
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f'error: unknown variants {unknown}; accepted: {", ".join(VARIANTS)}')
  if 'base' not in names:
    names.insert(0, 'base')
  runs: dict[str, list] = {n: [] for n in names}
  for r in range(args.rounds):
    for name in names:
      result = _run(VARIANTS[name], args.calls)
      runs[name].append(result)
      print(f'round {r} {name:>18s}: {result}', flush=True)
  base = [run for run in runs['base'] if isinstance(run, dict)]
  print(f'\n{"variant":>18s} ' + ' '.join(f'{p:>11s}' for p in PROGRAMS) + '   (time / base)')
  for name in names:
    ok = [run for run in runs[name] if isinstance(run, dict)]
    if not ok:
      print(f'{name:>18s} failed: {runs[name][0]}')
      continue
    ratios = [statistics.median(run[p] / b[p] for run, b in zip(ok, base)) for p in PROGRAMS]
    best = [min(run[p] for run in ok) / min(b[p] for b in base) for p in PROGRAMS]
    print(f'{name:>18s} ' + ' '.join(f'{x:>11.2f}' for x in ratios) + '   best of rounds: '
          + ' '.join(f'{x:.2f}' for x in best))


if __name__ == '__main__':
  main()
