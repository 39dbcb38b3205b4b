"""Two-stage LDM on CIFAR-10 (downloads through TFDS), class-conditional, f=2 latents.

    python -m ldm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.update(name='cifar10', train_split='train', eval_split='test',
                     num_channels=3, batch_size=128, random_flip=True)
  config.autoencoder.model.update(block_out_channels=(64, 128), layers_per_block=2,
                                  latent_channels=4, norm_num_groups=32)
  config.autoencoder.num_train_steps = 50_000
  config.autoencoder.optim.update(learning_rate=2e-4, warmup_steps=1_000)
  config.diffusion.model.update(base_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                                attention_resolutions=(8, 4), num_heads=4,
                                norm_num_groups=32, dropout=0.1)
  config.diffusion.num_train_steps = 300_000
  config.diffusion.ema_decay = 0.9999
  config.diffusion.optim.update(learning_rate=2e-4, warmup_steps=5_000)
  config.train.update(log_every=500, checkpoint_every=10_000, image_every=10_000,
                      keep_checkpoints=3)
  return config
