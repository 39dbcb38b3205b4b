"""Image outputs: uint8 grids, and PNG + npz files of samples and edits."""
import os

import numpy as np
from PIL import Image


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


def write_samples(directory: str, step: int, grid: np.ndarray, images: np.ndarray,
                  labels: np.ndarray | None) -> tuple[str, str]:
  """Writes `grid_<step>.png` and `samples_<step>.npz` (`images`, and `labels` if any)."""
  png = os.path.join(directory, f'grid_{step}.png')
  npz = os.path.join(directory, f'samples_{step}.npz')
  arrays = {'images': images} if labels is None else {'images': images, 'labels': labels}
  save_grid_and_arrays(png, npz, grid, arrays)
  return png, npz


def save_grid_and_arrays(png: str, npz: str, grid: np.ndarray,
                         arrays: dict[str, np.ndarray]) -> None:
  """Writes a uint8 grid [H, W, C] as PNG and `arrays` as a compressed npz."""
  os.makedirs(os.path.dirname(png), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png)
  np.savez_compressed(npz, **arrays)
