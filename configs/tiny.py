"""A seconds-long run for tests and smoke checks: tiny models, a handful of steps.

    python -m ldm_jax.main --config=configs/tiny.py --workdir=/tmp/ldm_tiny
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.batch_size = 16
  config.autoencoder.model.update(
      block_out_channels=(8, 16), latent_channels=2, norm_num_groups=4)
  config.autoencoder.num_train_steps = 4
  config.diffusion.model.update(
      base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
      attention_resolutions=(8,), num_heads=2, norm_num_groups=4)
  config.autoencoder.optim.update(learning_rate=3e-3, warmup_steps=1)
  config.diffusion.optim.update(learning_rate=3e-3, warmup_steps=1)
  config.diffusion.num_train_steps = 4
  config.train.update(log_every=2, checkpoint_every=2, keep_checkpoints=2)
  config.sample.update(num_steps=4, num_samples=8, batch_size=8)
  config.eval.update(num_samples=40, batch_size=200, kid_subset_size=40, classifier_steps=300)
  return config
