"""Sample-quality and reconstruction metrics as pure functions of arrays.

Feature-space metrics (Fréchet distance, KID, precision/recall) take [N, D] feature
matrices, whichever network produced them; image metrics (PSNR, SSIM) take NHWC
batches. Heavy pairwise work runs in jitted JAX; the final statistics that need
float64 (covariances, the matrix square root) run in NumPy.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------- Fréchet distance --


def feature_statistics(features: np.ndarray | jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'features must be [N, D] with N >= 2, got shape {features.shape}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}), with tr (Σ1 Σ2)^{1/2} taken as
  tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: the same eigenvalues, but of a symmetric PSD
  matrix, so there are no spurious imaginary parts (which `scipy.linalg.sqrtm`
  produces for near-singular covariances).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _sqrtm_psd(sigma1)
  middle = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  value = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
  return float(max(value, 0.0))


def frechet_distance_of(features1, features2) -> float:
  """Fréchet distance between the Gaussians fitted to two feature sets [N, D], [M, D]."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ----------------------------------------------------------------------- KID --


def polynomial_kernel(x: jax.Array, y: jax.Array) -> jax.Array:
  """k(x, y) = (x·y / D + 1)³ for rows of x [N, D] and y [M, D] -> [N, M]."""
  return (x @ y.T / x.shape[-1] + 1.0) ** 3


def mmd2_unbiased(x: jax.Array, y: jax.Array) -> jax.Array:
  """Unbiased MMD² with the cubic polynomial kernel between equal-size sets [m, D]."""
  m = x.shape[0]
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  off_diagonal = lambda k: (jnp.sum(k) - jnp.trace(k)) / (m * (m - 1))
  return off_diagonal(k_xx) + off_diagonal(k_yy) - 2.0 * jnp.mean(k_xy)


@jax.jit
def _mmd2_subsets(f1: jax.Array, f2: jax.Array, index1: jax.Array,
                  index2: jax.Array) -> jax.Array:
  # One subset at a time keeps memory at three [m, m] kernels.
  return jax.lax.map(lambda ij: mmd2_unbiased(f1[ij[0]], f2[ij[1]]), (index1, index2))


def kernel_inception_distance(f1, f2, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID (Bińkowski et al. 2018): unbiased MMD² averaged over random subsets.

  Args:
    f1: [N, D] features of one set; f2: [M, D] of the other.
    num_subsets: subsets drawn (without replacement within a subset).
    subset_size: examples per subset, clipped to min(N, M).
    seed: seeds the subset draws.

  Returns:
    (mean, std) of MMD² over the subsets.
  """
  f1 = jnp.asarray(f1, jnp.float32)
  f2 = jnp.asarray(f2, jnp.float32)
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise ValueError(f'KID needs at least 2 examples per set, got {f1.shape[0]} and {f2.shape[0]}')
  rng = np.random.default_rng(seed)
  index1 = np.stack([rng.choice(f1.shape[0], m, replace=False) for _ in range(num_subsets)])
  index2 = np.stack([rng.choice(f2.shape[0], m, replace=False) for _ in range(num_subsets)])
  values = np.asarray(_mmd2_subsets(f1, f2, index1, index2), np.float64)
  return float(values.mean()), float(values.std())


# ---------------------------------------------------------- precision/recall --


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """‖a_i − b_j‖² for rows of a [N, D] and b [M, D] -> [N, M], clipped at 0."""
  d = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T)
  return jnp.maximum(d, 0.0)


def _row_blocks(fn, rows: jax.Array, block: int) -> jax.Array:
  """Maps `fn` ([block, D] -> [block]) over blocks of `rows` [N, D] (zero-padded) -> [N]."""
  n = rows.shape[0]
  block = min(block, n)
  blocks = jnp.pad(rows, ((0, -n % block), (0, 0))).reshape(-1, block, rows.shape[1])
  return jax.lax.map(fn, blocks).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=('k', 'block'))
def knn_radii(features: jax.Array, *, k: int, block: int = 512) -> jax.Array:
  """Squared distance from each row of `features` [N, D] to its k-th nearest other row."""
  # The k+1 smallest distances include the row itself at 0.
  kth = lambda rows: -jax.lax.top_k(-_squared_distances(rows, features), k + 1)[0][:, k]
  return _row_blocks(kth, features, block)


@functools.partial(jax.jit, static_argnames=('block',))
def _covered(queries: jax.Array, support: jax.Array, radii: jax.Array, *,
             block: int = 512) -> jax.Array:
  """Whether each query lies in some ball (support_j, radius_j) -> [N] bool."""
  inside = lambda rows: jnp.any(_squared_distances(rows, support) <= radii[None, :], axis=1)
  return _row_blocks(inside, queries, block)


def precision_recall(real, fake, *, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets.

  The manifold of a set is the union of balls around its points, each with the
  radius to the point's k-th nearest neighbour in the set. Precision is the
  fraction of `fake` inside the real manifold; recall the fraction of `real`
  inside the fake manifold.

  Args:
    real: [N, D] features of real data; fake: [M, D] of generated data.
    k: neighbourhood size; N and M must exceed it.
  """
  real = jnp.asarray(real, jnp.float32)
  fake = jnp.asarray(fake, jnp.float32)
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(f'precision/recall with k={k} needs more than {k} examples per set, '
                     f'got {real.shape[0]} and {fake.shape[0]}')
  precision = _covered(fake, real, knn_radii(real, k=k))
  recall = _covered(real, fake, knn_radii(fake, k=k))
  return float(jnp.mean(precision)), float(jnp.mean(recall))


# ---------------------------------------------------------------- PSNR/SSIM --


def psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
  """Peak signal-to-noise ratio (dB) of each image of NHWC batches -> [B]."""
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> jax.Array:
  """Normalized 1-D Gaussian [size]."""
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  w = jnp.exp(-x ** 2 / (2 * sigma ** 2))
  return w / jnp.sum(w)


def _filter_valid(images: jax.Array, window: jax.Array) -> jax.Array:
  """Separable 2-D filtering of [B, H, W, C] over the valid region -> [B, H-s+1, W-s+1, C]."""
  size = window.shape[0]
  b, h, w, c = images.shape
  x = jnp.transpose(images, (0, 3, 1, 2)).reshape(b * c, 1, h, w)
  dn = ('NCHW', 'OIHW', 'NCHW')
  x = jax.lax.conv_general_dilated(x, window.reshape(1, 1, size, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision='highest')
  x = jax.lax.conv_general_dilated(x, window.reshape(1, 1, 1, size), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision='highest')
  return jnp.transpose(x.reshape(b, c, h - size + 1, w - size + 1), (0, 2, 3, 1))


def ssim(x: jax.Array, y: jax.Array, data_range: float, *, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity (Wang et al. 2004) of each image of NHWC batches -> [B].

  Gaussian-weighted local statistics with population (not sample) covariances,
  averaged over the positions where the window fits inside the image and over
  channels: the same value as scikit-image's `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
  """
  if min(x.shape[1], x.shape[2]) < window_size:
    raise ValueError(f'SSIM needs images of at least {window_size}x{window_size}, '
                     f'got {x.shape[1]}x{x.shape[2]}')
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  window = gaussian_window(window_size, sigma)
  blur = functools.partial(_filter_valid, window=window)
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x ** 2
  var_y = blur(y * y) - mu_y ** 2
  cov_xy = blur(x * y) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
      (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))
