"""Text-to-image on MS-COCO captions, LDM-style: KL-f8 latents, a cross-attention U-Net
and a BERT-style text encoder trained from scratch (Rombach et al. 2022, section 4.3).

    python -m ldm_jax.main --config=configs/coco_text2img.py --workdir=runs/coco
    python -m ldm_jax.main --config=configs/coco_text2img.py --workdir=runs/coco \
        --mode=sample --prompt="a red bus parked on a street" --prompt="a cat on a bed"

| part          | setting                                                        |
| ------------- | -------------------------------------------------------------- |
| data          | TFDS `coco_captions` (2014, Karpathy splits), 256x256 RGB, one random caption of five per step |
| first stage   | KL-f8: channels 128·(1, 2, 4, 4), 2 blocks/level, z 32x32x4     |
| text encoder  | word-level vocabulary (10k), 8 layers of width 512, 77 tokens   |
| U-Net         | 256 channels ·(1, 2, 4), cross-attention at 32/16/8, depth 1, 64-dim heads |
| guidance      | captions dropped at 10%, sampled with scale 5                  |

Needs the TFDS `coco_captions` data (downloaded by TFDS, about 40 GB) and accelerators.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.update(name='coco_captions', train_split='train', eval_split='val',
                     image_size=256, num_channels=3, batch_size=64, random_flip=False,
                     label_key='')
  config.autoencoder.model.update(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  latent_channels=4, norm_num_groups=32)
  config.autoencoder.num_train_steps = 200_000
  config.autoencoder.optim.update(learning_rate=4.5e-6 * 12, warmup_steps=0,
                                  lr_schedule='constant', b1=0.5, b2=0.9)
  config.diffusion.model.update(base_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
                                attention_resolutions=(32, 16, 8), head_dim=64,
                                norm_num_groups=32, context_dim=512, transformer_depth=1)
  config.diffusion.conditioning.update(name='text')
  config.diffusion.conditioning.text.update(caption_key='captions/text', vocab_size=10_000,
                                            max_length=77, num_layers=8, num_heads=8)
  config.diffusion.update(schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                          num_train_steps=390_000, ema_decay=0.9999, cond_drop_prob=0.1)
  config.diffusion.optim.update(learning_rate=1e-4, warmup_steps=10_000, lr_schedule='constant')
  config.train.update(log_every=500, checkpoint_every=10_000, image_every=20_000,
                      keep_checkpoints=3)
  config.sample.update(method='ddim', num_steps=50, guidance_scale=5.0, num_samples=16,
                       batch_size=16)
  return config
