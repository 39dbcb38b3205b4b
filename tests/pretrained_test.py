"""Diffusers folders in and out, checked against outputs diffusers computed.

The fixtures under tests/fixtures/ come from tests/fixtures/make_diffusers_fixtures.py;
these tests need neither PyTorch nor diffusers.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from ldm_jax import models, pretrained
from ldm_jax.errors import UserError

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
VAE = os.path.join(FIXTURES, 'vae')
UNETS = {name: os.path.join(FIXTURES, name) for name in ('unet_cond', 'unet_uncond')}


def _reference(path):
  return dict(np.load(os.path.join(path, 'reference.npz')))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def vae():
  module, params = pretrained.load_autoencoder(VAE)
  encode = jax.jit(lambda p, x: module.apply({'params': p}, x, method=module.encode))
  decode = jax.jit(lambda p, z: module.apply({'params': p}, z, method=module.decode))
  return module, params, encode, decode


@pytest.fixture(scope='module', params=sorted(UNETS))
def unet(request):
  path = UNETS[request.param]
  module, params = pretrained.load_unet(path)
  apply = jax.jit(lambda p, x, t, y: module.apply({'params': p}, x, t, y))
  return path, module, params, apply


def test_autoencoder_matches_diffusers(vae):
  module, params, encode, decode = vae
  ref = _reference(VAE)
  mean, logvar = encode(params, ref['images'])
  assert np.max(np.abs(mean - ref['mean'])) <= 1e-4
  assert np.max(np.abs(logvar - ref['logvar'])) <= 1e-4
  assert np.max(np.abs(decode(params, ref['mean']) - ref['decoded'])) <= 1e-4
  assert module.block_out_channels == (8, 16) and module.latent_channels == 4
  assert pretrained.scaling_factor(VAE) == 0.5


def test_unet_matches_diffusers(unet):
  path, _, params, apply = unet
  ref = _reference(path)
  out = apply(params, ref['x'], ref['t'], ref['y'])
  assert np.max(np.abs(out - ref['out'])) <= 1e-4


def test_unet_config_maps_onto_module_fields():
  cond, _ = pretrained.unet_module(UNETS['unet_cond'])
  uncond, _ = pretrained.unet_module(UNETS['unet_uncond'])
  assert (cond.attention_levels, cond.head_dim, cond.num_classes) == ((1,), 4, 10)
  assert (cond.flip_sin_to_cos, cond.freq_shift, cond.mid_attention) == (True, 0.0, True)
  assert (uncond.attention_levels, uncond.head_dim, uncond.num_heads) == ((0,), 0, 1)
  assert (uncond.flip_sin_to_cos, uncond.freq_shift, uncond.mid_attention) == (False, 1.0, False)
  assert (uncond.num_classes, uncond.time_embed_dim, uncond.norm_eps) == (0, 24, 1e-6)


def test_null_class_row_is_the_mean_of_the_class_rows():
  _, params = pretrained.load_unet(UNETS['unet_cond'])
  rows = np.asarray(params['class_embedding']['embedding'])
  file_rows = pretrained.read_weights(UNETS['unet_cond'])['class_embedding.weight']
  assert rows.shape == (11, file_rows.shape[1])
  np.testing.assert_array_equal(rows[:10], file_rows)
  np.testing.assert_allclose(rows[10], file_rows.mean(axis=0), rtol=1e-6)


def test_sd_vae_config_has_the_reference_param_count():
  config = {'_class_name': 'AutoencoderKL', 'block_out_channels': [128, 256, 512, 512],
            'down_block_types': ['DownEncoderBlock2D'] * 4,
            'up_block_types': ['UpDecoderBlock2D'] * 4, 'layers_per_block': 2,
            'latent_channels': 4, 'norm_num_groups': 32, 'sample_size': 256}
  module, in_channels = pretrained.autoencoder_from_config(config)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            np.zeros((1, 8, 8, in_channels), np.float32))['params']
  assert models.count_params(abstract) == 83_653_863


def test_export_writes_the_tensors_diffusers_wrote(vae, tmp_path):
  module, params, _, _ = vae
  pretrained.save_autoencoder(module, params, str(tmp_path), scaling_factor=0.5)
  original = safetensors.numpy.load_file(os.path.join(VAE, pretrained.WEIGHTS_FILE))
  written = safetensors.numpy.load_file(str(tmp_path / pretrained.WEIGHTS_FILE))
  assert sorted(written) == sorted(original)
  for name, value in original.items():
    assert written[name].dtype == value.dtype and np.array_equal(written[name], value), name
  with open(tmp_path / pretrained.CONFIG_FILE) as f:
    config = json.load(f)
  with open(os.path.join(VAE, pretrained.CONFIG_FILE)) as f:
    reference_config = json.load(f)
  for key, value in config.items():
    assert reference_config[key] == value, key


def test_autoencoder_export_reload_is_bit_exact(vae, tmp_path):
  module, params, _, _ = vae
  pretrained.save_autoencoder(module, params, str(tmp_path), scaling_factor=0.25)
  reloaded_module, reloaded = pretrained.load_autoencoder(str(tmp_path))
  assert reloaded_module == module
  _assert_trees_equal(reloaded, params)
  assert pretrained.scaling_factor(str(tmp_path)) == 0.25


def test_unet_export_reload_is_bit_exact(unet, tmp_path):
  _, module, params, _ = unet
  pretrained.save_unet(module, params, str(tmp_path))
  reloaded_module, reloaded = pretrained.load_unet(str(tmp_path))
  assert reloaded_module == module  # The null class comes back as the null class.
  _assert_trees_equal(reloaded, params)


def _copy_with_tensors(tmp_path, edit) -> str:
  """A copy of the VAE fixture whose tensors went through `edit(dict)`."""
  path = str(tmp_path / 'edited')
  shutil.copytree(VAE, path)
  tensors = safetensors.numpy.load_file(os.path.join(VAE, pretrained.WEIGHTS_FILE))
  edit(tensors)
  safetensors.numpy.save_file(tensors, os.path.join(path, pretrained.WEIGHTS_FILE))
  return path


def test_old_attention_names_load(vae, tmp_path):
  _, params, _, _ = vae

  def rename(tensors):
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      for name in [n for n in tensors if f'.{new}.' in n]:
        tensors[name.replace(f'.{new}.', f'.{old}.')] = tensors.pop(name)

  _, reloaded = pretrained.load_autoencoder(_copy_with_tensors(tmp_path, rename))
  _assert_trees_equal(reloaded, params)


NAME = 'encoder.mid_block.attentions.0.to_q.weight'


@pytest.mark.parametrize('edit, message', [
    (lambda t: t.pop(NAME), f"tensor '{NAME}' is missing"),
    (lambda t: t.update({'encoder.extra.weight': np.zeros(3, np.float32)}),
     "unexpected tensor 'encoder.extra.weight'"),
    (lambda t: t.update({NAME: np.zeros((16, 8), np.float32)}),
     f"tensor '{NAME}' has shape (16, 8), expected (16, 16)"),
])
def test_weight_mismatches_name_the_tensor(tmp_path, edit, message):
  path = _copy_with_tensors(tmp_path, edit)
  with pytest.raises(UserError) as info:
    pretrained.load_autoencoder(path)
  assert message in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('change, message', [
    ({'act_fn': 'gelu'}, "act_fn='gelu' is not supported"),
    ({'up_block_types': ['UpBlock2D', 'AttnUpBlock2D']}, 'the mirror of down_block_types'),
    ({'block_out_channels': [8, 12]}, 'multiples of the first entry 8'),
    ({'_class_name': 'UNet2DConditionModel'}, 'accepted: UNet2DModel'),
])
def test_unsupported_unet_configs_are_user_errors(tmp_path, change, message):
  path = str(tmp_path / 'unet')
  shutil.copytree(UNETS['unet_cond'], path)
  config = pretrained.read_config(path)
  config.update(change)
  with open(os.path.join(path, pretrained.CONFIG_FILE), 'w') as f:
    json.dump(config, f)
  with pytest.raises(UserError) as info:
    pretrained.load_unet(path)
  assert message in str(info.value)


def test_not_a_model_folder(tmp_path):
  with pytest.raises(UserError, match='is not a diffusers model folder'):
    pretrained.load_autoencoder(str(tmp_path / 'absent'))
  with pytest.raises(UserError, match='has no config.json'):
    pretrained.load_unet(str(tmp_path))
