"""4x super-resolution on the embedded digits, 8x8 -> 32x32, by concatenation (LDM 4.4).

    python -m ldm_jax.main --config=configs/digits_superres.py --workdir=runs/digits_superres
    python -m ldm_jax.main --config=configs/digits_superres.py --workdir=runs/digits_superres \
        --mode=eval

Each training image is downsampled 4x (area average) to 8x8; the conditioner
resizes that to the 8x8x4 latent grid and stacks it, with a presence flag, onto
the noisy latents. `--mode=eval` super-resolves the whole test split and reports
PSNR and SSIM of the samples and of bicubic upsampling against the originals.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.diffusion.cond_drop_prob = 0.0  # No guidance: every step sees the condition.
  config.diffusion.conditioning.update(name='concat')
  config.diffusion.conditioning.concat.update(factor=4)  # 32x32 -> 8x8.
  config.diffusion.num_train_steps = 1_000
  # v-prediction (Salimans & Ho 2022): the x0 estimate stays well conditioned at high
  # noise, where eps-prediction divides by sqrt(alphas_cumprod) ~ 0.006.
  config.diffusion.prediction_type = 'v'
  # Deterministic DDIM with few steps stays close to the posterior mean, which is what
  # PSNR rewards.
  config.sample.update(method='ddim', num_steps=20, eta=0.0, guidance_scale=1.0)
  config.eval.num_samples = 300  # --mode=eval: about one sample per test image.
  return config
