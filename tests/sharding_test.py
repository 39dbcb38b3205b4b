"""Meshes over (data, fsdp): config checks, FSDP layouts, parity with one device, restores."""
import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax import builders, checkpointing, generate, input_pipeline, sharding, train
from ldm_jax import optim, stages
from ldm_jax.errors import UserError
from ldm_jax.validation import validate_config

# name -> (number of devices, mesh_shape)
MESHES = {'1': (1, (1, 1)), '8x1': (8, (8, 1)), '1x8': (8, (1, 8)), '2x4': (8, (2, 4)),
          '2x2': (4, (2, 2))}


@pytest.fixture(scope='module')
def setup(digits_data_dir):
  from configs import tiny

  config = tiny.get_config()
  config.data.data_dir = digits_data_dir
  config.diffusion.ema_decay = 0.9  # Non-trivial EMA, sharded like the parameters.
  # Fewer ops than configs/tiny.py: compiling for 8 devices is most of this file's time.
  config.data.image_size = 16
  config.autoencoder.model.mid_block_attention = False
  config.diffusion.model.update(channel_mult=(1,), attention_resolutions=(8,))
  autoencoder = builders.build_autoencoder(config)
  unet = builders.build_denoiser(config, 10)
  ae_tx, _ = optim.make_optimizer(config.autoencoder.optim, 100)
  ae_state = jax.jit(functools.partial(stages.init_autoencoder_state, config, autoencoder, ae_tx))()
  ds = input_pipeline.create_dataset(config.data, config.data.train_split, train=True, seed=0)
  batch = next(ds.as_numpy_iterator())
  batch = {'image': batch['image'], 'label': batch['label']}
  return config, autoencoder, unet, ae_state, batch


@functools.cache
def _mesh(name):
  num_devices, shape = MESHES[name]
  return sharding.make_mesh(jax.devices()[:num_devices], shape)


@pytest.fixture(scope='module')
def diffusion(setup):
  """name -> (mesh, abstract state, jitted init, jitted step), compiled once per mesh."""
  config, autoencoder, unet, _, _ = setup
  cache = {}

  def get(name):
    if name not in cache:
      mesh = _mesh(name)
      unet_, tx, lr, abstract = stages.diffusion_setup(config, mesh)
      state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
      replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
      init = jax.jit(functools.partial(stages.init_diffusion_state, config, unet_, tx, 0.5),
                     out_shardings=state_sharding)
      encode = jax.jit(functools.partial(train.encode_batch, autoencoder=autoencoder),
                       out_shardings=data)
      train_step = jax.jit(functools.partial(train.diffusion_train_step, denoiser=unet,
                                             config=config, lr_schedule=lr),
                           in_shardings=(state_sharding, data, replicated),
                           out_shardings=(state_sharding, replicated))

      def step(state, batch, ae_params, schedule, encode=encode, train_step=train_step):
        return train_step(state, encode(ae_params, batch), schedule)

      cache[name] = mesh, abstract, init, step
    return cache[name]

  return get


@pytest.fixture(scope='module')
def trained(setup, diffusion):
  """name -> (state after two diffusion steps on that mesh, loss of the second step)."""
  config, _, _, ae_state, batch = setup
  schedule = builders.make_schedule(config)
  cache = {}

  def get(name):
    if name not in cache:
      mesh, _, init, step = diffusion(name)
      state = init()
      ae_params = sharding.gather(ae_state.params, mesh)
      for _ in range(2):
        state, metrics = step(state, sharding.global_batch(batch, mesh), ae_params, schedule)
      cache[name] = state, float(metrics['loss'])
    return cache[name]

  return get


# ------------------------------------------------------------ mesh_shape ----


