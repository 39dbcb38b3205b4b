"""Latent cache: --mode=encode, reuse, resume, rebuild on change, and stage 2 from it."""
import functools
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from ldm_jax import builders, checkpointing, input_pipeline, latent_cache, modes, sharding, train
from ldm_jax import optim, stages


def _config(data_dir):
  from configs import tiny

  config = tiny.get_config()
  config.data.update(data_dir=data_dir, train_split='train[:200]')
  config.diffusion.cache_shard_size = 64  # 4 batches of 16 per shard: 64, 64, 64, 8 examples.
  return config


def _mtimes(directory):
  return {name: os.stat(os.path.join(directory, name)).st_mtime_ns
          for name in sorted(os.listdir(directory))}


@pytest.fixture(scope='module')
def encoded(digits_data_dir, tmp_path_factory):
  """A workdir with a saved stage-1 checkpoint, encoded once by --mode=encode."""
  config = _config(digits_data_dir)
  workdir = str(tmp_path_factory.mktemp('encode'))
  autoencoder = builders.build_autoencoder(config)
  tx, _ = optim.make_optimizer(config.autoencoder.optim, 1)
  state = jax.jit(functools.partial(stages.init_autoencoder_state, config, autoencoder, tx))()
  manager = checkpointing.make_manager(
      os.path.join(workdir, 'autoencoder', 'checkpoints'), keep=1)
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  modes.run('encode', config, workdir)
  return config, workdir, autoencoder, state.ema_params


def _copy(encoded, tmp_path):
  config, workdir, autoencoder, params = encoded
  shutil.copytree(workdir, tmp_path / 'run')
  return config.copy_and_resolve_references(), str(tmp_path / 'run'), autoencoder, params


def _first_images(config, count):
  ds = input_pipeline.create_dataset(config.data, config.data.train_split, train=False, seed=0)
  batch = next(ds.as_numpy_iterator())
  return batch['image'][:count], batch['label'][:count]


def test_encode_mode_writes_shards_of_the_encoder_posterior(encoded):
  config, workdir, autoencoder, params = encoded
  directory = stages.latents_dir(workdir)
  names = sorted(os.listdir(directory))
  assert [n for n in names if n.startswith('shard-')] == [
      f'shard-p00000-{i:06d}.npz' for i in range(4)]
  assert 'done-p00000.json' in names and 'fingerprint.json' in names
  arrays = latent_cache.load(directory)
  assert len(arrays['label']) == 200
  assert arrays['latent_mean'].shape == (200, *builders.latent_shape(config))
  images, labels = _first_images(config, 16)
  mean, logvar = jax.jit(functools.partial(latent_cache.encode_posterior,
                                           autoencoder=autoencoder))(params, images)
  np.testing.assert_allclose(arrays['latent_mean'][:16], mean, atol=1e-5)
  np.testing.assert_allclose(arrays['latent_logvar'][:16], logvar, atol=1e-5)
  np.testing.assert_array_equal(arrays['label'][:16], labels)


def test_second_call_reuses_the_cache(encoded, caplog):
  config, workdir, autoencoder, params = encoded
  before = _mtimes(stages.latents_dir(workdir))
  mesh = sharding.make_mesh()
  with caplog.at_level(logging.INFO, logger='absl'):
    latent_cache.build(config, workdir, mesh, autoencoder, params)
  assert 'reusing the cache' in caplog.text
  assert _mtimes(stages.latents_dir(workdir)) == before


def test_a_killed_build_keeps_finished_shards_and_redoes_the_rest(encoded, tmp_path, caplog):
  config, workdir, autoencoder, params = _copy(encoded, tmp_path)
  directory = stages.latents_dir(workdir)
  expected = latent_cache.load(directory)
  for name in ('shard-p00000-000002.npz', 'shard-p00000-000003.npz', 'done-p00000.json'):
    os.remove(os.path.join(directory, name))
  with open(os.path.join(directory, 'shard-p00000-000002.npz.tmp'), 'wb') as f:
    f.write(b'half a shard')
  kept = _mtimes(directory)
  with caplog.at_level(logging.INFO, logger='absl'):
    latent_cache.build(config, workdir, sharding.make_mesh(), autoencoder, params)
  assert 'resuming the cache' in caplog.text
  after = _mtimes(directory)
  for name in ('shard-p00000-000000.npz', 'shard-p00000-000001.npz', 'fingerprint.json'):
    assert after[name] == kept[name]
  assert not any(name.endswith('.tmp') for name in after)
  jax.tree.map(np.testing.assert_array_equal, latent_cache.load(directory), expected)


