"""Stage 1 as a VQ autoencoder with a PatchGAN on the embedded digits; minutes on a CPU.

    python -m ldm_jax.main --config=configs/digits_vq_gan.py --workdir=runs/digits_vq

The default run with a VQ-f4 first stage (256 codes of dim 4) trained by taming's
VQLPIPSWithDiscriminator objective: L1 + codebook loss, and a small PatchGAN from
step 200 with the adaptive weight. LPIPS is off here (its VGG16 weights are a
separate download); add it with `--config.autoencoder.perceptual_weight=1.0` and the
two `lpips_*_weights` files (README, First stage: LPIPS, PatchGAN, VQ). Stage 2
diffuses the pre-quantization latents; the decoder quantizes them.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.autoencoder.model = ml_collections.ConfigDict(dict(
      name='vq', block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
      num_vq_embeddings=256, vq_embed_dim=4, beta=0.25, norm_num_groups=8,
      mid_block_attention=True,
      # 'loss': codes learned through the codebook loss (LDM); 'ema': codes are EMAs of
      # their assigned encoder outputs (VQ-VAE-2), the loss keeps the commitment term.
      codebook_update='loss', codebook_ema_decay=0.99, codebook_ema_epsilon=1e-5))
  config.autoencoder.codebook_weight = 1.0
  config.autoencoder.disc.update(weight=0.5, start=200, num_layers=2, ndf=32)
  config.autoencoder.disc.optim.update(learning_rate=2e-4)
  return config