@pytest.mark.parametrize('mesh_shape, num_devices, expected', [
    (dict(data=-1, fsdp=1), 8, (8, 1)),
    (dict(data=2, fsdp=-1), 8, (2, 4)),
    (dict(fsdp=8), 8, (1, 8)),
    ((-1, 2), 4, (2, 2)),
    ([1, 1], 1, (1, 1)),
])
def test_mesh_shape_resolves(mesh_shape, num_devices, expected):
  assert sharding.resolve_mesh_shape(mesh_shape, num_devices) == expected


@pytest.mark.parametrize('mesh_shape, num_devices, fragment', [
    (dict(data=-1, model=2), 8, "unknown axes ['model']"),
    (dict(data=-1, fsdp=-1), 8, 'at most once'),
    (dict(data=0, fsdp=-1), 8, 'positive integer or -1'),
    ((2, 2, 2), 8, 'a tuple of 2 sizes'),
    ('data', 8, 'a dict over axes'),
    (dict(data=3, fsdp=-1), 8, 'whose product divides 8'),
    (dict(data=2, fsdp=2), 8, 'has 4 devices but the run has 8'),
])
def test_bad_mesh_shape_is_one_line(mesh_shape, num_devices, fragment):
  with pytest.raises(UserError, match='config.mesh_shape') as error:
    sharding.resolve_mesh_shape(mesh_shape, num_devices)
  assert fragment in str(error.value) and '\n' not in str(error.value)


def test_validate_config_checks_mesh_shape(tiny_config):
  tiny_config.mesh_shape.fsdp = -1  # data is already -1.
  with pytest.raises(UserError, match='config.mesh_shape.*at most once'):
    validate_config(tiny_config)