@pytest.mark.parametrize('change, reason', [
    ('params', 'autoencoder_params_sha256 changed'),
    ('random_flip', 'data.random_flip changed'),
])
def test_a_changed_autoencoder_or_preprocessing_rebuilds(encoded, tmp_path, caplog, change,
                                                         reason):
  config, workdir, autoencoder, params = _copy(encoded, tmp_path)
  directory = stages.latents_dir(workdir)
  old = latent_cache.load(directory)
  if change == 'params':
    params = jax.tree.map(lambda p: p * 1.01, params)
  else:
    config.data.random_flip = True
  with caplog.at_level(logging.INFO, logger='absl'):
    latent_cache.build(config, workdir, sharding.make_mesh(), autoencoder, params)
  assert f'building the cache in {directory} ({reason}' in caplog.text
  new = latent_cache.load(directory)
  np.testing.assert_array_equal(new['label'], old['label'])
  if change == 'params':
    assert np.abs(new['latent_mean'] - old['latent_mean']).max() > 1e-4
  else:  # Unflipped posteriors are unchanged; mirrored images get their own.
    np.testing.assert_array_equal(new['latent_mean'], old['latent_mean'])
    images, _ = _first_images(config, 4)
    mean, _ = autoencoder.apply({'params': params}, images[:, :, ::-1],
                                method=autoencoder.encode)
    np.testing.assert_allclose(new['latent_mean_flipped'][:4], mean, atol=1e-5)


def test_processes_read_contiguous_slices_of_all_shards(encoded):
  directory = stages.latents_dir(encoded[1])
  whole = latent_cache.load(directory, 0, 1)
  parts = [latent_cache.load(directory, p, 3) for p in range(3)]
  assert [len(p['label']) for p in parts] == [66, 67, 67]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def _toy_arrays(n=10):
  mean = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
  return {'latent_mean': mean, 'latent_logvar': np.zeros_like(mean),
          'latent_mean_flipped': -mean, 'latent_logvar_flipped': np.ones_like(mean),
          'label': np.arange(n, dtype=np.int32)}


def test_batches_shuffle_every_epoch_and_resume_exactly():
  arrays = _toy_arrays()
  stream = latent_cache.batches(arrays, 4, seed=3)
  labels = np.concatenate([next(stream)['label'] for _ in range(10)])  # 4 epochs.
  epochs = labels.reshape(4, 10)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert len({tuple(e) for e in epochs}) == 4  # A new order every epoch.
  resumed = latent_cache.batches(arrays, 4, seed=3, start_step=7)
  np.testing.assert_array_equal(next(resumed)['label'], labels[28:32])
  other_seed = next(latent_cache.batches(arrays, 4, seed=4))['label']
  assert not np.array_equal(other_seed, labels[:4])


def test_batches_pick_mirrored_posteriors_half_of_the_time():
  arrays = _toy_arrays(1000)
  batch = next(latent_cache.batches(arrays, 1000, seed=0, random_flip=True))
  flipped = batch['latent_logvar'][:, 0, 0, 0] == 1
  assert 0.45 < flipped.mean() < 0.55
  expected = np.where(flipped, -batch['label'], batch['label'])
  np.testing.assert_array_equal(batch['latent_mean'][:, 0, 0, 0], expected)


def test_stage_two_trains_from_the_cache_with_its_whole_set_scale(encoded, tmp_path):
  config, workdir, autoencoder, params = _copy(encoded, tmp_path)
  config.diffusion.cache_latents = True
  config.diffusion.num_train_steps = 2
  before = _mtimes(stages.latents_dir(workdir))
  _, state = train.train_diffusion(config, workdir, sharding.make_mesh(), autoencoder, params)
  assert int(state.step) == 2
  assert _mtimes(stages.latents_dir(workdir)) == before  # Reused, not rebuilt.
  arrays = latent_cache.load(stages.latents_dir(workdir))
  mean, logvar = arrays['latent_mean'].astype(np.float64), arrays['latent_logvar']
  variance = np.mean(mean**2 + np.exp(logvar)) - np.mean(mean) ** 2
  np.testing.assert_allclose(float(state.scale_factor), 1 / np.sqrt(variance), rtol=1e-5)
  first_batch = latent_cache.scale_factor_from_moments(
      latent_cache.posterior_moments(mean[:16], logvar[:16]))
  assert abs(first_batch - float(state.scale_factor)) > 1e-4
