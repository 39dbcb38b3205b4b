"""Fixed benchmark: a 6.8M-parameter latent U-Net on 32x32x4 latents. Do not edit.

    python -m ldm_jax.bench --config=configs/bench_unet32.py

Numbers are comparable across versions only while this file stays as it is.

| part        | setting                                                           |
| ----------- | ----------------------------------------------------------------- |
| latents     | 32×32×4, random (no data, no autoencoder run)                     |
| U-Net       | channels (64, 128, 128), 2 ResBlocks down / 3 up per level        |
| attention   | 4 heads × 32 at 16×16, 8×8 and in the middle; none at 32×32       |
| layers      | GroupNorm 32 groups, eps 1e-5; SiLU; sinusoidal 64 → MLP 256      |
| resampling  | stride-2 conv down; nearest ×2 + conv up                          |
| diffusion   | linear β 1e-4 → 0.02, T = 1000, eps-MSE, unconditional            |
| optimizer   | AdamW lr 1e-4, weight decay 0.01, no clipping, no EMA             |
| precision   | float32; batch 32; DDIM-50 sampling of 16                         |
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  # 256 px images through an f=8 first stage give the 32x32x4 latents that are timed.
  config.data.update(image_size=256, num_channels=3, batch_size=32)
  config.autoencoder.model.update(block_out_channels=(32, 32, 32, 32), latent_channels=4)
  config.diffusion.model.update(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                                attention_resolutions=(16, 8), num_heads=4, head_dim=0,
                                dropout=0.0, norm_num_groups=32, norm_eps=1e-5,
                                time_embed_dim=256, mid_attention=True, remat='')
  config.diffusion.conditioning.name = ''
  config.diffusion.update(schedule='linear', beta_start=1e-4,
                          beta_end=0.02, num_timesteps=1000, prediction_type='eps',
                          loss_weighting='uniform', ema_decay=0.0, compute_dtype='float32',
                          grad_accum_steps=1)
  config.diffusion.optim.update(learning_rate=1e-4, warmup_steps=0, lr_schedule='constant',
                                weight_decay=0.01, grad_clip_norm=0.0)
  config.sample.update(method='ddim', num_steps=50, eta=0.0, guidance_scale=1.0,
                       batch_size=16)
  return config
