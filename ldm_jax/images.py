"""Image outputs: uint8 grids, and PNG + npz files of samples and edits."""
import io
import os

import numpy as np
from PIL import Image

from ldm_jax import fileio


def make_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
  """Tiles uint8 [N, H, W, C] images into one [rows*(H+pad)+pad, ..., C] image."""
  n, h, w, c = images.shape
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def free_sample_names(directory: str, step: int) -> tuple[str, str]:
  """`grid_<step>_sample<n>.png`, `samples_<step>_sample<n>.npz` with the first unused n."""
  n = 1
  while fileio.exists(os.path.join(directory, f'samples_{step}_sample{n}.npz')):
    n += 1
  return (os.path.join(directory, f'grid_{step}_sample{n}.png'),
          os.path.join(directory, f'samples_{step}_sample{n}.npz'))


def write_samples(directory: str, step: int, grid: np.ndarray, images: np.ndarray,
                  labels: np.ndarray | None, own_files: bool = False) -> tuple[str, str]:
  """Writes `grid_<step>.png` and `samples_<step>.npz` (`images`, and `labels` if any).

  With `own_files`, new names (`free_sample_names`) that never replace earlier ones,
  such as the training run's samples of the same step.
  """
  if own_files:
    png, npz = free_sample_names(directory, step)
  else:
    png = os.path.join(directory, f'grid_{step}.png')
    npz = os.path.join(directory, f'samples_{step}.npz')
  arrays = {'images': images} if labels is None else {'images': images, 'labels': labels}
  save_grid_and_arrays(png, npz, grid, arrays)
  return png, npz


def save_grid_and_arrays(png: str, npz: str, grid: np.ndarray,
                         arrays: dict[str, np.ndarray]) -> None:
  """Writes a uint8 grid [H, W, C] as PNG and `arrays` as a compressed npz."""
  fileio.write_atomic(png, png_bytes(grid))
  fileio.save_npz(npz, compressed=True, **arrays)


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 image [H, W, C] (C = 1, 3 or 4) encoded as PNG."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()
