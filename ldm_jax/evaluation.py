"""Sample-quality and reconstruction metrics as pure functions of arrays.

Feature-space metrics (Fréchet distance, KID, precision/recall) take [N, D] feature
matrices, whichever network produced them; image metrics (PSNR, SSIM) take NHWC
batches. Heavy pairwise work runs in jitted JAX; the final statistics that need
float64 (covariances, the matrix square root) run in NumPy.
"""
import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import checkpointing, conditioning, fileio, generate, input_pipeline, models
from ldm_jax import observe, optim, perceptual, sharding, stages, superres
from ldm_jax.losses import psnr
from ldm_jax.models import inception
from ldm_jax.models.autoencoder import codebook_statistics
from ldm_jax.errors import UserError
from ldm_jax.train_state import TrainState, create_train_state


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


# ------------------------------------------------------ batched feature maps --


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
  """`eval.batch_size` rounded up to split evenly over the devices (data x fsdp)."""
  return _round_up(config.eval.batch_size, sharding.num_batch_shards(mesh))


def _gather(tree) -> dict[str, np.ndarray]:
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def _concat(outputs: list[dict[str, np.ndarray]], count: int | None = None):
  return {k: np.concatenate([o[k] for o in outputs])[:count] for k in outputs[0]}


def map_images(fn: Callable[[jax.Array], dict[str, jax.Array]], images: np.ndarray, mesh,
               batch_size: int, desc: str = 'features') -> dict[str, np.ndarray]:
  """Applies a jitted `fn` (images [B, ...] -> dict of [B, ...]) to host images in batches.

  `images` [N, H, W, C] must be the same on every process (like `Sampler.generate`'s
  output); each batch is split over all devices (`sharding.data_sharding`).
  """
  data = sharding.data_sharding(mesh)
  padded = np.concatenate([images, np.zeros((-len(images) % batch_size, *images.shape[1:]),
                                            images.dtype)])
  outputs = []
  for i in observe.progress(range(0, len(padded), batch_size), desc=desc):
    chunk = padded[i:i + batch_size]
    batch = jax.make_array_from_callback(chunk.shape, data, lambda index, c=chunk: c[index])
    outputs.append(_gather(fn(batch)))
  return _concat(outputs, len(images))


def map_split(fn: Callable[[jax.Array], dict[str, jax.Array]],
              config: ml_collections.ConfigDict, split: str, mesh,
              desc: str = 'features') -> dict[str, np.ndarray]:
  """Applies a jitted `fn` to every image of a dataset split (one pass, padding dropped).

  Returns `fn`'s outputs for the real examples plus their `label`s, on every process.
  """
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = _eval_batch_size(config, mesh)
  ds = input_pipeline.create_dataset(data_config, split, train=False, seed=config.seed)
  outputs = []
  for local in observe.progress(ds.as_numpy_iterator(), total=observe.known_length(ds),
                                desc=f'{desc} ({split})'):
    batch = sharding.global_batch(local, mesh)
    out = _gather({**fn(batch['image']), 'label': batch['label'], 'mask': batch['mask']})
    keep = out.pop('mask') > 0
    outputs.append({k: v[keep] for k, v in out.items()})
  return _concat(outputs)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 pixels [..., C] -> float32 in [-1, 1] (the inverse of `postprocess`)."""
  return images.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- classifier --

REAL_CLASSIFIER_FEATURES = 'real_classifier_features.npz'


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
  """A trained feature classifier and what is known about it.

  Attributes:
    model: the Flax module. params: its parameters (replicated on the mesh).
    test_accuracy: accuracy on the eval split. directory: where it is cached.
    trained: whether this call trained it (False: loaded from the cache).
  """

  model: nn.Module
  params: Any
  test_accuracy: float
  directory: str
  trained: bool


def classifier_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The cache directory of the classifier for this dataset and classifier config.

  Runs that share `config.eval.classifier_dir` share one classifier (and its real-data
  features) per distinct dataset and classifier setting.
  """
  root = config.eval.classifier_dir or os.path.join(stages.eval_dir(workdir), 'classifier')
  d = config.data
  key = {'data': [d.name, d.image_size, d.num_channels, d.train_split, d.eval_split,
                  d.image_key, d.label_key,
                  *([d.folder] if d.name == input_pipeline.FOLDER else [])],
         'classifier': {k: v for k, v in config.eval.to_dict().items()
                        if k.startswith('classifier_') and k != 'classifier_dir'}}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.join(root, f'{re.sub(r"[^A-Za-z0-9_.-]", "_", d.name)}_{digest}')


