"""The PyTorch side of `side_by_side.py`: diffusers' UNet2DModel, one measurement per process.

Runs with the Python of a virtual environment that has torch and diffusers (never
ldm_jax's), on the spec file `side_by_side.py` writes:

    VENV/bin/python benchmarks/torch_unet.py --spec=WORKDIR/spec.json --mode=check
    VENV/bin/python benchmarks/torch_unet.py --spec=WORKDIR/spec.json --mode=train
    VENV/bin/python benchmarks/torch_unet.py --spec=WORKDIR/spec.json --mode=sample

`check` loads the U-Net folder ldm_jax exported (its initial weights), compares the
parameter count and the output on ldm_jax's inputs with ldm_jax's output, and exits
with status 1 when they differ. `train` times the AdamW train step on the eps-MSE
loss and `sample` a DDIM loop with diffusers' DDIMScheduler. Each prints RESULT
(and for `train` MEMORY) lines of `key=value` numbers.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

_RSS_FILE = pathlib.Path(__file__).resolve().parent.parent / 'ldm_jax' / 'rss.py'


def _load_rss():
  """ldm_jax/rss.py by path: the same memory probe as ldm_jax.bench, without JAX."""
  spec = importlib.util.spec_from_file_location('ldm_jax_rss', _RSS_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _print(prefix: str, **values) -> None:
  print(prefix + ' ' + ' '.join(f'{k}={v}' if isinstance(v, int) else f'{k}={v:.6g}'
                                for k, v in values.items()), flush=True)


def check(spec: dict) -> int:
  model = UNet2DModel.from_pretrained(spec['unet_folder']).eval()
  num_params = sum(p.numel() for p in model.parameters())
  data = np.load(spec['check_file'])
  x = torch.from_numpy(data['x']).permute(0, 3, 1, 2)  # NHWC -> NCHW.
  with torch.inference_mode():
    out = model(x, torch.from_numpy(data['t'])).sample.permute(0, 2, 3, 1).numpy()
  expected = data['expected']
  max_diff = float(np.abs(out - expected).max())
  scale = max(1.0, float(np.abs(expected).max()))
  _print('RESULT', torch_params=num_params, max_abs_diff=max_diff, output_scale=scale)
  ok = num_params == spec['params'] and max_diff <= spec['tolerance'] * scale
  if not ok:
    print(f'MISMATCH: diffusers has {num_params:,} parameters (ldm_jax {spec["params"]:,}), '
          f'max |diff| {max_diff:.3g} > {spec["tolerance"]} x {scale:.3g}', flush=True)
  return 0 if ok else 1


def _schedule_kwargs(spec: dict) -> dict:
  s = spec['schedule']
  return dict(num_train_timesteps=s['num_timesteps'], beta_start=s['beta_start'],
              beta_end=s['beta_end'], beta_schedule=s['beta_schedule'], prediction_type='epsilon')


def train(spec: dict, rss) -> None:
  t = spec['train']
  torch.manual_seed(0)
  height, width, channels = spec['latent_shape']
  latents = torch.randn(t['batch_size'], channels, height, width)
  noise_scheduler = DDPMScheduler(**_schedule_kwargs(spec))
  memory = rss.PeakWindow()
  # Initial weights: ldm_jax's, exported (their values do not change the timing).
  model = UNet2DModel.from_pretrained(spec['unet_folder']).train()
  # Weight decay on kernels and embeddings only, as ldm_jax.optim masks it.
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW(
      [dict(params=decay, weight_decay=t['weight_decay']), dict(params=no_decay, weight_decay=0.0)],
      lr=t['learning_rate'], betas=(t['b1'], t['b2']), eps=t['eps'])

  def step():
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, spec['schedule']['num_timesteps'], (latents.shape[0],))
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    loss = F.mse_loss(model(noisy, timesteps).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t['grad_clip_norm'] > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t['grad_clip_norm'])
    optimizer.step()
    return loss.item()

  step()  # Warm-up, not timed (allocates the AdamW moments).
  start = time.perf_counter()
  for _ in range(spec['repeats']):
    step()
  seconds = (time.perf_counter() - start) / spec['repeats']
  peak = memory.peak_mib()
  _print('RESULT', torch_train_img_per_s=t['batch_size'] / seconds, torch_train_s=seconds)
  _print('MEMORY', torch_train_peak_mib=peak, torch_train_mib_per_img=peak / t['batch_size'])


def sample(spec: dict) -> None:
  s = spec['sample']
  torch.manual_seed(0)
  model = UNet2DModel.from_pretrained(spec['unet_folder']).eval()
  scheduler = DDIMScheduler(**_schedule_kwargs(spec), clip_sample=False, set_alpha_to_one=False,
                            steps_offset=0, timestep_spacing='leading')
  height, width, channels = spec['latent_shape']
  x_T = torch.randn(s['batch_size'], channels, height, width)

  def ddim(num_steps):
    scheduler.set_timesteps(num_steps)
    x = x_T
    with torch.inference_mode():
      for t in scheduler.timesteps:
        eps = model(x, t).sample
        x = scheduler.step(eps, t, x, eta=s['eta']).prev_sample
    return x

  ddim(2)  # Warm-up: eager PyTorch compiles nothing, two steps touch every kernel.
  start = time.perf_counter()
  for _ in range(spec['repeats']):
    ddim(s['num_steps'])
  seconds = (time.perf_counter() - start) / spec['repeats']
  _print('RESULT', torch_sample_s_per_img=seconds / s['batch_size'], torch_sample_s=seconds)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--spec', required=True, help='spec.json written by side_by_side.py')
  parser.add_argument('--mode', required=True, choices=('check', 'train', 'sample'))
  args = parser.parse_args()
  with open(args.spec) as f:
    spec = json.load(f)
  torch.set_num_threads(_threads())
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads', file=sys.stderr)
  if args.mode == 'check':
    return check(spec)
  if args.mode == 'train':
    train(spec, _load_rss())
  else:
    sample(spec)
  return 0


if __name__ == '__main__':
  sys.exit(main())
