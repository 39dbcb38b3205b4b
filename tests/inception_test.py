"""The Flax FID InceptionV3 against pytorch-fid, and its torch-free weight readers."""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.models import inception

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
sys.path.insert(0, str(FIXTURES))
from inception_weights import random_state_dict  # noqa: E402


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURES / 'inception_fixture.npz') as f:
    fixture = dict(f)
  names_and_shapes = zip(fixture['names'], json.loads(str(fixture['shapes'])))
  return fixture, random_state_dict(names_and_shapes, int(fixture['seed']))


def test_flax_inception_matches_pytorch_fid(reference):
  fixture, state_dict = reference
  params = inception.params_from_state_dict(state_dict)
  apply = jax.jit(lambda p, x: inception.FIDInceptionV3().apply(
      {'params': p}, x, capture_intermediates=True))
  # pytorch-fid takes [0, 1] and rescales; the Flax network takes [-1, 1].
  pool3, state = apply(params, fixture['images'] * 2.0 - 1.0)
  mixed_6e = np.asarray(state['intermediates']['Mixed_6e']['__call__'][0]).mean(axis=(1, 2))
  assert pool3.shape == (2, inception.FEATURE_DIM)
  np.testing.assert_allclose(mixed_6e, fixture['mixed_6e_mean'], atol=1e-4, rtol=0)
  # Features are ~4 in size after 94 float32 layers; 1e-4 is a few ulps of accumulated error.
  np.testing.assert_allclose(np.asarray(pool3), fixture['pool3'], atol=1e-4, rtol=0)


def test_gray_images_are_tiled_to_rgb(reference):
  fixture, state_dict = reference
  params = inception.params_from_state_dict(state_dict)
  gray = fixture['images'][:1, :20, :20, :1] * 2 - 1
  apply = jax.jit(inception.FIDInceptionV3().apply)
  np.testing.assert_allclose(apply({'params': params}, gray),
                             apply({'params': params}, np.tile(gray, (1, 1, 1, 3))), atol=1e-5)


@pytest.mark.parametrize('filename', ['torch_state_dict.pth', 'state_dict.safetensors'])
def test_readers_recover_saved_tensors(filename):
  with np.load(FIXTURES / 'torch_state_dict_expected.npz') as f:
    expected = dict(f)
  loaded = inception.read_state_dict(str(FIXTURES / filename))
  assert sorted(loaded) == sorted(expected)
  for name, value in expected.items():
    assert loaded[name].dtype == value.dtype, name
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_npz_weights_load(reference, tmp_path):
  _, state_dict = reference
  path = tmp_path / 'inception.npz'
  np.savez(path, **state_dict)
  _, params = inception.load_inception(str(path))
  np.testing.assert_array_equal(params['Mixed_7c']['branch_pool']['conv']['kernel'],
                                state_dict['Mixed_7c.branch_pool.conv.weight'].transpose(2, 3, 1, 0))


@pytest.mark.parametrize('change, fragment', [
    (lambda s: s.pop('Mixed_6b.branch7x7_2.bn.running_var'),
     "'Mixed_6b.branch7x7_2.bn.running_var' is missing"),
    (lambda s: s.update({'Mixed_8a.conv.weight': np.zeros(3)}), "unknown tensor 'Mixed_8a.conv.weight'"),
    (lambda s: s.update({'Conv2d_1a_3x3.conv.weight': np.zeros((32, 1, 3, 3))}),
     "'Conv2d_1a_3x3.conv.weight' has shape (32, 1, 3, 3); expected (32, 3, 3, 3)"),
])
def test_bad_state_dict_is_one_line(reference, change, fragment):
  state_dict = dict(reference[1])
  change(state_dict)
  with pytest.raises(UserError, match=None) as error:
    inception.params_from_state_dict(state_dict)
  assert fragment in str(error.value) and '\n' not in str(error.value)


def test_corrupt_download_and_missing_file_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='no such file'):
    inception.load_inception(str(tmp_path / 'nope.pth'))
  truncated = tmp_path / inception.WEIGHTS_FILE
  truncated.write_bytes((FIXTURES / 'torch_state_dict.pth').read_bytes()[:100])
  with pytest.raises(UserError, match='not a torch zip checkpoint'):
    inception.load_inception(str(truncated))
