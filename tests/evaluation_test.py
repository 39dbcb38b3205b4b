"""Metrics against closed forms and scikit-image; the eval mode end to end."""
import numpy as np
import pytest
import scipy.linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_jax import evaluation

# ------------------------------------------------------------ Fréchet distance


def test_eval_batches_split_over_data_and_fsdp():
  import jax

  from configs import default
  from ldm_jax import sharding

  config = default.get_config()
  config.eval.batch_size = 6  # Rounded up to 8: the batch splits over data=2 x fsdp=4.
  mesh = sharding.make_mesh(mesh_shape=dict(data=2, fsdp=4))
  batch_size = evaluation._eval_batch_size(config, mesh)
  assert batch_size == 8
  images = np.random.default_rng(0).random((10, 4, 4, 1)).astype(np.float32)
  out = evaluation.map_images(jax.jit(lambda x: {'sum': x.sum(axis=(1, 2, 3))}), images, mesh,
                              batch_size)
  np.testing.assert_allclose(out['sum'], images.sum(axis=(1, 2, 3)), rtol=1e-6)


def test_frechet_distance_of_a_sample_with_itself_is_zero():
  features = np.random.default_rng(0).normal(size=(500, 16)) @ np.diag(np.arange(1, 17.0))
  assert abs(evaluation.frechet_distance_of(features, features)) < 1e-8


def test_frechet_distance_closed_form_for_diagonal_covariances():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  var1, var2 = rng.uniform(0.5, 3, size=6), rng.uniform(0.5, 3, size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
  value = evaluation.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_frechet_distance_matches_sqrtm_for_non_commuting_covariances():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 5, 5))
  sigma1, sigma2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  mu1, mu2 = rng.normal(size=(2, 5))
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2)
              - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real)
  np.testing.assert_allclose(evaluation.frechet_distance(mu1, sigma1, mu2, sigma2), expected,
                             rtol=1e-8)


def test_frechet_distance_of_samples_approaches_the_gaussians_distance():
  rng = np.random.default_rng(3)
  var1, var2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 1.0])
  mu2 = np.array([1.0, 0.0, -1.0])
  x = rng.normal(size=(200_000, 3)) * np.sqrt(var1)
  y = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(var2)
  expected = np.sum(mu2 ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
  np.testing.assert_allclose(evaluation.frechet_distance_of(x, y), expected, rtol=0.02)


# ------------------------------------------------------------------------ KID


def _mmd2_numpy(x, y):
  kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
  m = len(x)
  k_xx, k_yy = kernel(x, x), kernel(y, y)
  return ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) /
          (m * (m - 1)) - 2 * kernel(x, y).mean())


def test_kid_on_whole_sets_is_the_unbiased_mmd():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(40, 8)), 0.5 + rng.normal(size=(30, 8))
  # subset_size is clipped to 30; x is subsampled, y is taken whole.
  mean, std = evaluation.kernel_inception_distance(x[:30], y, num_subsets=3, subset_size=1000)
  np.testing.assert_allclose(mean, _mmd2_numpy(x[:30], y), rtol=1e-4)
  assert std < 1e-5 * abs(mean)  # Every subset is the whole set: equal up to float32 sums.


def test_kid_is_unbiased_for_a_discrete_distribution():
  """E[KID] equals the population MMD², which is exact for distributions on a few points."""
  rng = np.random.default_rng(5)
  support_x = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
  support_y = np.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0]])
  kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
  exact = (kernel(support_x, support_x).mean() + kernel(support_y, support_y).mean()
           - 2 * kernel(support_x, support_y).mean())
  x = support_x[rng.integers(0, 2, size=20_000)]
  y = support_y[rng.integers(0, 2, size=20_000)]
  m, num_subsets = 5, 10_000
  mean, std = evaluation.kernel_inception_distance(x, y, num_subsets=num_subsets,
                                                   subset_size=m, seed=1)
  standard_error = std / np.sqrt(num_subsets)
  assert abs(mean - exact) < 4 * standard_error, (mean, exact, standard_error)
  # The biased (V-statistic) estimate would sit this far off: the test can tell them apart.
  bias = sum(np.mean(np.diag(kernel(s, s))) - kernel(s, s).mean()
             for s in (support_x, support_y)) / m
  assert bias > 10 * standard_error