def _classifier_train_step(state: TrainState, batch: dict[str, jax.Array], *,
                           model: nn.Module) -> tuple[TrainState, jax.Array]:
  def loss_fn(params):
    logits, _ = model.apply({'params': params}, batch['image'])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads, ema_decay=0.0), loss


def _classifier_setup(config: ml_collections.ConfigDict, mesh, num_classes: int):
  c = config.eval
  model = models.Classifier(num_classes=num_classes, channels=tuple(c.classifier_channels),
                            num_features=c.classifier_features)
  tx, _ = optim.make_optimizer(c.classifier_optim, c.classifier_steps)
  rng_params, rng_state = jax.random.split(jax.random.PRNGKey(c.classifier_seed))
  shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)

  def init():
    params = model.init(rng_params, jnp.zeros(shape))['params']
    return create_train_state(params, tx, rng_state)

  init = jax.jit(init, out_shardings=sharding.replicated(mesh))
  abstract = checkpointing.abstract_like(jax.eval_shape(init), sharding.replicated(mesh))
  return model, init, abstract


def _classify_fn(model: nn.Module, params, mesh):
  apply = jax.jit(lambda p, x: dict(zip(('logits', 'features'), model.apply({'params': p}, x))),
                  in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
                  out_shardings=sharding.data_sharding(mesh))
  return functools.partial(apply, params)


def load_or_train_classifier(config: ml_collections.ConfigDict, workdir: str,
                             mesh) -> TrainedClassifier:
  """The dataset's feature classifier: from its cache, else trained and cached.

  Trained with `config.eval.classifier_*` on the train split, seeded by
  `config.eval.classifier_seed` (not `config.seed`, so that runs with different seeds
  are measured in the same feature space).

  Raises:
    UserError: the dataset has no class labels.
  """
  num_classes = input_pipeline.dataset_info(config.data).num_classes
  if not num_classes:
    raise UserError(f'dataset {config.data.name!r} has no class labels to train the '
                    f'evaluation classifier on (data.label_key={config.data.label_key!r})')
  directory = classifier_directory(config, workdir)
  model, init, abstract = _classifier_setup(config, mesh, num_classes)
  steps = config.eval.classifier_steps
  manager = checkpointing.make_manager(os.path.join(directory, 'checkpoints'), keep=1)
  info_path = os.path.join(directory, 'info.json')
  if manager.latest_step() == steps and fileio.exists(info_path):
    accuracy = fileio.read_json(info_path)['test_accuracy']
    params = checkpointing.restore(manager, abstract).params
    _say(f'classifier: loaded from {directory} (test accuracy {accuracy:.4f})')
    return TrainedClassifier(model, params, accuracy, directory, trained=False)

  sharding.check_batch_size(config.eval.classifier_batch_size, mesh,
                            'eval.classifier_batch_size')
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = config.eval.classifier_batch_size
  ds = input_pipeline.create_dataset(data_config, config.data.train_split, train=True,
                                     seed=config.eval.classifier_seed)
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  step_fn = jax.jit(functools.partial(_classifier_train_step, model=model),
                    in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                    donate_argnums=0)
  state = init()
  start = time.perf_counter()
  for _, local in observe.progress(zip(range(steps), ds.as_numpy_iterator()), total=steps,
                                  desc='classifier', unit='step'):
    state, loss = step_fn(state, sharding.global_batch(
        {'image': local['image'], 'label': local['label']}, mesh))
    # One step in flight: with several CPU devices, queued steps' all-reduces were seen
    # to deadlock XLA's rendezvous; the step is tiny, so waiting costs little.
    loss.block_until_ready()
  seconds = time.perf_counter() - start
  classify = _classify_fn(model, state.params, mesh)
  test = map_split(lambda x: {'logits': classify(x)['logits']}, config,
                   config.data.eval_split, mesh)
  accuracy = float(np.mean(np.argmax(test['logits'], axis=-1) == test['label']))
  checkpointing.save(manager, state)
  checkpointing.finish(manager)  # A failed write: one line, no hang.
  if jax.process_index() == 0:
    stale = os.path.join(directory, REAL_CLASSIFIER_FEATURES)
    if fileio.exists(stale):  # Features of an earlier classifier.
      fileio.remove(stale)
    _write_json(info_path, {'test_accuracy': accuracy, 'num_train_steps': steps,
                            'final_loss': float(loss), 'train_seconds': seconds,
                            'num_test_examples': len(test['label'])})
  _say(f'classifier: trained {steps} steps in {seconds:.1f}s, test accuracy {accuracy:.4f} '
       f'({config.data.eval_split} split); cached in {directory}')
  return TrainedClassifier(model, state.params, accuracy, directory, trained=True)


