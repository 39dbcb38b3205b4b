"""The train benchmark runs end to end and ends with a RESULT line that parses."""
import re

import pytest

from ldm_jax import bench, models

_RESULT = re.compile(r'RESULT train_img_per_s=(\S+) sample_s_per_img=(\S+) params=(\d+) '
                     r'train_gflops=(\S+) matmul_gflops=(\S+)')


def test_bench_unet32_matches_its_specification():
  """The fixed benchmark model: 6.8M parameters (structure checked in the config file)."""
  import jax
  import jax.numpy as jnp

  from configs import bench_unet32
  from ldm_jax import builders

  config = bench_unet32.get_config()
  assert builders.latent_shape(config) == (32, 32, 4)
  unet = builders.build_denoiser(config, 0)
  params = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)),
                          jnp.zeros((1,)))['params']
  assert models.count_params(params) == 6_804_868
  assert 'attentions_0' not in params['down_blocks_0']  # None at 32x32.
  assert 'attentions_1' in params['down_blocks_1'] and 'attentions_0' in params['mid_block']
  assert params['time_embedding']['linear_1']['kernel'].shape == (64, 256)


def test_model_flops_counts_matmuls_and_convolutions_exactly():
  import jax
  import jax.numpy as jnp

  a, b = jnp.ones((64, 96)), jnp.ones((96, 40))
  assert bench.model_flops(jnp.matmul, a, b) == 2 * 64 * 96 * 40
  x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 12))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  # XLA counts the kernel taps that land inside the image: along each axis of 16
  # outputs, 3 taps each but 2 fall on the zero padding.
  conv_flops = 2 * 2 * (16 * 3 - 2)**2 * 8 * 12
  assert bench.model_flops(conv, x, w) == conv_flops
  # Counted from shapes on the CPU: arrays placed on another device give the same count.
  assert bench.model_flops(conv, jax.device_put(x, jax.devices()[-1]), w) == conv_flops


def test_train_benchmark_prints_a_parsable_result(tiny_config, capsys):
  tiny_config.data.batch_size = 8
  result = bench.bench_train(tiny_config, sample_batch_size=8, ddim_steps=2, repeats=1,
                             matmul_size=128, peak_tflops=1.0)
  lines = capsys.readouterr().out.strip().splitlines()
  match = _RESULT.fullmatch(lines[-1])
  assert match, lines[-1]
  train_img_per_s, sample_s_per_img, params, train_gflops, matmul_gflops = match.groups()
  assert int(params) == result['params'] > 0
  for value in (train_img_per_s, sample_s_per_img, train_gflops, matmul_gflops):
    assert float(value) > 0
  # Backward costs about twice the forward: a train image is ~3 sampler model calls.
  per_call = result['sample_flops_per_image'] / 2
  assert 2 < result['train_flops_per_image'] / per_call < 4.5
  assert any('MFU' in line for line in lines)
  assert float(train_img_per_s) == pytest.approx(result['train_img_per_s'], rel=1e-3)


def test_a_conditioned_denoiser_is_initialized_with_its_condition():
  from configs import digits_text
  from ldm_jax import builders

  config = digits_text.get_config()
  config.diffusion.model.update(base_channels=8, num_res_blocks=1, num_heads=2,
                                norm_num_groups=4, context_dim=8)
  config.diffusion.conditioning.text.update(num_layers=1, num_heads=2)
  denoiser = bench._denoiser(config, num_classes=10)
  _, params = bench._init_params(config, builders.build_autoencoder(config), denoiser)
  assert set(params) == {'denoiser', 'conditioner'}
  assert 'token_embedding' in params['conditioner']
