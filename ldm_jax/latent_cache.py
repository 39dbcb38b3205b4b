"""Latent cache: the train split encoded once by the frozen autoencoder.

Stage 2 then reads encoder posteriors instead of running the encoder every step, and
still draws a fresh latent z = mean + std * noise per step (inside the train step).

Layout of `WORKDIR/latents/`:
  fingerprint.json      what the latents depend on (see `fingerprint`) and the shard
                        layout; a cache whose fingerprint differs is rebuilt.
  shard-pP-I.npz        process P's I-th shard: `latent_mean`, `latent_logvar`
                        float32 [n, h, w, c], `label` int32 [n] and the
                        conditioner's features (`conditioning.batch_keys`: tokens
                        of the first caption, a context, a low-resolution image);
                        with `data.random_flip` also `latent_mean_flipped` and
                        `latent_logvar_flipped`, the posteriors of the mirrored images
                        (image-shaped features are mirrored with them when read).
  done-pP.json          written once process P has encoded all of its part:
                        its shard files and their example counts.

Every file is written to a temporary name and renamed, so a killed run leaves only
whole shards; rerunning keeps them and encodes the rest. Each process writes the
shards of its own part of the split and, when training, reads a contiguous slice of
all shards (so the reading topology may differ from the writing one).
"""
import functools
import hashlib
import json
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from ldm_jax import conditioning, fileio, input_pipeline, observe, sharding, stages, text
from ldm_jax.errors import UserError

Arrays = dict[str, np.ndarray]

_FINGERPRINT_FILE = 'fingerprint.json'
_FORMAT_VERSION = 1
# The `config.data` fields that change the images the encoder sees.
_PREPROCESSING_FIELDS = ('image_size', 'num_channels', 'random_flip', 'image_key', 'label_key')