def test_make_mesh_and_batch_size_use_every_device():
  mesh = sharding.make_mesh(mesh_shape=ml_collections.ConfigDict(dict(data=2, fsdp=-1)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  assert sharding.num_batch_shards(mesh) == 8
  sharding.check_batch_size(16, mesh)
  with pytest.raises(UserError, match='multiple of 8'):
    sharding.check_batch_size(12, mesh)


# ---------------------------------------------------------------- layout ----


@pytest.mark.parametrize('shape, fsdp, spec', [
    ((3, 3, 8, 16), 4, P(None, None, None, 'fsdp')),  # Largest divisible dimension.
    ((16, 8), 4, P('fsdp')),
    ((8, 8), 4, P('fsdp')),                             # A tie: the first one.
    ((6, 10), 4, P()),                                  # None divisible: replicated.
    ((64,), 1, P()),                                    # No fsdp axis: replicated.
    ((), 4, P()),
])
def test_fsdp_spec(shape, fsdp, spec):
  assert sharding.fsdp_spec(shape, fsdp) == spec


def test_state_sharding_splits_params_ema_and_moments_only(diffusion):
  mesh, abstract, _, _ = diffusion('1x8')
  layout = jax.tree.map(lambda x: x.sharding.spec, abstract)
  kernel = ('conv_in', 'kernel')  # [3, 3, 2, 8]
  expected = sharding.fsdp_spec(abstract.params[kernel[0]][kernel[1]].shape, 8)
  assert expected == P(None, None, None, 'fsdp')
  assert layout.params[kernel[0]][kernel[1]] == expected
  assert layout.ema_params[kernel[0]][kernel[1]] == expected
  adam = layout.opt_state[1][0]
  assert adam.mu[kernel[0]][kernel[1]] == expected and adam.nu[kernel[0]][kernel[1]] == expected
  # Counters, rng and scale factor stay whole on every device.
  assert layout.step == layout.rng == layout.scale_factor == adam.count == P()
  num_sharded = sum(spec != P() for spec in jax.tree.leaves(layout.params))
  assert num_sharded > len(jax.tree.leaves(layout.params)) // 2


# ---------------------------------------------------------------- parity ----


@pytest.mark.parametrize('name', ['8x1', '1x8', '2x4'])
def test_diffusion_step_on_a_mesh_equals_one_device(trained, name):
  reference, reference_loss = trained('1')
  state, loss = trained(name)
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
  for a, b in ((state.params, reference.params), (state.ema_params, reference.ema_params),
               (state.opt_state, reference.opt_state)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 jax.device_get(a), jax.device_get(b))
  kernel = state.params['conv_in']['kernel']
  fsdp = MESHES[name][1][1]
  assert kernel.sharding.shard_shape(kernel.shape)[-1] == kernel.shape[-1] // fsdp


def test_autoencoder_step_on_2x4_equals_one_device(setup):
  config, autoencoder, _, _, batch = setup
  results = []
  for name in ('1', '2x4'):
    mesh = _mesh(name)
    _, tx, lr, abstract = stages.autoencoder_setup(config, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    init = jax.jit(functools.partial(stages.init_autoencoder_state, config, autoencoder, tx),
                   out_shardings=state_sharding)
    step = jax.jit(functools.partial(train.autoencoder_train_step, model=autoencoder,
                                     config=config, lr_schedule=lr),
                   in_shardings=(state_sharding, sharding.data_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))
    state, metrics = step(init(), sharding.global_batch(batch, mesh))
    results.append((float(metrics['loss']), jax.device_get(state.params)))
  (loss_1, params_1), (loss_8, params_8) = results
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               params_8, params_1)


# --------------------------------------------------------------- restore ----


def test_checkpoint_from_8_devices_restores_on_1_and_on_2x2(setup, diffusion, trained, tmp_path):
  config, _, _, ae_state, batch = setup
  schedule = builders.make_schedule(config)
  written, _ = trained('2x4')
  manager = checkpointing.make_manager(str(tmp_path), keep=1)
  checkpointing.save(manager, written)
  manager.wait_until_finished()

  def next_loss(name, state):
    mesh, _, _, step = diffusion(name)
    _, metrics = step(state, sharding.global_batch(batch, mesh),
                      sharding.gather(ae_state.params, mesh), schedule)
    return float(metrics['loss'])

  expected = next_loss('2x4', written)
  for name in ('1', '2x2'):
    mesh, abstract, _, _ = diffusion(name)
    restored = checkpointing.restore(manager, abstract)
    assert int(restored.step) == 2
    kernel = restored.params['conv_in']['kernel']
    assert kernel.sharding == abstract.params['conv_in']['kernel'].sharding
    assert kernel.sharding.mesh.devices.size == MESHES[name][0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(written.params))
    np.testing.assert_allclose(next_loss(name, restored), expected, rtol=1e-5)


# --------------------------------------------------------------- sampler ----


def test_sampler_takes_fsdp_sharded_params(setup, trained, capsys):
  """Same images from replicated and FSDP-sharded weights; the per-step bar is optional and
  only it puts a host callback (which bars the persistent compilation cache) in the program."""
  config, autoencoder, unet, ae_state, _ = setup
  config = config.copy_and_resolve_references()
  config.sample.update(num_steps=2, batch_size=8)
  images = []
  for name, step_progress in (('1', False), ('2x4', True)):
    mesh = _mesh(name)
    state, _ = trained(name)
    config.sample.step_progress = step_progress
    sampler = generate.Sampler(config, mesh, unet, autoencoder)
    ae_params = jax.device_put(ae_state.params, sharding.state_sharding(ae_state.params, mesh))
    capsys.readouterr()
    images.append(sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                   num_samples=8)[0])
    assert ('sampling steps' in capsys.readouterr().err) == step_progress
    program = sampler._fn.lower(*jax.device_get((state.ema_params, ae_state.params)),
                                state.scale_factor, np.zeros(8, np.int32),
                                jax.random.PRNGKey(0), sampler.schedule, None).as_text()
    assert ('callback' in program) == step_progress
  assert images[0].shape == (8, 16, 16, 1)
  # uint8 pixels: float differences of 1e-6 may round one step apart.
  assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1
  assert images[0].std() > 0
