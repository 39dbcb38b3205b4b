"""4x super-resolution on ImageNet, 64x64 -> 256x256, as the LDM paper's SR model
(Rombach et al. 2022, section 4.4): the low-resolution image is concatenated to the
latents of a KL-f4 first stage, whose 64x64 latent grid matches it pixel for pixel.

    python -m ldm_jax.main --config=configs/imagenet_sr4x.py --workdir=runs/imagenet_sr
    python -m ldm_jax.main --config=configs/imagenet_sr4x.py --workdir=runs/imagenet_sr --mode=eval

| part          | setting                                                        |
| ------------- | -------------------------------------------------------------- |
| data          | TFDS `imagenet2012` (manual download), 256x256 center crops; the condition is the 4x area downsample |
| first stage   | KL-f4: channels 128·(1, 2, 4), 2 blocks/level, z 64x64x3        |
| U-Net         | 160 channels ·(1, 2, 2, 4), 2 res blocks, self-attention at 8x8, 32-dim heads |
| conditioning  | concat: 64x64x3 low-res + presence flag on 64x64x3 latents     |
| sampling      | DDIM, 100 steps, no guidance                                   |

CompVis's `bsr_sr/config.yaml` gives `attention_resolutions: [16, 8]`, which are
downsampling factors of the 64x64 latents, not feature-map sizes: its four levels
downsample by 1, 2, 4 and 8, so 16 never occurs and 8 is the 8x8 level. Here
`attention_resolutions` names feature-map sizes, hence (8,).

Needs the TFDS `imagenet2012` data prepared by hand (see TFDS docs) and accelerators.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.update(name='imagenet2012', train_split='train', eval_split='validation',
                     image_size=256, num_channels=3, batch_size=64, random_flip=True)
  config.autoencoder.model.update(block_out_channels=(128, 256, 512), layers_per_block=2,
                                  latent_channels=3, norm_num_groups=32)
  config.autoencoder.num_train_steps = 200_000
  config.autoencoder.optim.update(learning_rate=4.5e-6 * 12, warmup_steps=0,
                                  lr_schedule='constant', b1=0.5, b2=0.9)
  config.diffusion.model.update(base_channels=160, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                                attention_resolutions=(8,), head_dim=32, norm_num_groups=32)
  config.diffusion.cond_drop_prob = 0.0
  config.diffusion.conditioning.update(name='concat')
  config.diffusion.conditioning.concat.update(factor=4)
  config.diffusion.update(schedule='scaled_linear', beta_start=0.0015, beta_end=0.0155,
                          num_train_steps=1_000_000, ema_decay=0.9999)
  config.diffusion.optim.update(learning_rate=1e-4, warmup_steps=10_000, lr_schedule='constant')
  config.train.update(log_every=500, checkpoint_every=10_000, image_every=20_000,
                      keep_checkpoints=3)
  config.sample.update(method='ddim', num_steps=100, guidance_scale=1.0, num_samples=16,
                       batch_size=16)
  return config