def params_sha256(params) -> str:
  """Hash of a parameter pytree: names, dtypes, shapes and values of every leaf."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def fingerprint(config: ml_collections.ConfigDict, ae_params,
                vocabulary: text.Vocabulary | None = None) -> dict:
  """Everything the cached posteriors and features depend on, as JSON-compatible data.

  The autoencoder (parameter hash, architecture, compute dtype), the dataset (name
  and split, and an image folder's path and file names; not `data_dir`, which only
  says where the same data lives), the preprocessing fields of `config.data`, and
  the conditioner's config section and vocabulary.
  """
  data = config.data
  c = config.diffusion.conditioning
  features = {'name': c.name, 'keys': list(conditioning.batch_keys(config)),
              'config': c[c.name].to_dict() if c.name in c else None,
              'vocabulary': list(vocabulary.tokens) if vocabulary else None}
  return json.loads(json.dumps({
      'format_version': _FORMAT_VERSION,
      'autoencoder_params_sha256': params_sha256(ae_params),
      'autoencoder_model': config.autoencoder.model.to_dict(),
      'autoencoder_compute_dtype': config.autoencoder.compute_dtype,
      'dataset': data.name,
      # An image folder's identity: its path and the names of its files.
      **input_pipeline.source_identity(data),
      'split': data.train_split,
      **{f'data.{name}': data[name] for name in _PREPROCESSING_FIELDS},
      'conditioning': features,
  }))  # The round trip turns tuples into lists, as they read back from the file.


def _layout(config: ml_collections.ConfigDict) -> dict:
  """Shard layout; it matters only to resume a partly written cache."""
  local_batch = config.data.batch_size // jax.process_count()
  batches_per_shard = max(1, config.diffusion.cache_shard_size // local_batch)
  return {'process_count': jax.process_count(), 'local_batch_size': local_batch,
          'batches_per_shard': batches_per_shard}


def _read_json(path: str) -> dict | None:
  try:
    return fileio.read_json(path)
  except (*fileio.ERRORS, ValueError):
    return None


def _write_json(path: str, value: dict) -> None:
  fileio.write_json(path, value)


def _shard_name(process: int, index: int) -> str:
  return f'shard-p{process:05d}-{index:06d}.npz'


def _done_name(process: int) -> str:
  return f'done-p{process:05d}.json'


def _is_complete(directory: str, layout: dict) -> bool:
  return all(fileio.exists(os.path.join(directory, _done_name(p)))
             for p in range(layout['process_count']))


def _plan(directory: str, expected: dict, layout: dict) -> tuple[str, str]:
  """What to do with `directory`: ('reuse' | 'resume' | 'build', reason to log)."""
  stored = _read_json(os.path.join(directory, _FINGERPRINT_FILE))
  if stored is None:
    return 'build', 'no cache yet'
  changed = sorted(k for k in expected.keys() | stored['fingerprint'].keys()
                   if expected.get(k) != stored['fingerprint'].get(k))
  if changed:
    return 'build', f'{", ".join(changed)} changed since it was written'
  if _is_complete(directory, stored['layout']):
    return 'reuse', 'fingerprint matches'
  if stored['layout'] != layout:
    return 'build', 'a partly written cache has another shard layout'
  return 'resume', 'partly written'


def _wipe(directory: str) -> None:
  for name in fileio.listdir(directory):
    if name == _FINGERPRINT_FILE or name.startswith(('shard-', 'done-')):
      fileio.remove(os.path.join(directory, name))


def encode_posterior(ae_params, images: jax.Array, *, autoencoder: nn.Module,
                     flip: bool = False) -> tuple[jax.Array, jax.Array]:
  """(mean, logvar) of the frozen encoder for images [B, H, W, C], optionally mirrored."""
  if flip:
    images = images[:, :, ::-1, :]
  return autoencoder.apply({'params': ae_params}, images, method=autoencoder.encode)


def _encode_part(config: ml_collections.ConfigDict, directory: str, mesh,
                 autoencoder: nn.Module, ae_params, layout: dict,
                 vocabulary: text.Vocabulary | None) -> None:
  """Encodes this process's part of the train split into shards it has not written yet."""
  process = jax.process_index()
  for name in fileio.listdir(directory):  # A shard being written when the run was killed.
    if name.endswith('.tmp') and name.startswith(f'shard-p{process:05d}-'):
      fileio.remove(os.path.join(directory, name))
  num_done = 0
  while fileio.exists(os.path.join(directory, _shard_name(process, num_done))):
    num_done += 1
  if jax.process_count() > 1:
    # The encoders are collective over all processes: every process restarts from the
    # shard the slowest one reached (rewriting identical shards), so all run in lockstep.
    num_done = int(np.min(multihost_utils.process_allgather(np.array(num_done))))
  if num_done:
    logging.info('latents: keeping %d finished shard(s) of process %d', num_done, process)

  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  encoders = {
      suffix: jax.jit(functools.partial(encode_posterior, autoencoder=autoencoder, flip=flip),
                      in_shardings=(replicated, data), out_shardings=(data, data))
      for suffix, flip in [('', False)] + [('_flipped', True)] * config.data.random_flip}
  local = lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, sharding.data_sharding(mesh).spec))

  # One ordered pass over the split (eval mode: no shuffling, no flips, padded).
  ds = input_pipeline.create_dataset(
      config.data, config.data.train_split, train=False, seed=config.seed,
      features=conditioning.pipeline_features(config, vocabulary, train=False))
  feature_keys = [k for k in conditioning.batch_keys(config) if k != 'label']
  ds = ds.skip(num_done * layout['batches_per_shard'])
  pending: list[Arrays] = []
  index = num_done
  # Example counts of the shards written before (read back) and in this pass.
  counts = [len(fileio.load_npz(os.path.join(directory, _shard_name(process, i)))['label'])
            for i in range(num_done)]

  def flush():
    nonlocal pending, index
    if pending:
      shard = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
      fileio.save_npz(os.path.join(directory, _shard_name(process, index)), **shard)
      counts.append(len(shard['label']))
      index, pending = index + 1, []

  # The eval stream gives every process the same number of batches, so the jitted
  # encoders below run in lockstep over all processes.
  for batch in observe.progress(ds.as_numpy_iterator(), total=observe.known_length(ds),
                                desc='encoding latents'):
    images = sharding.global_batch({'image': batch['image']}, mesh)['image']
    keep = batch['mask'] > 0
    arrays = {'label': batch['label'][keep].astype(np.int32),
              **{k: batch[k][keep] for k in feature_keys}}
    for suffix, encode in encoders.items():
      mean, logvar = encode(ae_params, images)
      arrays[f'latent_mean{suffix}'] = local(mean)[keep]
      arrays[f'latent_logvar{suffix}'] = local(logvar)[keep]
    pending.append(arrays)
    if len(pending) == layout['batches_per_shard']:
      flush()
  flush()
  shards = [[_shard_name(process, i), int(counts[i])] for i in range(index)]
  _write_json(os.path.join(directory, _done_name(process)),
              {'num_examples': sum(n for _, n in shards), 'shards': shards})


def build(config: ml_collections.ConfigDict, workdir: str, mesh, autoencoder: nn.Module,
          ae_params) -> str:
  """Makes `WORKDIR/latents` hold the posteriors of the current autoencoder and data.

  Reuses a complete cache with the same fingerprint, resumes a partly written one,
  and rebuilds (logging why) when the fingerprint differs. Every process must call it.

  Returns:
    The cache directory.
  """
  sharding.check_batch_size(config.data.batch_size, mesh)
  directory = stages.latents_dir(workdir)
  fileio.makedirs(directory)
  vocabulary = conditioning.load_or_build_vocabulary(config, stages.vocabulary_path(workdir),
                                                     build=True)
  expected, layout = fingerprint(config, ae_params, vocabulary), _layout(config)
  action, reason = _plan(directory, expected, layout)
  # Every process has decided from the same files before process 0 changes them.
  multihost_utils.sync_global_devices('latent_cache_plan')
  if action == 'reuse':
    logging.info('latents: reusing the cache in %s (%s)', directory, reason)
    return directory
  logging.info('latents: %s the cache in %s (%s)',
               'resuming' if action == 'resume' else 'building', directory, reason)
  if jax.process_index() == 0 and action == 'build':
    _wipe(directory)
    _write_json(os.path.join(directory, _FINGERPRINT_FILE),
                {'fingerprint': expected, 'layout': layout})
  multihost_utils.sync_global_devices('latent_cache_start')
  _encode_part(config, directory, mesh, autoencoder, ae_params, layout, vocabulary)
  multihost_utils.sync_global_devices('latent_cache_done')
  logging.info('latents: %d examples cached in %s', _total_examples(directory), directory)
  return directory


