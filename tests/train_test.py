"""Train steps and the stage loop: learning, sharding parity, checkpoints, NaN safety."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import builders, checkpointing, diffusion, input_pipeline, losses, sharding, train
from ldm_jax import optim, stages
from ldm_jax.errors import UserError


def _first_batch(config):
  ds = input_pipeline.create_dataset(config.data, config.data.train_split, train=True,
                                     seed=config.seed)
  batch = next(ds.as_numpy_iterator())
  return {'image': batch['image'], 'label': batch['label']}


@pytest.fixture(scope='module')
def setup(digits_data_dir):
  from configs import tiny

  config = tiny.get_config()
  config.data.data_dir = digits_data_dir
  autoencoder = builders.build_autoencoder(config)
  unet = builders.build_denoiser(config, 10)
  ae_tx, ae_lr = optim.make_optimizer(config.autoencoder.optim, 100)
  ae_state = jax.jit(functools.partial(stages.init_autoencoder_state, config, autoencoder, ae_tx))()
  return config, autoencoder, unet, ae_state, ae_lr, _first_batch(config)


def _diffusion_step(config, unet, mesh, num_train_steps=100):
  tx, lr = optim.make_optimizer(config.diffusion.optim, num_train_steps)
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  step = jax.jit(functools.partial(train.diffusion_train_step, denoiser=unet,
                                   config=config, lr_schedule=lr),
                 in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated))
  return tx, step


def _posterior_batch(ae_params, batch, autoencoder, mesh):
  return sharding.global_batch(
      jax.device_get(train.encode_batch(ae_params, batch, autoencoder=autoencoder)), mesh)


def _init_diffusion_state(config, unet, tx, mesh):
  init = functools.partial(stages.init_diffusion_state, config, unet, tx, 1.0)
  return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def test_autoencoder_reconstruction_improves(setup):
  config, autoencoder, _, state, lr, batch = setup
  mesh = sharding.make_mesh(jax.devices()[:1])  # Fast; sharding is tested below.
  replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  step = jax.jit(functools.partial(train.autoencoder_train_step, model=autoencoder,
                                   config=config, lr_schedule=lr),
                 in_shardings=(replicated, data), out_shardings=(replicated, replicated))
  batch = sharding.global_batch(batch, mesh)
  losses_seen = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics['reconstruction_loss']))
  assert int(state.step) == 40
  assert losses_seen[-1] < 0.6 * losses_seen[0], losses_seen


def test_diffusion_loss_falls_from_closed_form_start(setup):
  """A zero-initialized eps-predictor has loss E[eps²] = 1; training must beat it."""
  config, autoencoder, unet, ae_state, _, batch = setup
  mesh = sharding.make_mesh(jax.devices()[:1])
  schedule = builders.make_schedule(config)
  tx, step = _diffusion_step(config, unet, mesh)
  state = _init_diffusion_state(config, unet, tx, mesh)
  posterior = _posterior_batch(ae_state.params, batch, autoencoder, mesh)
  z0 = posterior['latent_mean'] + jnp.exp(0.5 * posterior['latent_logvar']) * jax.random.normal(
      jax.random.PRNGKey(1), posterior['latent_mean'].shape)
  # A fixed evaluation set of timesteps and noise, so the comparison is noise-free.
  t = jnp.tile(jnp.linspace(0, config.diffusion.num_timesteps - 1, 4).astype(jnp.int32), 4)
  noise = jax.random.normal(jax.random.PRNGKey(2), z0.shape)
  x_t = diffusion.q_sample(schedule, z0, t, noise)

  def eval_loss(params):
    out = unet.apply({'params': params}, x_t, t.astype(jnp.float32), jnp.asarray(batch['label']))
    return float(losses.diffusion_loss(out, noise)[0])

  initial = eval_loss(state.params)
  np.testing.assert_allclose(initial, float(jnp.mean(noise ** 2)), rtol=1e-6)
  for _ in range(60):
    state, _ = step(state, posterior, schedule)
  assert eval_loss(state.params) < 0.75 * initial


def test_one_and_eight_devices_give_the_same_update(setup):
  config, autoencoder, unet, ae_state, _, batch = setup
  assert jax.device_count() == 8
  schedule = builders.make_schedule(config)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    tx, step = _diffusion_step(config, unet, mesh)
    state = _init_diffusion_state(config, unet, tx, mesh)
    posterior = _posterior_batch(ae_state.params, batch, autoencoder, mesh)
    for _ in range(2):
      state, metrics = step(state, posterior, schedule)
    assert len(state.params['conv_in']['kernel'].sharding.device_set) == len(devices)
    results.append((float(metrics['loss']), jax.device_get(state.params)))
  (loss_1, params_1), (loss_8, params_8) = results
  np.testing.assert_allclose(loss_1, loss_8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               params_1, params_8)


def test_batch_size_not_divisible_by_devices_is_a_user_error():
  with pytest.raises(UserError, match='multiple of 8'):
    sharding.check_batch_size(12, sharding.make_mesh())


def test_autoencoder_stage_resumes_and_skips_when_finished(tiny_config, tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  tiny_config.autoencoder.num_train_steps = 2
  train.train_autoencoder(tiny_config, str(tmp_path), mesh)
  ckpt_dir = tmp_path / 'autoencoder' / 'checkpoints'
  manager = checkpointing.make_manager(str(ckpt_dir), keep=5, read_only=True)
  assert manager.all_steps() == [2]

  tiny_config.autoencoder.num_train_steps = 4  # Longer run: resumes from 2, continues to 4.
  _, params = train.train_autoencoder(tiny_config, str(tmp_path), mesh)
  manager.reload()
  assert manager.all_steps() == [2, 4]
  _, _, _, abstract = stages.autoencoder_setup(tiny_config, mesh)
  restored = checkpointing.restore(manager, abstract)
  assert int(restored.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.ema_params),
               jax.device_get(params))
  # Finished: a rerun trains nothing and returns the same parameters.
  _, again = train.train_autoencoder(tiny_config, str(tmp_path), mesh)
  manager.reload()
  assert manager.all_steps() == [2, 4]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
  config, autoencoder, _, state, lr, batch = setup
  mesh = sharding.make_mesh(jax.devices()[:1])
  step = jax.jit(functools.partial(train.autoencoder_train_step, model=autoencoder,
                                   config=config, lr_schedule=lr))

  def poisoned_step(state, batch):  # The loss turns NaN from the 4th step on.
    state, metrics = step(state, batch)
    return state, {**metrics, 'loss': jnp.where(state.step >= 4, jnp.nan, metrics['loss'])}

  manager = checkpointing.make_manager(str(tmp_path), keep=5)
  config = config.copy_and_resolve_references()
  config.train.update(log_every=1, checkpoint_every=2)
  batches = iter(lambda: sharding.global_batch(batch, mesh), None)
  with pytest.raises(UserError, match='loss is nan at step 4.*last finite checkpoint: step 2'):
    train._run_stage('autoencoder', state, poisoned_step, batches, num_train_steps=10,
                     manager=manager, writer=None, config=config)
  manager.wait_until_finished()
  assert manager.all_steps() == [2]
  _, _, _, abstract = stages.autoencoder_setup(config, mesh)
  assert int(checkpointing.restore(manager, abstract).step) == 2


@pytest.mark.parametrize('prob', [0.0, 0.1, 0.5])
def test_label_dropout_rate_matches_config(prob):
  labels = jnp.arange(100_000, dtype=jnp.int32) % 10
  dropped = train.drop_labels(jax.random.PRNGKey(0), labels, prob, null_class=10)
  is_null = np.asarray(dropped == 10)
  # Binomial standard error is at most 0.0016 at n = 1e5.
  np.testing.assert_allclose(is_null.mean(), prob, atol=0.006)
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
