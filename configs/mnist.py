"""Two-stage LDM on MNIST (downloads through TFDS); a GPU makes it minutes.

    python -m ldm_jax.main --config=configs/mnist.py --workdir=runs/mnist
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.update(name='mnist', train_split='train', eval_split='test', batch_size=128)
  config.autoencoder.num_train_steps = 10_000
  config.diffusion.model.update(base_channels=128, channel_mult=(1, 2, 2),
                                attention_resolutions=(4, 2), norm_num_groups=32,
                                dropout=0.1)
  config.diffusion.num_train_steps = 40_000
  config.train.update(log_every=200, checkpoint_every=5_000, image_every=5_000)
  return config