def _manifests(directory: str) -> list[dict]:
  stored = _read_json(os.path.join(directory, _FINGERPRINT_FILE))
  if stored is None or not _is_complete(directory, stored['layout']):
    raise UserError(f'latent cache {directory} is incomplete; run --mode=encode')
  return [_read_json(os.path.join(directory, _done_name(p)))
          for p in range(stored['layout']['process_count'])]


def _total_examples(directory: str) -> int:
  return sum(m['num_examples'] for m in _manifests(directory))


def load(directory: str, process_index: int | None = None,
         process_count: int | None = None) -> Arrays:
  """This process's contiguous slice of all cached examples, reading only its shards."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  shards = [shard for m in _manifests(directory) for shard in m['shards']]
  total = sum(n for _, n in shards)
  lo, hi = process_index * total // process_count, (process_index + 1) * total // process_count
  parts, start = [], 0
  for name, count in shards:
    if start < hi and start + count > lo:
      shard = fileio.load_npz(os.path.join(directory, name))
      parts.append({k: v[max(lo - start, 0):hi - start] for k, v in shard.items()})
    start += count
  if not parts:
    raise UserError(f'latent cache {directory} has no examples for process {process_index}')
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def posterior_moments(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
  """[count, sum z, sum z^2] of z ~ N(mean, exp(logvar)) in expectation, over all elements."""
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  return np.array([mean.size, mean.sum(), (np.square(mean) + np.exp(logvar)).sum()])


def scale_factor_from_moments(moments: np.ndarray) -> float:
  """1 / std of the posterior draws summarized by `posterior_moments` (summed over parts)."""
  count, total, total_sq = moments
  variance = total_sq / count - (total / count) ** 2
  return float(1.0 / np.sqrt(variance))


def cached_scale_factor(arrays: Arrays) -> float:
  """1/std of posterior draws over the whole cache (all processes' slices together).

  Computed exactly from the posterior moments, Var z = E[mean^2 + exp(logvar)] -
  E[mean]^2, so it has no sampling noise.
  """
  moments = posterior_moments(arrays['latent_mean'], arrays['latent_logvar'])
  if jax.process_count() > 1:
    moments = np.asarray(multihost_utils.process_allgather(moments)).sum(axis=0)
  return scale_factor_from_moments(moments)


def batches(arrays: Arrays, local_batch_size: int, *, seed: int, start_step: int = 0,
            random_flip: bool = False) -> Iterator[Arrays]:
  """Endless local batches of `latent_mean`, `latent_logvar`, `label` (and the cached
  conditioning features) from cached arrays.

  Every epoch visits each example once in an order seeded by (seed, epoch, process);
  with `random_flip` each example's mirrored posterior is taken with probability 1/2,
  and its image-shaped features ([n, h, w, c]) are mirrored with it.
  Batch k is a function of k alone, so a run resumed at `start_step` continues the
  exact sequence of an uninterrupted one.
  """
  num_examples = len(arrays['label'])
  if num_examples < local_batch_size:
    raise UserError(f'the latent cache has {num_examples} examples for this process, fewer '
                    f'than one batch ({local_batch_size}); accepted: a smaller data.batch_size')
  process = jax.process_index()
  epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def epoch_order(epoch: int) -> tuple[np.ndarray, np.ndarray]:
    if epoch not in epochs:
      rng = np.random.default_rng([seed, epoch, process])
      epochs.clear()  # A batch spans at most two epochs; keep the newest.
      epochs[epoch] = rng.permutation(num_examples), rng.random(num_examples) < 0.5
    return epochs[epoch]

  step = start_step
  while True:
    positions = np.arange(step * local_batch_size, (step + 1) * local_batch_size)
    epoch_of = positions // num_examples
    index, flipped = np.empty_like(positions), np.zeros(positions.shape, bool)
    for epoch in np.unique(epoch_of):
      order, flips = epoch_order(int(epoch))
      rows = epoch_of == epoch
      index[rows] = order[positions[rows] % num_examples]
      flipped[rows] = flips[positions[rows] % num_examples]
    batch = {}
    for key in arrays:
      if key.startswith('latent_'):
        continue
      values = arrays[key][index]
      if random_flip and values.ndim == 4:  # An image-shaped feature follows the flip.
        values = np.where(flipped[:, None, None, None], values[:, :, ::-1], values)
      batch[key] = values
    for key in ('latent_mean', 'latent_logvar'):
      values = arrays[key][index]
      if random_flip:
        values = np.where(flipped[:, None, None, None], arrays[f'{key}_flipped'][index], values)
      batch[key] = values
    yield batch
    step += 1
