"""Downsampling factor f of the first stage (LDM-f, Rombach et al. 2022, section 4.1):
f ∈ {1 (pixels), 2, 4, 8} on the embedded digits at 16x16, the same stage-2 budget.

    python -m ldm_jax.ablate --sweep=experiments/ldm_f_sweep.py \
        --workdir=runs/ldm_f_sweep --results_dir=experiments/results/ldm_f_sweep

Every run trains its own first stage (a KL autoencoder with f = 2 ** (levels - 1),
L1 + KL, 350 steps; none for f=1, where the identity first stage makes stage 2
diffuse pixels), then the class-conditional U-Net for 600 steps at batch 64 with
`scaled_linear` and `v` (the best pair of schedule_x_prediction.py), sampled with
DDIM-50 and guidance 2, 300 samples per run for the metrics.

Images are 16x16, not 32x32: the digits are 8x8 scans upsampled bicubically, so 16x16
keeps everything they hold, and pixel-space diffusion (f=1) costs 4x less per step
than at 32x32, which is what lets both seeds of it fit the study's time budget. The
latents are then 16x16x1 (f=1), 8x8x4 (f=2), 4x4x4 (f=4) and 2x2x4 (f=8).

As in the paper (whose LDM-1 .. LDM-32 U-Nets differ in depth), the denoiser follows
its input: one level per halving down to 4x4 (2x2 for f=8), self-attention at the
lowest resolution, 32 base channels and 2 ResNet blocks per level throughout:

  f=1  16x16x1  channel_mult (1, 2, 2)  attention at 4x4
  f=2   8x8x4   channel_mult (1, 2)     attention at 4x4
  f=4   4x4x4   channel_mult (1, 2)     attention at 2x2
  f=8   2x2x4   channel_mult (1,)       attention at 2x2

Variants run cheapest first (f=8 .. f=1), so an interrupted study has its cheap rows.
The table gives sample quality (class accuracy, classifier FD, precision/recall),
the first stage's reconstruction PSNR/LPIPS (`ae_*`), stage-2 training throughput
(`train_img_per_s`) and sampling time (`sampling_seconds_per_image`). LPIPS is only
measured (perceptual_weight stays 0); its weights are the files
experiments/lpips_weights.py writes to runs/lpips (run it first).
"""
from experiments import digits16

# f -> (first-stage block_out_channels, U-Net channel_mult, attention_resolutions).
FACTORS = {
    8: ((16, 32, 32, 32), (1,), (2,)),
    4: ((16, 32, 32), (1, 2), (2,)),
    2: ((16, 32), (1, 2), (4,)),
    1: (None, (1, 2, 2), (4,)),
}


def _variant(f: int) -> dict:
  blocks, channel_mult, attention = FACTORS[f]
  overrides = {'diffusion.model.channel_mult': channel_mult,
               'diffusion.model.attention_resolutions': attention}
  if blocks is None:
    overrides['autoencoder.model.name'] = 'identity'
  else:
    overrides['autoencoder.model.block_out_channels'] = blocks
  return dict(name=f'f{f}', overrides=overrides)


def get_sweep():
  return dict(
      config='configs/default.py',
      overrides=digits16.STAGE2_OVERRIDES,
      variants=[_variant(f) for f in (8, 4, 2, 1)],
      seeds=(0, 1),
      share_autoencoder=False,
  )
