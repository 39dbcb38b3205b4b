"""LDM-4 on CelebA-HQ 256 as in Rombach et al. 2022 (`celebahq-ldm-vq-4.yaml`): VQ-f4 first stage.

    python -m ldm_jax.main --config=configs/celebahq256_ldm_vq4.py --workdir=runs/celebahq_vq

| part          | setting                                                        |
| ------------- | -------------------------------------------------------------- |
| first stage   | VQ-f4 (`vq-f4/config.yaml`): channels 128·(1, 2, 4), 2 blocks/level, |
|               | 8192 codes of dim 3, z 64×64×3; taming's VQLPIPSWithDiscriminator: |
|               | LPIPS weight 1, codebook weight 1, PatchGAN (3 layers, hinge) from |
|               | step 0 with disc_weight 0.75                                    |
| U-Net         | 224 channels ·(1, 2, 3, 4), 2 res blocks, attention at 32/16/8, 32-dim heads |
| diffusion     | T = 1000, sqrt-linear β 0.0015 → 0.0195, eps-prediction, on the   |
|               | pre-quantization latents (the decoder quantizes)                |
| optimization  | batch 48, lr 9.6e-5 (2e-6 × 48), 410k steps                    |
| sampling      | DDIM, 200 steps (η = 0)                                        |
Needs the TFDS `celeb_a_hq/256` data prepared by hand, the LPIPS weight files under
weights/ (see README, First stage: LPIPS, PatchGAN, VQ) and accelerators. The same schedule with
a KL-f4 first stage is configs/celebahq256_ldm_kl4.py.
"""
import ml_collections

from configs import celebahq256_ldm_kl4


def get_config() -> ml_collections.ConfigDict:
  config = celebahq256_ldm_kl4.get_config()
  config.autoencoder.model = ml_collections.ConfigDict(dict(
      name='vq', block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3,
      num_vq_embeddings=8192, vq_embed_dim=3, beta=0.25, norm_num_groups=32,
      mid_block_attention=True))
  config.autoencoder.update(perceptual_weight=1.0, codebook_weight=1.0,
                            lpips_vgg_weights='weights/vgg16-397923af.pth',
                            lpips_lin_weights='weights/lpips_v0.1_vgg.pth')
  config.autoencoder.disc.update(weight=0.75, start=0, factor=1.0, loss='hinge', num_layers=3,
                                 ndf=64)
  config.autoencoder.disc.optim.update(learning_rate=config.autoencoder.optim.learning_rate,
                                       b1=0.5, b2=0.9)
  return config
