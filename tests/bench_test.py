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


def test_peak_rates_by_device_kind():
  assert bench.peak_bf16_tflops('NVIDIA H100 80GB HBM3') == 989
  assert bench.peak_bf16_tflops('NVIDIA H100 PCIe') == 756
  assert bench.peak_bf16_tflops('NVIDIA H200') == 989
  assert bench.peak_bf16_tflops('NVIDIA A100-SXM4-80GB') == 312
  assert bench.peak_bf16_tflops('TPU v4') == 275
  assert bench.peak_bf16_tflops('TPU v5 lite') == 197
  assert bench.peak_bf16_tflops('TPU v5p') == 459
  assert bench.peak_bf16_tflops('cpu') is None


def test_result_parsing_and_scaling_efficiency():
  output = ('RESULT train_img_per_s=1.0\nnoise\n'
            'RESULT train_img_per_s=8.5000 sample_s_per_img=1.2e-01 params=6804868\n'
            'MEMORY train_peak_mib=64.0 train_mib_per_img=2.00 (peak RSS)\n')
  assert bench.parse_result(output) == {'train_img_per_s': 8.5, 'sample_s_per_img': 0.12,
                                        'params': 6804868}
  assert bench.parse_result(output, 'MEMORY') == {'train_peak_mib': 64.0,
                                                  'train_mib_per_img': 2.0}
  assert bench.parse_result('no result') == {}
  rows = bench.scaling_rows({(1, 'data'): 10.0, (2, 'data'): 15.0, (2, 'fsdp'): 20.0,
                             (4, 'fsdp'): 40.0})
  assert [(r['devices'], r['mesh'], r['efficiency']) for r in rows] == [
      (1, 'data', 1.0), (2, 'data', 0.75), (2, 'fsdp', 1.0), (4, 'fsdp', 1.0)]


def test_scaling_children_get_their_devices_and_batch():
  argv = ['--config=configs/bench_unet32.py', '--devices', '1,2', '--repeats=2', '--fsdp',
          '--parts=sample', '--config.seed=3', '--profile_dir', '/tmp/trace']
  command, env = bench.child_command(argv, 4, True, 128, 'cpu')
  assert command[1:] == ['-m', 'ldm_jax.bench', '--config=configs/bench_unet32.py',
                         '--repeats=2', '--config.seed=3', '--parts=train',
                         '--config.data.batch_size=128', '--num_devices=4', '--fsdp']
  assert env['XLA_FLAGS'].endswith('--xla_force_host_platform_device_count=4')
  command, env = bench.child_command(argv, 2, False, 64, 'gpu')
  assert command[-1] == '--nofsdp' and env.get('XLA_FLAGS') == bench.os.environ.get('XLA_FLAGS')


def test_fsdp_train_benchmark_counts_the_state_in_its_memory(tiny_config, capsys, tmp_path):
  import jax

  tiny_config.data.batch_size = 4
  result = bench.bench_train(tiny_config, repeats=1, matmul_size=64, parts=('train',),
                             devices=jax.devices()[:2], fsdp=True, profile_dir=str(tmp_path),
                             profile_steps=2)
  out = capsys.readouterr().out
  # The traced steps' op table comes after the timing and before the RESULT line.
  assert '\nprofile: ' in out and '(2 steps, ' in out and 'by kind:' in out
  assert "MFU: left out, no peak rate known for 'cpu'" in out
  assert "mesh {'data': 1, 'fsdp': 2} (FSDP)" in out
  values = bench.parse_result(out)
  assert set(values) == {'train_img_per_s', 'params', 'train_gflops', 'matmul_gflops'}
  # Parameters and both AdamW moments, float32, are made inside the memory window.
  state_mib = 3 * 4 * result['params'] / 2**20
  memory = bench.parse_result(out, 'MEMORY')
  assert memory['train_peak_mib'] >= state_mib
  # The peak is printed to 0.1 MiB, the per-image figure to 0.01 from the unrounded peak.
  assert memory['train_mib_per_img'] == pytest.approx(memory['train_peak_mib'] / 4,
                                                       abs=0.05 / 4 + 0.005)


def test_device_memory_window_says_when_an_earlier_peak_hides_its_own(monkeypatch):
  stats = {'bytes_in_use': 100 * 2**20, 'peak_bytes_in_use': 100 * 2**20}

  class FakeDevice:
    def memory_stats(self):
      return dict(stats)

  monkeypatch.setattr(bench.jax, 'local_devices', lambda *a, **k: [FakeDevice()])
  window = bench.MemoryWindow()  # No earlier peak: the window's peak is its own.
  stats['peak_bytes_in_use'] = 400 * 2**20
  assert window.peak_mib() == 300 and window.method == 'device peak_bytes_in_use above the start'
  stats['bytes_in_use'] = 150 * 2**20
  window = bench.MemoryWindow()  # Starts below the 400 MiB an earlier window reached.
  stats['peak_bytes_in_use'] = 500 * 2**20  # Passed: exact again.
  assert window.peak_mib() == 350 and 'upper bound' not in window.method
  window = bench.MemoryWindow()
  assert window.peak_mib() == 350 and window.method.startswith('an upper bound')
