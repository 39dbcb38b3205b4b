"""Tests of ldm_jax.editing: RePaint inpainting and SDEdit with an exact denoiser, file IO.

The data of the denoiser tests are Gaussian: pixels come in pairs (x1, x2) with mean
MU, std SD and correlation RHO, independent across pairs. The Bayes-optimal denoiser
is known in closed form (per eigen-direction of the pair covariance), so inpainting
can be checked against the true conditional law x2 | x1 = k with no trained network.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ldm_jax import checkpointing, diffusion, editing, sampling, sharding
from ldm_jax import modes, stages
from ldm_jax.errors import UserError

T = 1000
MU, SD = 0.5, 0.3
LINEAR = diffusion.make_schedule('linear', T)

inpaint_jit = jax.jit(editing.inpaint, static_argnames=editing.INPAINT_STATIC_ARGNAMES)
img2img_jit = jax.jit(editing.img2img, static_argnames=editing.IMG2IMG_STATIC_ARGNAMES)
sample_jit = jax.jit(sampling.sample, static_argnames=sampling.STATIC_ARGNAMES)


def pair_denoiser(x_t: jax.Array, t: jax.Array, *, rho: float,
                  prediction_type: str = 'eps') -> jax.Array:
  """The optimal output for pairs of pixels (consecutive in memory) with correlation rho.

  In the basis u = (x1 + x2)/sqrt2, w = (x1 - x2)/sqrt2 the components are independent,
  N(sqrt2 MU, SD^2 (1 + rho)) and N(0, SD^2 (1 - rho)), and for a component N(m, v)
  E[x0 | x_t] = m + sqrt(abar) v / (abar v + 1 - abar) (x_t - sqrt(abar) m).
  """
  abar = diffusion.alphas_cumprod_at(LINEAR, t).reshape((-1, 1))
  pairs = x_t.reshape(x_t.shape[0], -1, 2)
  x1, x2 = pairs[..., 0], pairs[..., 1]
  u, w = (x1 + x2) / np.sqrt(2), (x1 - x2) / np.sqrt(2)

  def posterior_mean(x, m, v):
    return m + jnp.sqrt(abar) * v / (abar * v + 1 - abar) * (x - jnp.sqrt(abar) * m)

  u0 = posterior_mean(u, np.sqrt(2) * MU, SD**2 * (1 + rho))
  w0 = posterior_mean(w, 0.0, SD**2 * (1 - rho))
  x0 = jnp.stack([u0 + w0, u0 - w0], axis=-1).reshape(x_t.shape) / np.sqrt(2)
  eps = diffusion.eps_from_x0(LINEAR, x_t, t, x0)
  return diffusion.training_target(LINEAR, x0, eps, t, prediction_type)


# Module-level models, so that jitted functions compile once per configuration.
INDEPENDENT = functools.partial(pair_denoiser, rho=0.0)
CORRELATED = functools.partial(pair_denoiser, rho=0.9)


# --- The RePaint schedule. ---------------------------------------------------------


def test_repaint_schedule_by_hand():
  # 5 steps, jump back 2 states, every stretch 3 times: jump points 0 and 2.
  states = editing.repaint_schedule(5, jump_length=2, jump_n_sample=3)
  expected = [4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
  np.testing.assert_array_equal(states, expected)
  assert states.dtype == np.int32
  # No jumps: the plain descent.
  np.testing.assert_array_equal(editing.repaint_schedule(6, 3, 1), np.arange(5, -2, -1))


@pytest.mark.parametrize('num_steps, jump_length, jump_n_sample',
                         [(250, 10, 10), (50, 10, 10), (20, 3, 4), (7, 7, 5), (4, 10, 3),
                          (1, 1, 2)])
def test_repaint_schedule_length_in_closed_form(num_steps, jump_length, jump_n_sample):
  states = editing.repaint_schedule(num_steps, jump_length, jump_n_sample)
  num_jumps = len(range(0, num_steps - jump_length, jump_length))
  jumped = num_jumps * (jump_n_sample - 1) * jump_length
  assert len(states) == num_steps + 1 + 2 * jumped
  steps = np.diff(states)
  assert set(steps) <= {-1, 1}
  assert np.sum(steps == -1) == num_steps + jumped  # model calls
  assert states[0] == num_steps - 1 and states[-1] == -1 and states.min() == -1
  assert states.max() == num_steps - 1
  if (num_steps, jump_length, jump_n_sample) == (250, 10, 10):
    assert len(states) == 4571  # RePaint's setting for its paper results.


def test_repaint_schedule_errors():
  with pytest.raises(ValueError, match='jump_length must be at least 1'):
    editing.repaint_schedule(10, 0, 2)


# --- Inpainting with the exact denoiser. -------------------------------------------


def _half_mask(batch: int, size: int) -> np.ndarray:
  """[B, size, size, 1]: the left half known."""
  mask = np.zeros((batch, size, size, 1), np.float32)
  mask[:, :, :size // 2] = 1.0
  return mask


def test_inpaint_keeps_the_known_region_exactly_and_fills_with_the_data_law():
  batch, size = 32, 8
  known = jax.random.normal(jax.random.key(0), (batch, size, size, 2)) * 3.0
  mask = _half_mask(batch, size)
  out = inpaint_jit(INDEPENDENT, LINEAR, known, mask, jax.random.key(1), num_steps=100,
                    jump_length=10, jump_n_sample=3)
  assert out.shape == known.shape and out.dtype == jnp.float32
  keep = np.broadcast_to(mask, known.shape) == 1
  np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(known)[keep])
  filled = np.asarray(out)[~keep]
  assert np.all(np.isfinite(filled))
  # Pixels are independent of the (far out of distribution) known ones: the fill has
  # the data law; ancestral sampling with 100 respaced steps is a few % too narrow.
  assert abs(filled.mean() - MU) < 4 * SD / np.sqrt(filled.size)
  assert 0.85 * SD < filled.std() < 1.02 * SD


def test_inpaint_same_with_v_prediction():
  # The same denoiser in the v parameterization (which mixes x_t and the output) is
  # the same inpainting; x0 goes through the same conversion code.
  known = jnp.full((4, 4, 4, 2), 0.7)
  mask = _half_mask(4, 4)
  kwargs = dict(num_steps=10, jump_length=3, jump_n_sample=2)
  eps = inpaint_jit(INDEPENDENT, LINEAR, known, mask, jax.random.key(2), **kwargs)
  v = inpaint_jit(functools.partial(pair_denoiser, rho=0.0, prediction_type='v'), LINEAR,
                  known, mask, jax.random.key(2), prediction_type='v', **kwargs)
  np.testing.assert_allclose(v, eps, atol=2e-4)


def _conditional_fill(jump_n_sample: int, known_value: float) -> np.ndarray:
  """Fills x2 of 1024 pairs whose x1 is known, with the correlated denoiser."""
  known = jnp.full((1024, 1, 2, 1), known_value)
  mask = jnp.asarray([[[[1.0], [0.0]]]])  # x1 known, x2 filled; broadcast over B
  out = inpaint_jit(CORRELATED, LINEAR, known, mask, jax.random.key(3), num_steps=100,
                    jump_length=5, jump_n_sample=jump_n_sample)
  np.testing.assert_array_equal(out[:, 0, 0, 0], known[:, 0, 0, 0])
  return np.asarray(out[:, 0, 1, 0])


def test_resampling_harmonizes_the_fill_with_the_known_region():
  # x2 | x1 = k is N(MU + RHO (k - MU), SD^2 (1 - RHO^2)). Replacing the known region
  # alone (no jumps) gets only ~2/3 of the way from MU to the conditional mean (even
  # with all 1000 steps) and too wide; RePaint's resampling gets close to the true law.
  rho, k = 0.9, MU + 2.5 * SD
  true_mean, true_std = MU + rho * (k - MU), SD * np.sqrt(1 - rho**2)
  plain = _conditional_fill(1, k)
  repaint = _conditional_fill(10, k)
  plain_error = abs(plain.mean() - true_mean)
  repaint_error = abs(repaint.mean() - true_mean)
  assert repaint_error < 0.5 * plain_error, (plain.mean(), repaint.mean(), true_mean)
  assert repaint_error < 0.15 * rho * (k - MU), (repaint.mean(), true_mean)
  assert 0.8 * true_std < repaint.std() < 1.2 * true_std < plain.std()


def test_inpaint_errors():
  known = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match='does not broadcast'):
    editing.inpaint(INDEPENDENT, LINEAR, known, jnp.zeros((3, 4, 4, 1)), jax.random.key(0),
                    num_steps=5)
  with pytest.raises(ValueError, match='accepted: eps, x0, v'):
    editing.inpaint(INDEPENDENT, LINEAR, known, known, jax.random.key(0), num_steps=5,
                    prediction_type='score')


# --- SDEdit. -----------------------------------------------------------------------


def test_img2img_start_timestep():
  assert editing.img2img_start_timestep(T, 1.0) == T - 1
  assert editing.img2img_start_timestep(T, 0.5) == 499
  assert editing.img2img_start_timestep(T, 1 / T) == 0
  assert editing.img2img_start_timestep(T, 1e-9) == 0


@pytest.mark.parametrize('spacing', ['leading', 'trailing'])
def test_img2img_denoises_from_the_timestep_it_noised_to(spacing):
  # A denoiser that returns the very noise img2img drew: deterministic DDIM then gives
  # back the latents exactly if x was noised to the timestep the first step takes it
  # to be (leading spacing visits 703 from strength 0.75, not 749), else
  # (x - sqrt(1 - abar_703) noise) / sqrt(abar_703) != latents.
  latents = jax.random.normal(jax.random.key(9), (2, 4, 4, 1))
  rng = jax.random.key(10)
  noise = jax.random.normal(jax.random.split(rng)[0], latents.shape)
  out = editing.img2img(lambda x, t: noise, LINEAR, latents, 0.75, rng, method='ddim',
                        num_steps=50, timestep_spacing=spacing)
  np.testing.assert_allclose(out, latents, atol=1e-4)


def test_img2img_at_tiny_strength_returns_the_input():
  latents = MU + SD * jax.random.normal(jax.random.key(4), (8, 4, 4, 2))
  out = img2img_jit(INDEPENDENT, LINEAR, latents, 1 / T, jax.random.key(5), method='ddpm',
                    num_steps=50)
  # One step from t=0 (noise std 0.01) back to x0.
  np.testing.assert_allclose(out, latents, atol=0.05)
  assert float(jnp.std(out - latents)) < 0.015


def test_img2img_at_full_strength_is_plain_sampling():
  # From t = T-1 the input is almost erased (sqrt(abar) = 0.006): with the same noise,
  # deterministic DDIM over all T steps is plain sampling up to that trace.
  latents = MU + SD * jax.random.normal(jax.random.key(6), (8, 4, 4, 2))
  rng = jax.random.key(7)
  out = img2img_jit(INDEPENDENT, LINEAR, latents, 1.0, rng, method='ddim', num_steps=T)
  noise = jax.random.normal(jax.random.split(rng)[0], latents.shape)
  plain = sample_jit(INDEPENDENT, LINEAR, latents.shape, jax.random.key(8), method='ddim',
                     num_steps=T, x_T=noise)
  np.testing.assert_allclose(out, plain, atol=0.01)


def test_img2img_strength_must_be_in_range():
  for strength in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match=r'strength must be in \(0, 1\]'):
      editing.img2img(INDEPENDENT, LINEAR, jnp.zeros((2, 4, 4, 2)), strength,
                      jax.random.key(0), num_steps=10)


# --- Files. ------------------------------------------------------------------------


def _one_line_error(match: str, fn, *args):
  with pytest.raises(UserError, match=match) as info:
    fn(*args)
  assert '\n' not in str(info.value)
  return str(info.value)


def test_load_image_png_and_npz_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
  rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / 'gray.png')
  Image.fromarray(rgb).save(tmp_path / 'rgb.png')
  np.savez(tmp_path / 'batch.npz', images=np.stack([rgb, rgb[::-1]]))
  np.savez(tmp_path / 'one.npz', image=gray[..., None])
  to_model = lambda pixels: pixels.astype(np.float32) / 127.5 - 1.0

  image = editing.load_image(str(tmp_path / 'gray.png'), 8, 1)
  assert image.shape == (8, 8, 1) and image.dtype == np.float32
  np.testing.assert_allclose(image[..., 0], to_model(gray), atol=1e-6)
  np.testing.assert_allclose(editing.load_image(str(tmp_path / 'rgb.png'), 8, 3),
                             to_model(rgb), atol=1e-6)
  np.testing.assert_allclose(editing.load_image(str(tmp_path / 'batch.npz'), 8, 3),
                             to_model(rgb), atol=1e-6)  # the first of the batch
  np.testing.assert_allclose(editing.load_image(str(tmp_path / 'one.npz'), 8, 3),
                             to_model(np.repeat(gray[..., None], 3, -1)), atol=1e-6)
  # RGB to gray is the luma of the PNG reader and of the npz reader alike.
  np.testing.assert_allclose(editing.load_image(str(tmp_path / 'batch.npz'), 8, 1),
                             editing.load_image(str(tmp_path / 'rgb.png'), 8, 1),
                             atol=1.01 / 127.5)


def test_load_image_errors(tmp_path):
  Image.fromarray(np.zeros((16, 12), np.uint8)).save(tmp_path / 'big.png')
  message = _one_line_error('big.png is 16x12 but data.image_size is 8', editing.load_image,
                            str(tmp_path / 'big.png'), 8, 1)
  assert 'accepted: a 8x8 image' in message
  _one_line_error(f'input image not found: {tmp_path}/nope.png', editing.load_image,
                  str(tmp_path / 'nope.png'), 8, 1)
  np.savez(tmp_path / 'floats.npz', images=np.zeros((8, 8, 3), np.float32))
  _one_line_error('float32.*accepted: uint8', editing.load_image,
                  str(tmp_path / 'floats.npz'), 8, 3)
  np.savez(tmp_path / 'other.npz', pixels=np.zeros((8, 8, 3), np.uint8))
  _one_line_error("accepted: an .npz with key 'images' or 'image'", editing.load_image,
                  str(tmp_path / 'other.npz'), 8, 3)
  for name in ('text.png', 'text.npz'):
    (tmp_path / name).write_text('not an image')
    _one_line_error(f'cannot read input image .*{name}', editing.load_image,
                    str(tmp_path / name), 8, 1)


def test_load_mask_png_and_npz(tmp_path):
  fill = np.zeros((8, 8), bool)
  fill[2:5, 3:7] = True
  Image.fromarray(np.where(fill, 255, 0).astype(np.uint8)).save(tmp_path / 'mask.png')
  np.savez(tmp_path / 'mask.npz', mask=fill.astype(np.uint8)[None, ..., None])
  for name in ('mask.png', 'mask.npz'):
    known = editing.load_mask(str(tmp_path / name), 8)
    assert known.shape == (8, 8, 1) and known.dtype == np.float32
    np.testing.assert_array_equal(known[..., 0], ~fill)  # white / 1 = fill


def test_load_mask_errors(tmp_path):
  Image.fromarray(np.array([[0, 128], [255, 0]], np.uint8)).save(tmp_path / 'soft.png')
  _one_line_error('mask .*soft.png is not binary .*accepted: 0/255 PNG or 0/1 npz',
                  editing.load_mask, str(tmp_path / 'soft.png'), 2)
  np.savez(tmp_path / 'bytes.npz', mask=np.array([[0, 255], [255, 0]], np.uint8))
  _one_line_error('is not binary', editing.load_mask, str(tmp_path / 'bytes.npz'), 2)
  np.savez(tmp_path / 'keep_all.npz', mask=np.zeros((2, 2), np.uint8))
  _one_line_error('marks no pixel to fill', editing.load_mask,
                  str(tmp_path / 'keep_all.npz'), 2)
  np.savez(tmp_path / 'big.npz', mask=np.ones((4, 4), np.uint8))
  _one_line_error('is 4x4 but data.image_size is 2', editing.load_mask,
                  str(tmp_path / 'big.npz'), 2)
  _one_line_error('mask not found', editing.load_mask, str(tmp_path / 'none.png'), 2)


def test_latent_known_mask_max_pools_the_fill_region():
  known = np.ones((8, 8, 1), np.float32)
  known[0, 0] = 0.0  # one filled pixel fills its whole latent cell
  known[4:8, 4:8] = 0.0
  latent = editing.latent_known_mask(known, 4)
  np.testing.assert_array_equal(latent[..., 0], [[0.0, 1.0], [1.0, 0.0]])


# --- Config checks. ----------------------------------------------------------------


def _edit_config(**overrides) -> ml_collections.ConfigDict:
  edit = dict(task='inpaint', input='in.png', mask='mask.png', strength=0.6,
              jump_length=10, jump_n_sample=10, num_samples=8, class_label=-1)
  edit.update(overrides)
  return ml_collections.ConfigDict({'edit': edit})


@pytest.mark.parametrize('overrides, fragment', [
    (dict(task='outpaint'), "config.edit.task='outpaint' is not valid; accepted: inpaint, "
                            'img2img'),
    (dict(task='img2img', strength=0.0), 'config.edit.strength=0.0 is not valid; '
                                         r'accepted: a number in \(0, 1\]'),
    (dict(task='img2img', strength=1.5), 'config.edit.strength=1.5'),
    (dict(mask=''), "config.edit.mask='' is not valid; accepted: a path"),
    (dict(input=''), "config.edit.input=''"),
    (dict(jump_length=0), 'config.edit.jump_length=0 is not valid; accepted: an integer'),
    (dict(num_samples=0), 'config.edit.num_samples=0'),
    (dict(class_label=-2), 'config.edit.class_label=-2'),
])
def test_bad_edit_config_is_one_line(overrides, fragment):
  _one_line_error(fragment, editing.validate_edit_config, _edit_config(**overrides))


def test_good_edit_configs_pass():
  editing.validate_edit_config(_edit_config())
  editing.validate_edit_config(_edit_config(task='img2img', mask='', strength=1.0))


# --- edit_mode end to end. ---------------------------------------------------------


def _random_state(abstract, seed: int):
  """A state of the abstract's structure: random floats, step 4. Compiles nothing."""
  rng = np.random.default_rng(seed)

  def leaf(x):
    if np.issubdtype(x.dtype, np.floating):
      return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
    return np.full(x.shape, 4, x.dtype)

  return jax.tree.map(leaf, abstract)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_data_dir):
  """The tiny config and a workdir with stage-1 and stage-2 checkpoints at step 4.

  Random parameters stand in for trained ones (compiling the init and train steps would
  take most of this file's time budget): the checks are on shapes, files and pixels.
  """
  from configs import tiny

  config = tiny.get_config()
  config.data.data_dir = digits_data_dir
  workdir = tmp_path_factory.mktemp('edit_run')
  mesh = sharding.make_mesh()
  ae_abstract = stages.autoencoder_setup(config, mesh)[3]
  diffusion_abstract = stages.diffusion_setup(config, mesh)[3]
  states = {'autoencoder': _random_state(ae_abstract, 0),
            'diffusion': _random_state(diffusion_abstract, 1).replace(
                scale_factor=np.float32(0.8))}
  for stage, state in states.items():
    manager = checkpointing.make_manager(str(workdir / stage / 'checkpoints'), keep=1)
    checkpointing.save(manager, state)
    manager.wait_until_finished()
  return config, str(workdir)


