"""Stable Diffusion pipelines in JAX, checked against transformers and diffusers.

The tiny SD-1 and SD-2 style pipelines under tests/fixtures/sd_tiny/ and their
reference outputs come from tests/fixtures/make_sd_fixtures.py (and the LoRA file
from tests/fixtures/make_sd_lora_fixture.py); these tests need no PyTorch.
"""
import importlib.util
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from ldm_jax import lora, pretrained, schedulers
from ldm_jax import stable_diffusion as sd
from ldm_jax.errors import UserError

ROOT = os.path.join(os.path.dirname(__file__), 'fixtures', 'sd_tiny')
NAMES = ('sd1', 'sd2')


def _reference(name: str) -> dict:
  return dict(np.load(os.path.join(ROOT, f'{name}_reference.npz')))


@pytest.fixture(scope='module')
def pipelines():
  """Each fixture pipeline, loaded once (and its jitted functions compiled once)."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = sd.load(os.path.join(ROOT, name))
    return cache[name]

  return get


@pytest.fixture(scope='module', params=NAMES)
def pipe(request, pipelines):
  return request.param, pipelines(request.param), _reference(request.param)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_token_ids_equal_clip_tokenizer(pipe, caplog):
  _, p, ref = pipe
  prompts = json.loads(str(ref['prompts']))
  assert len(prompts) == 20
  with caplog.at_level(logging.WARNING):
    ids = p.tokenizer(prompts)
  np.testing.assert_array_equal(ids, ref['token_ids'])
  # Three prompts exceed 77 tokens: one warning line for the call.
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and 'longer than 77 tokens' in warnings[0].getMessage()
  assert '\n' not in warnings[0].getMessage()


def test_text_encoder_matches_transformers(pipe):
  _, p, ref = pipe
  hidden = p._encode_fn(p.params['text_encoder'], ref['hidden_ids'])
  assert hidden.dtype == np.float32 and hidden.shape == ref['last_hidden_state'].shape
  assert np.max(np.abs(hidden - ref['last_hidden_state'])) <= 1e-4
  # encode_prompt tokenizes then encodes: the same for the same prompts.
  prompts = json.loads(str(ref['prompts']))
  context = p.encode_prompt([prompts[i] for i in (0, 4, 9, 16)])
  assert np.max(np.abs(context - ref['last_hidden_state'])) <= 1e-4


def test_unet_matches_diffusers(pipe):
  _, p, ref = pipe
  out = p.unet(ref['unet_latents'], ref['unet_timesteps'], ref['unet_context'])
  assert np.max(np.abs(out - ref['unet_out'])) <= 1e-4


@pytest.mark.parametrize('method', schedulers.METHODS)
def test_pipeline_matches_diffusers(pipe, method):
  _, p, ref = pipe
  images = p(json.loads(str(ref['pipeline_prompts'])),
             negative_prompts=json.loads(str(ref['pipeline_negative_prompts'])),
             latents=ref['pipeline_latents'], num_steps=10, guidance_scale=7.5, method=method)
  expected = ref[f'images_{method}']
  assert images.dtype == np.float32 and images.shape == expected.shape
  assert expected.std() > 0.05  # the images are not flat: the comparison means something
  assert np.max(np.abs(np.asarray(images) - expected)) <= 2e-3


def test_configs_map_onto_modules(pipe):
  name, p, _ = pipe
  unet, text, scheduler = p.unet_model, p.text_encoder, p.scheduler
  if name == 'sd1':
    assert (unet.level_heads, unet.attention_levels, unet.use_linear_projection) == ((2, 2), (0,),
                                                                                      False)
    assert (unet.context_dim, text.hidden_act, scheduler.prediction_type) == (
        8, 'quick_gelu', 'epsilon')
    assert p.tokenizer.pad_token_id == p.tokenizer.eos_token_id
  else:
    assert (unet.level_heads, unet.attention_levels, unet.use_linear_projection) == ((1, 2),
                                                                                      (0, 1), True)
    assert (unet.context_dim, text.hidden_act, scheduler.prediction_type) == (
        12, 'gelu', 'v_prediction')
    assert p.tokenizer.pad_token_id == p.tokenizer.vocab['!']
  assert (scheduler.steps_offset, scheduler.set_alpha_to_one) == (1, False)
  assert p.sample_size == 16 and p.scaling_factor == 0.18215


def test_scheduler_timesteps_follow_diffusers():
  config = schedulers.SchedulerConfig(timestep_spacing='leading', steps_offset=1)
  np.testing.assert_array_equal(schedulers.timesteps(config, 'ddim', 10),
                                np.arange(901, 0, -100))
  # DPM-Solver++ spaces num_steps + 1 points and drops the last (T // 11 = 90).
  np.testing.assert_array_equal(schedulers.timesteps(config, 'dpm_solver++', 10),
                                np.arange(900, 0, -90) + 1)
  trailing = schedulers.SchedulerConfig(timestep_spacing='trailing')
  np.testing.assert_array_equal(schedulers.timesteps(trailing, 'euler', 4), [999, 749, 499, 249])
  # DDIM's "previous" abar after the last step is abar_0 without set_alpha_to_one.
  coefficients = schedulers.plan(config, 'ddim', 10)
  abar = schedulers.alphas_cumprod(config)
  np.testing.assert_allclose(coefficients['next_x0'][-1], np.sqrt(abar[0]), rtol=1e-6)


def test_export_reload_is_bit_exact(pipe, tmp_path):
  _, p, ref = pipe
  path = str(tmp_path / 'exported')
  sd.save(p, path)
  reloaded = sd.load(path)
  for component in ('unet', 'text_encoder', 'vae'):
    _assert_trees_equal(reloaded.params[component], p.params[component])
  assert (reloaded.unet_model, reloaded.text_encoder, reloaded.vae) == (
      p.unet_model, p.text_encoder, p.vae)
  assert reloaded.scheduler == p.scheduler and reloaded.scaling_factor == p.scaling_factor
  np.testing.assert_array_equal(reloaded.tokenizer(json.loads(str(ref['prompts']))),
                                ref['token_ids'])
  with pytest.raises(UserError, match='already exists'):
    sd.save(p, path)


def _lora_fixture():
  spec = importlib.util.spec_from_file_location(
      'make_sd_lora_fixture',
      os.path.join(os.path.dirname(__file__), 'fixtures', 'make_sd_lora_fixture.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_diffusers_lora_file_round_trips_and_matches_diffusers(pipelines, tmp_path):
  fixture = _lora_fixture()
  p = pipelines('sd1')
  params = p.params['unet']
  adapters = fixture.adapters(params)
  file = sd.save_lora(adapters, fixture.SCALE, params, str(tmp_path))
  # ldm_jax writes the very file that diffusers loaded for the reference.
  written = safetensors.numpy.load_file(file)
  committed = safetensors.numpy.load_file(os.path.join(ROOT, 'sd1_lora', sd.LORA_FILE))
  assert sorted(written) == sorted(committed) and len(written) == 64
  for key, value in committed.items():
    assert np.array_equal(written[key], value), key
  ref, lora_ref = _reference('sd1'), dict(np.load(os.path.join(ROOT, 'sd1_lora',
                                                               'reference.npz')))
  merged = lora.merge(params, adapters, fixture.SCALE)
  out = p.unet(ref['unet_latents'], ref['unet_timesteps'], ref['unet_context'], params=merged)
  assert np.max(np.abs(lora_ref['unet_out'] - ref['unet_out'])) > 1e-2  # the LoRA matters
  assert np.max(np.abs(out - lora_ref['unet_out'])) <= 1e-4
  # Reading the file back gives adapters that merge (scale 1) to the same weights.
  reread = sd.load_lora(file, params)
  for a, b in zip(jax.tree.leaves(lora.merge(params, reread, 1.0)), jax.tree.leaves(merged)):
    np.testing.assert_allclose(a, b, atol=1e-6)


# ------------------------------------------------------------ bad input ------


def _copy(tmp_path, name='sd1') -> str:
  path = str(tmp_path / name)
  shutil.copytree(os.path.join(ROOT, name), path)
  return path


def _edit_json(file, **changes):
  with open(file) as f:
    value = json.load(f)
  value.update(changes)
  with open(file, 'w') as f:
    json.dump(value, f)


def _edit_tensors(file, edit):
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file)


TENSOR = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'


@pytest.mark.parametrize('case, message', [
    ('no_tokenizer', "has no tokenizer/ folder"),
    ('no_merges', 'has no merges.txt'),
    ('no_text_weights', 'has no model.safetensors'),
    ('missing_tensor', f"tensor '{TENSOR}' is missing"),
    ('wrong_shape', f"tensor '{TENSOR}' has shape (8, 5), expected (4, 8)"),
    ('sdxl', "'StableDiffusionXLPipeline' (SDXL) is not supported"),
    ('sdxl_unet', "addition_embed_type='text_time' (an SDXL U-Net) is not supported"),
    ('karras', 'use_karras_sigmas=True is not supported'),
    # Through the U-Net's own field checks: 3 heads at level 0's 4 channels.
    ('heads', "level_heads=(3, 2) is not valid; accepted: head counts that divide each "
              "attending level's channels; level 0 has 4"),
    ('no_index', 'has no model_index.json'),
])
def test_bad_folders_name_the_culprit(tmp_path, case, message):
  path = _copy(tmp_path)
  unet_weights = os.path.join(path, 'unet', pretrained.WEIGHTS_FILE)
  if case == 'no_tokenizer':
    shutil.rmtree(os.path.join(path, 'tokenizer'))
  elif case == 'no_merges':
    os.remove(os.path.join(path, 'tokenizer', 'merges.txt'))
  elif case == 'no_text_weights':
    os.remove(os.path.join(path, 'text_encoder', sd.TEXT_ENCODER_WEIGHTS))
  elif case == 'missing_tensor':
    _edit_tensors(unet_weights, lambda t: t.pop(TENSOR))
  elif case == 'wrong_shape':
    _edit_tensors(unet_weights, lambda t: t.update({TENSOR: np.zeros((8, 5), np.float32)}))
  elif case == 'sdxl':
    _edit_json(os.path.join(path, sd.MODEL_INDEX), _class_name='StableDiffusionXLPipeline')
  elif case == 'sdxl_unet':
    _edit_json(os.path.join(path, 'unet', 'config.json'), addition_embed_type='text_time')
  elif case == 'karras':
    _edit_json(os.path.join(path, 'scheduler', sd.SCHEDULER_CONFIG), use_karras_sigmas=True)
  elif case == 'heads':
    _edit_json(os.path.join(path, 'unet', 'config.json'), attention_head_dim=[3, 2])
  elif case == 'no_index':
    os.remove(os.path.join(path, sd.MODEL_INDEX))
  with pytest.raises(UserError) as info:
    sd.load(path)
  assert message in str(info.value) and '\n' not in str(info.value)


def test_not_a_folder_nor_a_repo_id(tmp_path):
  with pytest.raises(UserError, match='neither a folder nor a Hub repo id'):
    sd.load(str(tmp_path / 'absent' / 'deeper' / 'path'))