def test_kid_of_two_samples_of_one_distribution_is_zero_within_noise():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(2, 3000, 16))
  mean, std = evaluation.kernel_inception_distance(x, y, num_subsets=50, subset_size=500)
  assert abs(mean) < 3 * std
  shifted, _ = evaluation.kernel_inception_distance(x, y + 0.5, num_subsets=50, subset_size=500)
  assert shifted > 10 * std


# ----------------------------------------------------------- precision/recall


def _clusters(rng, centers, per_cluster, scale=0.05):
  return np.concatenate([c + scale * rng.normal(size=(per_cluster, centers.shape[1]))
                         for c in centers])


def test_precision_recall_on_constructed_sets():
  rng = np.random.default_rng(7)
  centers = 10.0 * np.eye(10)  # Ten modes, 14 apart; each a tight blob.
  real = _clusters(rng, centers, 300)
  assert evaluation.precision_recall(real, real, k=3) == (1.0, 1.0)
  far = real + 1000.0
  assert evaluation.precision_recall(real, far, k=3) == (0.0, 0.0)
  # Samples from half the modes: all are realistic, half of the real data is covered.
  # Fresh samples of the real distribution: in 10-D, k-NN balls miss some of them, so
  # this pair, not 1/1, is what a perfect generator scores at this set size.
  precision_full, recall_full = evaluation.precision_recall(real, _clusters(rng, centers, 300))
  assert 0.7 < precision_full < 1 and 0.7 < recall_full < 1
  # Samples from half the modes: as realistic, but cover only half of the real data.
  half = _clusters(rng, centers[:5], 300)  # Same density per mode.
  precision, recall = evaluation.precision_recall(real, half, k=3)
  assert precision == pytest.approx(precision_full, abs=0.05)
  assert recall <= 0.5
  assert recall == pytest.approx(recall_full / 2, abs=0.05)


# ------------------------------------------------------------------ PSNR/SSIM


@pytest.mark.parametrize('channels', [1, 3])
def test_psnr_and_ssim_match_scikit_image(channels):
  rng = np.random.default_rng(8)
  # Smooth structure plus noise, in [-1, 1]: SSIM well away from 0 and 1.
  grid = np.linspace(0, 3 * np.pi, 32)
  base = np.sin(grid[:, None] + grid[None, :] * np.arange(1, channels + 1)[:, None, None])
  x = np.clip(np.transpose(base, (1, 2, 0))[None].repeat(2, 0)
              + 0.1 * rng.normal(size=(2, 32, 32, channels)), -1, 1).astype(np.float32)
  y = np.clip(x + rng.normal(scale=[[[[0.1]]], [[[0.3]]]], size=x.shape), -1, 1).astype(np.float32)
  psnr = np.asarray(evaluation.psnr(x, y, data_range=2.0))
  ssim = np.asarray(evaluation.ssim(x, y, data_range=2.0))
  for i in range(2):
    np.testing.assert_allclose(psnr[i], peak_signal_noise_ratio(x[i], y[i], data_range=2.0),
                               rtol=1e-5)
    expected = structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=2.0,
                                     channel_axis=-1)
    np.testing.assert_allclose(ssim[i], expected, atol=1e-5)
  assert 0.1 < ssim[1] < ssim[0] < 0.99
  np.testing.assert_allclose(evaluation.ssim(x, x, data_range=2.0), 1.0, atol=1e-6)


# ------------------------------------------------------------ --mode=eval