# -------------------------------------------------------------- small helpers --


def _say(line: str) -> None:
  """Logs and prints (process 0 only) one line a user should see."""
  logging.info('%s', line)
  if jax.process_index() == 0:
    print(line, flush=True)


def _write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically: a reader never sees half a file."""
  fileio.write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def _cached_arrays(path: str, compute: Callable[[], dict[str, np.ndarray]]):
  """`compute()`'s arrays, cached as an npz at `path` (written by process 0)."""
  if fileio.exists(path):
    return fileio.load_npz(path)
  arrays = compute()
  if jax.process_index() == 0:
    fileio.save_npz(path, **arrays)
  return arrays


# ------------------------------------------------------------------ evaluate --


def _real_features(config: ml_collections.ConfigDict, mesh, path: str,
                   fn: Callable[[jax.Array], dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  """`fn`'s outputs on the train and eval splits, as `train_<key>` / `test_<key>`, cached."""
  def compute():
    arrays = {}
    for prefix, split in (('train', config.data.train_split), ('test', config.data.eval_split)):
      arrays.update({f'{prefix}_{k}': v for k, v in map_split(fn, config, split, mesh).items()})
    return arrays
  return _cached_arrays(path, compute)


def _with_real(metrics: dict[str, float], name: str, metric: Callable, fake, test, train) -> None:
  """metrics[name] = metric(fake, train); metrics[name + '_real'] = metric(test, train)."""
  metrics[name] = metric(fake, train)
  metrics[f'{name}_real'] = metric(test, train)


def _feature_metrics(metrics: dict[str, float], prefix: str, fake: np.ndarray,
                     test: np.ndarray, train: np.ndarray, config: ml_collections.ConfigDict,
                     *, kid: bool) -> None:
  """Fréchet distance (and KID, or precision/recall) of `fake` and of `test` vs `train`."""
  _with_real(metrics, f'fd_{prefix}' if prefix != 'inception' else 'fid', frechet_distance_of,
             fake, test, train)
  if kid:
    kid_fn = functools.partial(kernel_inception_distance, num_subsets=config.eval.kid_subsets,
                               subset_size=config.eval.kid_subset_size, seed=config.seed)
    for name, a in (('kid', fake), ('kid_real', test)):
      metrics[name], metrics[name.replace('kid', 'kid_std')] = kid_fn(a, train)
  else:
    for name, a in (('', fake), ('_real', test)):
      metrics[f'precision{name}'], metrics[f'recall{name}'] = precision_recall(
          train, a, k=config.eval.pr_k)


def _reconstruction_fn(autoencoder: nn.Module, ae_params, classifier: TrainedClassifier | None,
                       mesh, lpips_params=None, inception_model=None
                       ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """images -> per-image PSNR and SSIM of their reconstructions (+ classifier features).

  With `lpips_params` also their LPIPS; with `inception_model` = (network, params) their
  pool3 features (`inception`, for rFID); for a VQ model the code indices (`codes`).
  """
  is_vq = isinstance(autoencoder, models.VQModel)
  network, inception_params = inception_model or (None, None)

  def fn(ae_params, classifier_params, lpips_params, inception_params, x):
    outputs = autoencoder.apply({'params': ae_params}, x)
    y = jnp.clip(outputs[0], -1.0, 1.0)
    out = {'psnr': psnr(y, x, 2.0), 'ssim': ssim(y, x, 2.0)}
    if classifier is not None:
      out['features'] = classifier.model.apply({'params': classifier_params}, y)[1]
    if lpips_params is not None:
      out['lpips'] = perceptual.lpips_fn(lpips_params, y, x)
    if network is not None:
      out['inception'] = network.apply({'params': inception_params}, y)
    if is_vq:
      out['codes'] = outputs[2].reshape(x.shape[0], -1)
    return out

  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  fn = jax.jit(fn, in_shardings=(replicated, replicated, replicated, replicated, data),
               out_shardings=data)
  return functools.partial(fn, ae_params, classifier.params if classifier else None,
                           lpips_params, inception_params)


def load_lpips_metric(config: ml_collections.ConfigDict):
  """LPIPS params from `config.autoencoder.lpips_*_weights`, or None (with a note) if unset."""
  vgg, lin = config.autoencoder.lpips_vgg_weights, config.autoencoder.lpips_lin_weights
  if not (vgg and lin):
    _say('ae_lpips: skipped, no LPIPS weights (set config.autoencoder.lpips_vgg_weights and '
         'config.autoencoder.lpips_lin_weights; see README, First stage)')
    return None
  return perceptual.load_lpips(vgg, lin)[1]


def reconstruction_metrics(config: ml_collections.ConfigDict, mesh, autoencoder: nn.Module,
                           ae_params, *, classifier: TrainedClassifier | None = None,
                           lpips_params=None, inception_model=None,
                           real_inception: np.ndarray | None = None) -> tuple[dict, dict]:
  """Stage-1 metrics on the eval split: `ae_psnr`, `ae_ssim`, and when available
  `ae_lpips`, `ae_rfid` (pool3 of reconstructions vs `real_inception`, the eval split's),
  `ae_codebook_usage` and `ae_codebook_perplexity` (VQ models).

  Returns:
    (metrics, the per-image outputs of `_reconstruction_fn`).
  """
  recon = map_split(_reconstruction_fn(autoencoder, ae_params, classifier, mesh, lpips_params,
                                       inception_model), config, config.data.eval_split, mesh,
                     desc='stage-1 metrics')
  metrics = {'ae_psnr': float(np.mean(recon['psnr'])), 'ae_ssim': float(np.mean(recon['ssim']))}
  if 'lpips' in recon:
    metrics['ae_lpips'] = float(np.mean(recon['lpips']))
  if 'inception' in recon and real_inception is not None:
    metrics['ae_rfid'] = frechet_distance_of(recon['inception'], real_inception)
  if 'codes' in recon:
    stats = codebook_statistics(jnp.asarray(recon['codes']), autoencoder.num_vq_embeddings)
    metrics.update({f'ae_{k}': float(v) for k, v in stats.items()})
  return metrics, recon


def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh, denoiser: nn.Module, state,
             autoencoder: nn.Module, ae_params) -> dict[str, float]:
  """Sample and reconstruction metrics of a trained run; real-vs-real values beside them.

  Generates `config.eval.num_samples` samples with `config.sample`'s sampler (class
  rows cycling through the labels for a class-conditional model) from the EMA
  parameters of `state`, and compares them with the train split: `fd_classifier`,
  `precision`, `recall`, `class_accuracy` (conditional models) in the space of the
  dataset's classifier; `fid`, `kid`, `kid_std` when `config.eval.inception_weights`
  is set. The autoencoder reconstructs the eval split: `ae_psnr`, `ae_ssim`,
  `ae_fd_classifier`, and (see `reconstruction_metrics`) `ae_lpips`, `ae_rfid`,
  `ae_codebook_usage`, `ae_codebook_perplexity` when they apply. Each metric with a
  real-data counterpart also has `<name>_real`: the eval split in place of the samples.

  A model with a conditioner is conditioned on the first eval-split examples (their
  captions, contexts, low-resolution images), and `class_accuracy` checks the
  class each condition names. A `concat` (super-resolution) model also
  super-resolves the whole eval split: `superres_psnr`, `superres_ssim`, and
  `bicubic_psnr`, `bicubic_ssim` of bicubic upsampling (see `ldm_jax.superres`).

  Returns:
    Flat dict of metric name -> float, plus `classifier_test_accuracy` and
    `sampling_seconds_per_image` (wall time of sampling and decoding, see
    `generate.Sampler.seconds_per_image`).
  """
  batch_size = _eval_batch_size(config, mesh)
  metrics: dict[str, float] = {}
  labelled = input_pipeline.dataset_info(config.data).num_classes > 0
  cache_dir = classifier_directory(config, workdir)

  if config.eval.inception_weights:  # A bad file stops here, before minutes of sampling.
    network, inception_params = inception.load_inception(config.eval.inception_weights)
  else:
    _say('fid/kid: skipped, no Inception weights (set config.eval.inception_weights to '
         f'{inception.WEIGHTS_FILE}; see README, Evaluation)')

  sampler = generate.Sampler(config, mesh, denoiser, autoencoder)
  conditions = None
  if conditioning.spec(config).from_eval_split:  # Conditioned on the eval split's examples.
    vocabulary = conditioning.load_or_build_vocabulary(
        config, stages.vocabulary_path(workdir), build=False)
    conditions, condition_labels = conditioning.eval_conditions(
        config, vocabulary, config.eval.num_samples)
  pixels, labels = sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                    num_samples=config.eval.num_samples, conditions=conditions)
  metrics['sampling_seconds_per_image'] = sampler.seconds_per_image
  if conditions is not None and labelled:
    labels = condition_labels  # The class each condition names (a caption's digit).
  samples = to_model_range(pixels)

  if conditioning.spec(config).super_resolution:
    outputs = superres.superres_outputs(config, workdir, sampler, state, ae_params)
    originals = to_model_range(outputs['originals'])
    for name in ('superres', 'bicubic'):
      images = to_model_range(outputs[name])
      metrics[f'{name}_psnr'] = float(np.mean(psnr(images, originals, 2.0)))
      metrics[f'{name}_ssim'] = float(np.mean(ssim(images, originals, 2.0)))

  classifier = None
  if labelled:
    classifier = load_or_train_classifier(config, workdir, mesh)
    metrics['classifier_test_accuracy'] = classifier.test_accuracy
    classify = _classify_fn(classifier.model, classifier.params, mesh)
    real_classifier = _real_features(
        config, mesh, os.path.join(cache_dir, REAL_CLASSIFIER_FEATURES), classify)
    fake = map_images(classify, samples, mesh, batch_size, desc='features (classifier)')
    _feature_metrics(metrics, 'classifier', fake['features'], real_classifier['test_features'],
                     real_classifier['train_features'], config, kid=False)
    if labels is not None:
      metrics['class_accuracy'] = float(np.mean(np.argmax(fake['logits'], -1) == labels))
      metrics['class_accuracy_real'] = classifier.test_accuracy
  else:
    _say(f'classifier metrics: skipped, dataset {config.data.name!r} has no class labels')

  if config.eval.inception_weights:
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    pool3 = jax.jit(lambda p, x: {'features': network.apply({'params': p}, x)},
                    in_shardings=(replicated, data), out_shardings=data)
    pool3 = functools.partial(pool3, jax.device_put(inception_params, replicated))
    digest = inception.file_sha256(config.eval.inception_weights)[:12]
    real = _real_features(config, mesh, os.path.join(cache_dir, f'real_inception_{digest}.npz'),
                          pool3)
    fake = map_images(pool3, samples, mesh, batch_size, desc='features (Inception)')['features']
    _feature_metrics(metrics, 'inception', fake, real['test_features'], real['train_features'],
                     config, kid=True)

  ae_metrics, recon = reconstruction_metrics(
      config, mesh, autoencoder, ae_params, classifier=classifier,
      lpips_params=load_lpips_metric(config),
      inception_model=(network, inception_params) if config.eval.inception_weights else None,
      real_inception=real['test_features'] if config.eval.inception_weights else None)
  metrics.update(ae_metrics)
  if labelled:
    _with_real(metrics, 'ae_fd_classifier', frechet_distance_of, recon['features'],
               real_classifier['test_features'], real_classifier['train_features'])
  return metrics


# ------------------------------------------------------------- reporting --

# Metrics printed first, in this order; any others follow alphabetically.
REPORT_ORDER = ('fd_classifier', 'precision', 'recall', 'class_accuracy', 'fid', 'kid',
                'kid_std', 'ae_psnr', 'ae_ssim', 'ae_lpips', 'ae_rfid', 'ae_fd_classifier',
                'ae_codebook_usage', 'ae_codebook_perplexity')


def format_metrics(metrics: dict[str, float]) -> list[str]:
  """One line per metric, its real-vs-real value beside it when there is one."""
  names = [n for n in metrics if not n.endswith('_real') and n != 'classifier_test_accuracy']
  names.sort(key=lambda n: (REPORT_ORDER.index(n) if n in REPORT_ORDER else len(REPORT_ORDER),
                            n))
  width = max(map(len, names), default=0)
  lines = []
  for name in names:
    line = f'{name:<{width}}  {metrics[name]:.4f}'
    if f'{name}_real' in metrics:
      line += f'  (real vs real: {metrics[f"{name}_real"]:.4f})'
    lines.append(line)
  return lines


def run_evaluation(config: ml_collections.ConfigDict, workdir: str, mesh, denoiser: nn.Module,
                   state, autoencoder: nn.Module, ae_params, writer=None) -> dict:
  """`evaluate`, then print the metrics and write `WORKDIR/eval/metrics_<step>.json`.

  Every process computes; process 0 prints and writes, and adds `eval/<name>`
  scalars to `writer` (a TensorBoard writer) when given.

  Returns:
    The record written: the metrics plus `step`, `num_samples` and the sampler settings.
  """
  step = int(jax.device_get(state.step))
  start = time.perf_counter()
  metrics = evaluate(config, workdir, mesh, denoiser, state, autoencoder, ae_params)
  record = {**metrics, 'step': step, 'num_samples': config.eval.num_samples,
            'eval_seconds': time.perf_counter() - start,
            **{f'sample_{k}': v for k, v in config.sample.to_dict().items()
               if k in ('method', 'num_steps', 'eta', 'guidance_scale', 'timestep_spacing',
                        'ddpm_variance', 'seed')}}
  if jax.process_index() == 0:
    path = stages.metrics_path(workdir, step)
    _write_json(path, record)
    print(f'eval at step {step} ({config.eval.num_samples} samples vs the '
          f'{config.data.train_split} split; real vs real: {config.data.eval_split} vs '
          f'{config.data.train_split}):')
    for line in format_metrics(metrics):
      print(f'  {line}')
    print(f'eval: metrics in {path}', flush=True)
    if writer is not None:
      for name, value in metrics.items():
        writer.scalar(f'eval/{name}', value, step)
      writer.flush()
  return record