def test_edit_mode_writes_inpaint_and_img2img(trained, tmp_path, capsys):
  config, workdir = trained
  size = config.data.image_size
  image = (np.add.outer(np.arange(size), np.arange(size)) * 4 % 256).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'input.png')
  fill = np.zeros((size, size), np.uint8)
  fill[8:20, 10:22] = 255
  Image.fromarray(fill).save(tmp_path / 'mask.png')
  num_samples = 3  # fewer than the 8 devices: padded, then cut
  config.edit = ml_collections.ConfigDict(dict(
      task='inpaint', input=str(tmp_path / 'input.png'), mask=str(tmp_path / 'mask.png'),
      strength=0.6, jump_length=2, jump_n_sample=2, num_samples=num_samples,
      class_label=3))
  config.sample.guidance_scale = 2.0

  png, npz = modes.run('edit', config, workdir)
  assert png.endswith('edits/inpaint_4.png') and npz.endswith('edits/inpaint_4.npz')
  assert f'{png} and {npz}' in capsys.readouterr().out
  with np.load(npz) as outputs:
    images, inputs, mask = outputs['images'], outputs['input'], outputs['mask']
  assert images.shape == (num_samples, size, size, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(inputs[..., 0], image)
  np.testing.assert_array_equal(mask[..., 0], fill // 255)
  keep = fill == 0
  np.testing.assert_array_equal(editing.load_mask(npz, size)[..., 0], keep)  # reusable
  for edited in images:
    np.testing.assert_array_equal(edited[..., 0][keep], image[keep])
    assert not np.array_equal(edited[..., 0][~keep], image[~keep])
  grid = np.asarray(Image.open(png))
  assert grid.shape == (size + 4, (num_samples + 2) * (size + 2) + 2)

  config.edit.update(task='img2img', mask='', class_label=-1)
  png, npz = modes.run('edit', config, workdir)
  with np.load(npz) as outputs:
    assert outputs['images'].shape == (num_samples, size, size, 1)
    assert set(outputs.files) == {'images', 'input'}
  assert np.asarray(Image.open(png)).shape == (size + 4, (num_samples + 1) * (size + 2) + 2)


def test_edit_mode_errors_before_loading_models(tmp_path):
  from configs import tiny

  config = tiny.get_config()
  config.edit = ml_collections.ConfigDict(dict(
      task='inpaint', input=str(tmp_path / 'missing.png'), mask='', strength=0.6,
      jump_length=10, jump_n_sample=10, num_samples=8, class_label=-1))
  # No workdir, no data: the config and files are checked first.
  _one_line_error('config.edit.mask', modes.run, 'edit', config, str(tmp_path / 'run'))
  config.edit.mask = str(tmp_path / 'mask.png')
  _one_line_error('input image not found', modes.run, 'edit', config, str(tmp_path / 'run'))
