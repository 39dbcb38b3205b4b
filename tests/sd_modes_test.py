"""Stable Diffusion modes: LoRA fine-tuning on the digits captions, resume, sample, edit, export.

The tiny SD-1 style pipeline of tests/fixtures/sd_tiny/sd1 is fine-tuned at 16x16.
"""
import os
import signal

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from configs import stable_diffusion as sd_config
from ldm_jax import lora, modes, preemption, schedulers, sd_modes, stages
from ldm_jax import stable_diffusion as sd
from ldm_jax.errors import UserError

PIPELINE = os.path.join(os.path.dirname(__file__), 'fixtures', 'sd_tiny', 'sd1')
NUM_STEPS = 30
PREEMPT_AT = 7  # SIGTERM while the 7th batch is drawn


@pytest.fixture(scope='module')
def config(digits_data_dir):
  import tensorflow_datasets as tfds

  tfds.builder('digits_captions', data_dir=digits_data_dir).download_and_prepare()
  c = sd_config.get_config()
  c.pretrained = PIPELINE
  c.data.update(data_dir=digits_data_dir, image_size=16, batch_size=8, shuffle_buffer=100)
  c.diffusion.num_train_steps = NUM_STEPS
  c.diffusion.optim.learning_rate = 2e-2
  c.diffusion.lora.update(rank=4, alpha=4.0)
  c.train.update(log_every=10, checkpoint_every=100)
  c.sample.update(num_steps=4, num_samples=1)
  return c


@pytest.fixture(scope='module')
def trained(config, tmp_path_factory):
  """(workdir, final state) of an uninterrupted LoRA run."""
  workdir = str(tmp_path_factory.mktemp('sd_lora'))
  return workdir, modes.run('train', config, workdir)


def _eval_losses(config, *adapter_trees) -> list[float]:
  """The loss of each adapter tree on the same batches and noise (4 keys), to compare."""
  pipe = sd.load(config.pretrained)
  spec = sd_modes._spec(config, pipe)
  frozen = {'unet': pipe.params['unet'], 'text_encoder': pipe.params['text_encoder'],
            'vae': pipe.params['vae']}
  abar = schedulers.alphas_cumprod(pipe.scheduler)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  batches = sd_modes._batches(config, pipe, mesh, 0)
  batches = [next(batches) for _ in range(4)]
  loss = jax.jit(sd_modes.loss_fn, static_argnames=('spec',))
  return [float(np.mean([loss(adapters, frozen, batch, jax.random.PRNGKey(i), abar, spec=spec)
                         for i, batch in enumerate(batches)]))
          for adapters in adapter_trees]


