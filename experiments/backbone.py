"""Backbone: U-Net vs DiT at matched training FLOPs, 2 seeds each, on the embedded digits.

    python -m ldm_jax.ablate --sweep=experiments/backbone.py \
        --workdir=runs/backbone --results_dir=experiments/results/backbone

The U-Net is that of configs/default.py; the DiT (configs/digits_dit.py: patch size 1,
width 64, 5 blocks, adaLN-Zero) costs about the same per training image (0.113 vs
0.116 GFLOP, `bench.train_flops_per_image`; the table's train_gflops_per_image
column). Both train on the latents of one shared first stage with the same data,
optimizer and budget: 600 steps instead of 2,200, as in schedule_x_prediction.py, and
with that study's best schedule and target (`scaled_linear`, `v`): with `eps`, 600
steps gave noise-like samples, which would leave nothing to compare. Samples come from
DDIM-50 with guidance 2, 500 per run for the metrics. The table also gives each
backbone's measured training throughput (train_img_per_s).
"""
from experiments import digits16


def get_sweep():
  return dict(
      config='configs/default.py',
      overrides={**digits16.SHORT_BUDGET, 'eval.num_samples': 500},
      variants=[
          dict(name='unet'),
          dict(name='dit', config='configs/digits_dit.py'),
      ],
      seeds=(0, 1),
      share_autoencoder=True,
  )