@pytest.fixture(scope='module')
def evaluated_run(digits_data_dir, tmp_path_factory):
  """A tiny run trained with eval_every=2, then `--mode=eval` on it (twice)."""
  import contextlib
  import io

  from configs import tiny
  from ldm_jax import modes

  config = tiny.get_config()
  config.data.data_dir = digits_data_dir
  config.autoencoder.num_train_steps = 2
  config.train.eval_every = 2
  workdir = str(tmp_path_factory.mktemp('eval_run'))
  outputs = []
  for run in (lambda: modes.run('train', config, workdir), lambda: modes.run('eval', config, workdir)):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      record = run()
    outputs.append(stdout.getvalue())
  return config, workdir, outputs, record


SAMPLE_METRICS = ('fd_classifier', 'precision', 'recall', 'class_accuracy')
AE_METRICS = ('ae_psnr', 'ae_ssim', 'ae_fd_classifier')


def test_training_evaluates_every_eval_every_steps(evaluated_run):
  import json
  import os

  _, workdir, (train_output, _), _ = evaluated_run
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == [
      'classifier', 'metrics_2.json', 'metrics_4.json']
  with open(os.path.join(workdir, 'eval', 'metrics_2.json')) as f:
    assert json.load(f)['step'] == 2
  # The classifier is trained by the first evaluation and reused by the second.
  assert train_output.count('classifier: trained') == 1
  assert train_output.count('classifier: loaded from') == 1


def test_eval_mode_writes_all_metrics_and_reuses_the_classifier(evaluated_run):
  import json
  import os

  config, workdir, (_, eval_output), record = evaluated_run
  with open(os.path.join(workdir, 'eval', 'metrics_4.json')) as f:
    written = json.load(f)
  assert written == record
  expected = {*SAMPLE_METRICS, *AE_METRICS, 'classifier_test_accuracy', 'step', 'num_samples'}
  expected |= {f'{name}_real' for name in (*SAMPLE_METRICS, 'ae_fd_classifier')}
  assert expected <= set(written), expected - set(written)
  assert written['step'] == 4 and written['num_samples'] == config.eval.num_samples
  assert written['sample_method'] == config.sample.method
  for name in expected - {'step', 'num_samples'}:
    assert np.isfinite(written[name]), name
  assert written['classifier_test_accuracy'] >= 0.9
  assert written['class_accuracy_real'] == written['classifier_test_accuracy']
  # Real test digits are much closer to the train split than 4-step samples are.
  assert written['fd_classifier_real'] < written['fd_classifier']
  assert 0 <= written['precision'] <= 1 and 0.5 < written['recall_real'] <= 1
  assert 'classifier: loaded from' in eval_output and 'classifier: trained' not in eval_output
  assert 'fd_classifier_real' not in eval_output  # Printed beside fd_classifier instead:
  assert f'(real vs real: {written["fd_classifier_real"]:.4f})' in eval_output


def test_eval_without_inception_weights_says_so_and_has_no_fid(evaluated_run):
  _, _, (_, eval_output), record = evaluated_run
  assert 'fid/kid: skipped, no Inception weights' in eval_output
  assert not {'fid', 'kid', 'fid_real', 'kid_real'} & set(record)


def test_eval_scalars_reach_tensorboard(evaluated_run):
  import glob
  import os

  import tensorflow as tf

  _, workdir, _, record = evaluated_run
  tags = {}
  for path in glob.glob(os.path.join(workdir, 'diffusion', 'tensorboard', 'events*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, set()).add(event.step)
  assert tags['eval/fd_classifier'] == {2, 4}
  assert tags['eval/ae_psnr'] == {2, 4}


def test_bad_inception_weights_stop_before_sampling(evaluated_run, tmp_path):
  from ldm_jax import modes
  from ldm_jax.errors import UserError

  config, workdir, _, _ = evaluated_run
  config = config.copy_and_resolve_references()
  config.eval.inception_weights = str(tmp_path / 'missing.pth')
  with pytest.raises(UserError, match='no such file'):
    modes.run('eval', config, workdir)