def test_lora_fine_tuning_lowers_the_loss(config, trained):
  _, state = trained
  assert int(state.step) == NUM_STEPS
  start = jax.tree.map(np.zeros_like, state.params)  # B = 0: the base pipeline
  before, after = _eval_losses(config, start, jax.device_get(state.params))
  assert after < 0.95 * before, (before, after)
  # Only the attention projections of the spatial transformers are adapted.
  paths = {'/'.join(k.key for k in path[:-1])
           for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert paths and all(p.split('/')[-1] in lora.TRANSFORMER_ATTENTION_TARGETS for p in paths)
  assert any('/attn2/' in f'/{p}/' for p in paths) and any('/attn1/' in f'/{p}/' for p in paths)


def test_sigterm_saves_and_the_resumed_run_is_bit_identical(config, trained, tmp_path,
                                                            monkeypatch):
  workdir = str(tmp_path / 'preempted')
  batches = sd_modes._batches

  def signalling_batches(*args):
    for i, batch in enumerate(batches(*args)):
      if i + 1 == PREEMPT_AT:
        os.kill(os.getpid(), signal.SIGTERM)  # Through the real handler.
      yield batch

  monkeypatch.setattr(sd_modes, '_batches', signalling_batches)
  with pytest.raises(preemption.Preempted) as info:
    modes.run('train', config, workdir)
  assert info.value.step == PREEMPT_AT
  monkeypatch.setattr(sd_modes, '_batches', batches)
  resumed = modes.run('train', config, workdir)
  _, uninterrupted = trained
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_merge_lora_exports_a_pipeline_and_a_diffusers_lora_file(config, trained):
  workdir, state = trained
  export = modes.run('merge_lora', config, workdir)
  pipe, exported = sd.load(PIPELINE), sd.load(export)
  merged = lora.merge(pipe.params['unet'], jax.device_get(state.ema_params),
                      sd_modes._lora_scale(config))
  for a, b in zip(jax.tree.leaves(exported.params['unet']), jax.tree.leaves(merged)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(exported.params['text_encoder']),
                  jax.tree.leaves(pipe.params['text_encoder'])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  file = os.path.join(workdir, 'export_lora', sd.LORA_FILE)
  adapters = sd.load_lora(file, pipe.params['unet'])
  for a, b in zip(jax.tree.leaves(lora.merge(pipe.params['unet'], adapters, 1.0)),
                  jax.tree.leaves(merged)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert all(k.startswith('unet.') for k in safetensors.numpy.load_file(file))
  with pytest.raises(UserError, match='already exists'):
    modes.run('merge_lora', config, workdir)


def test_sample_and_edit_write_images(config, trained, tmp_path):
  workdir, _ = trained
  paths = modes.run('sample', config, workdir, modes.Options(
      prompts=('a thick seven', 'a two'), negative_prompts=('blurry',)))
  assert len(paths) == 2
  images = [np.asarray(Image.open(p)) for p in paths]
  assert all(i.shape == (16, 16, 3) for i in images) and not np.array_equal(*images)

  source = (np.random.default_rng(0).uniform(size=(16, 16, 3)) * 255).astype(np.uint8)
  Image.fromarray(source).save(tmp_path / 'input.png')
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 4:12] = 255  # white = regenerate
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  config = config.copy_and_resolve_references()
  config.edit.update(task='inpaint', input=str(tmp_path / 'input.png'),
                     mask=str(tmp_path / 'mask.png'))
  edited, = modes.run('edit', config, workdir, modes.Options(prompts=('a four',)))
  edited = np.asarray(Image.open(edited))
  keep = mask == 0
  np.testing.assert_array_equal(edited[keep], source[keep])  # kept pixels are the input's
  assert not np.array_equal(edited[~keep], source[~keep])


@pytest.mark.parametrize('prompts, negative, message', [
    (None, None, 'accepted: --prompt='),
    (('a', 'b', 'c'), ('x', 'y'), '2 --negative_prompt for 3 --prompt'),
])
def test_bad_prompts_stop_before_anything_is_written(config, tmp_path, prompts, negative,
                                                     message):
  with pytest.raises(UserError, match=message):
    modes.run('sample', config, str(tmp_path), modes.Options(prompts=prompts,
                                                             negative_prompts=negative))
  assert not os.listdir(tmp_path)


def test_missing_pretrained_is_one_line(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.pretrained = ''
  with pytest.raises(UserError, match='config.pretrained is empty'):
    modes.run('train', config, str(tmp_path))


@pytest.mark.parametrize('mode, options, message', [
    ('eval', modes.Options(), 'not available for a Stable Diffusion config; accepted: train, '
                              'sample, edit, merge_lora'),
    ('edit', modes.Options(prompts=('a four',)), r'config.edit.input=.* accepted'),
])
def test_modes_run_routes_and_checks_a_stable_diffusion_config(config, tmp_path, mode, options,
                                                               message):
  with pytest.raises(UserError, match=message):
    modes.run(mode, config, str(tmp_path), options)
  assert not os.listdir(tmp_path)


def test_negative_prompts_need_a_stable_diffusion_config(tmp_path):
  from configs import default

  with pytest.raises(UserError, match='--negative_prompt needs a Stable Diffusion config'):
    modes.run('sample', default.get_config(), str(tmp_path),
              modes.Options(prompts=('a',), negative_prompts=('b',)))


def test_full_fine_tuning_from_cached_latents_and_caption_embeddings(config, tmp_path, caplog):
  import tensorflow_datasets as tfds

  config = config.copy_and_resolve_references()
  config.data.train_split = 'train[:20]'
  config.diffusion.update(cache_latents=True, num_train_steps=2)
  config.diffusion.lora.rank = 0  # the whole U-Net
  workdir = str(tmp_path)
  state = modes.run('train', config, workdir)
  assert int(state.step) == 2
  base = sd.load(config.pretrained).params['unet']
  assert jax.tree.structure(state.params) == jax.tree.structure(base)
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  assert all(np.isfinite(x).all() for x in leaves)
  changed = [not np.array_equal(x, np.asarray(y)) for x, y in zip(leaves, jax.tree.leaves(base))]
  assert np.mean(changed) > 0.9  # every layer trains, not only the attention
  with np.load(os.path.join(stages.sd_latents_dir(workdir), 'cache.npz')) as cache:
    cache = dict(cache)
  assert cache['latent_mean'].shape == (20, 8, 8, 4) and cache['context'].shape == (20, 77, 8)
  # The cache holds, in the split's order, what the pipeline computes for each example.
  pipe = sd.load(config.pretrained)
  examples = tfds.load('digits_captions', split='train[:3]', data_dir=config.data.data_dir)
  captions = [e['caption'].decode('utf-8') for e in tfds.as_numpy(examples)]
  np.testing.assert_allclose(cache['context'][:3], pipe.encode_prompt(captions), atol=1e-5)
  # A rerun reuses the cache and continues from the checkpoint.
  config.diffusion.num_train_steps = 3
  with caplog.at_level('INFO'):
    assert int(modes.run('train', config, workdir).step) == 3
  assert any('reusing the latent and caption cache' in r.getMessage() for r in caplog.records)
