"""LDM-4 on CelebA-HQ 256 as in Rombach et al. 2022 (Table 13), with a KL-f4 first stage.

    python -m ldm_jax.main --config=configs/celebahq256_ldm_kl4.py --workdir=runs/celebahq

| part          | setting                                                      |
| ------------- | ------------------------------------------------------------ |
| first stage   | KL-f4: channels 128·(1, 2, 4), 2 blocks/level, z 64×64×3      |
| U-Net         | 224 channels ·(1, 2, 3, 4), 2 res blocks, attention at 32/16/8, 32-dim heads |
| diffusion     | T = 1000, sqrt-linear β 0.0015 → 0.0195, eps-prediction       |
| optimization  | batch 48, lr 9.6e-5 (2e-6 × 48), 410k steps                  |
| sampling      | DDIM, 200 steps (η = 0)                                      |

CompVis's `celebahq-ldm-vq-4.yaml` gives `attention_resolutions: [8, 4, 2]`: downsampling
factors of the 64x64 latents, i.e. feature maps of 8, 16 and 32, which is what
`attention_resolutions` names here: (32, 16, 8).

Needs the TFDS `celeb_a_hq/256` data prepared by hand (see TFDS docs) and accelerators.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.update(name='celeb_a_hq/256', train_split='train[:27000]',
                     eval_split='train[27000:]', image_size=256, num_channels=3,
                     batch_size=48, random_flip=True, label_key='')
  config.autoencoder.model.update(block_out_channels=(128, 256, 512), layers_per_block=2,
                                  latent_channels=3, norm_num_groups=32)
  config.autoencoder.num_train_steps = 200_000
  config.autoencoder.optim.update(learning_rate=4.5e-6 * 12, warmup_steps=0,
                                  lr_schedule='constant', b1=0.5, b2=0.9)
  config.diffusion.model.update(base_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                                attention_resolutions=(32, 16, 8), head_dim=32,
                                norm_num_groups=32, dropout=0.0)
  config.diffusion.conditioning.name = ''  # Unconditional.
  config.diffusion.update(schedule='scaled_linear', beta_start=0.0015, beta_end=0.0195,
                          num_train_steps=410_000, ema_decay=0.9999)
  config.diffusion.optim.update(learning_rate=9.6e-5, warmup_steps=10_000,
                                lr_schedule='constant', weight_decay=0.0)
  config.train.update(log_every=500, checkpoint_every=10_000, image_every=20_000,
                      keep_checkpoints=3)
  config.sample.update(method='ddim', num_steps=200, guidance_scale=1.0, num_samples=64,
                       batch_size=16)
  return config
