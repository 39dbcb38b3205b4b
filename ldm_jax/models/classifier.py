"""A small CNN image classifier whose penultimate layer serves as a feature space.

Inception features suit natural 299x299 photographs, not 32x32 digits; a classifier
trained on the dataset itself gives a feature space where Fréchet distance and
precision/recall are meaningful, and its predictions say whether a class-conditional
sample shows the class it was asked for.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax


class Classifier(nn.Module):
  """Conv-ReLU-pool stages, then a ReLU feature layer and a linear classifier.

  Attributes:
    num_classes: number of output logits.
    channels: output channels of the 3x3 conv of each stage; each stage halves
      height and width (2x2 average pooling).
    num_features: width of the feature (penultimate) layer.
  """

  num_classes: int
  channels: Sequence[int] = (16, 32, 64)
  num_features: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] in [-1, 1] to (logits [B, num_classes], features [B, F])."""
    for i, channels in enumerate(self.channels):
      x = nn.relu(nn.Conv(channels, (3, 3), padding=1, name=f'conv_{i}')(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.num_features, name='features')(x))
    logits = nn.Dense(self.num_classes, name='logits')(features)
    return logits, features
