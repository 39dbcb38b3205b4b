"""First-stage objective and regularizer at f=4 (LDM, Rombach et al. 2022, sections 3.1
and 4): L1 + KL vs L1 + LPIPS + KL vs L1 + LPIPS + PatchGAN + KL vs VQ, then the same
stage 2 on each, on the embedded digits at 16x16.

    python -m experiments.lpips_weights --out_dir=runs/lpips   # LPIPS weights, once
    python -m ldm_jax.ablate --sweep=experiments/first_stage_ablation.py \
        --workdir=runs/first_stage_ablation \
        --results_dir=experiments/results/first_stage_ablation

Every variant trains its own f=4 first stage (channels (16, 32, 32), 4 latent
channels, 350 steps at batch 64) with the objective its name gives:

  l1-kl            the plain objective: mean |x - x̂| + kl_weight · KL;
  l1-lpips-kl      LDM's objective (taming's LPIPSWithDiscriminator) with LPIPS weight 1
                   and no discriminator;
  l1-lpips-gan-kl  the same with the PatchGAN (2 layers, 32 filters, adaptive weight 0.5)
                   from step 200;
  vq-lpips-gan     a VQ first stage (256 codes of dim 4, configs/digits_vq_gan.py) with
                   the same LPIPS + PatchGAN objective (taming's VQLPIPSWithDiscriminator),
                   codes learned through the codebook loss as in LDM.

Stage 2 is the same everywhere: the class-conditional U-Net for 4x4 latents of
ldm_f_sweep.py's f=4 row (channel_mult (1, 2), attention at 2x2), 600 steps,
`scaled_linear` and `v`, sampled with DDIM-50 and guidance 2, 300 samples per run.
The table gives reconstruction metrics of the test split (`ae_psnr`, `ae_ssim`,
`ae_lpips`, `ae_fd_classifier`: the classifier FD of the reconstructions) and the
sample metrics. 16x16 (the digits are upsampled 8x8 scans) keeps the four LPIPS
trainings within the study's budget: VGG16 costs ~8x the small autoencoder's step.
One seed: the budget did not allow two.
"""
from experiments import digits16

# configs/digits_vq_gan.py's discriminator, for the KL model with a GAN.
GAN = {'autoencoder.disc.weight': 0.5, 'autoencoder.disc.start': 200,
       'autoencoder.disc.num_layers': 2, 'autoencoder.disc.ndf': 32,
       'autoencoder.disc.optim.learning_rate': 2e-4}


def get_sweep():
  return dict(
      config='configs/default.py',
      overrides={
          **digits16.STAGE2_OVERRIDES,
          'diffusion.model.channel_mult': (1, 2),
          'diffusion.model.attention_resolutions': (2,),
      },
      variants=[
          dict(name='l1-kl'),
          dict(name='l1-lpips-kl', overrides={'autoencoder.perceptual_weight': 1.0}),
          dict(name='l1-lpips-gan-kl',
               overrides={'autoencoder.perceptual_weight': 1.0, **GAN}),
          dict(name='vq-lpips-gan', config='configs/digits_vq_gan.py',
               overrides={'autoencoder.perceptual_weight': 1.0}),
      ],
      seeds=(0,),
      share_autoencoder=False,
  )
