"""Losses: the denoising loss and its per-timestep weightings, and the first-stage
(autoencoder) reconstruction + KL loss.

The diffusion loss is split in two pure pieces so that weightings can be ablated
without touching the train step:

  weights = loss_weighting(schedule, t, config.weighting, prediction_type=...)   # [B]
  loss, per_example = diffusion_loss(prediction, target, weights)
"""
import jax
import jax.numpy as jnp

from ldm_jax import diffusion

LOSS_WEIGHTINGS = ('uniform', 'min_snr', 'p2')
RECONSTRUCTION_LOSSES = ('l1', 'l2')


def _mean_over_non_batch(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B]: mean over all non-batch dims."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def diffusion_loss(prediction: jax.Array, target: jax.Array,
                   weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted mean squared error of a denoiser.

  Args:
    prediction: [B, ...] model output.
    target: [B, ...] training target of the same prediction type.
    weights: optional [B] per-example weights (e.g. from `loss_weighting`).

  Returns:
    (loss, per_example): per_example [B] is the unweighted MSE of each example over
    all non-batch dims (comparable across weightings, e.g. for per-timestep logs);
    loss is the scalar mean over the batch of weights * per_example.
  """
  per_example = _mean_over_non_batch(jnp.square(prediction - target))  # [B]
  weighted = per_example if weights is None else weights * per_example
  return jnp.mean(weighted), per_example


def loss_weighting(s: diffusion.Schedule, t: jax.Array, name: str, *,
                   prediction_type: str = 'eps', min_snr_gamma: float = 5.0,
                   p2_gamma: float = 1.0, p2_k: float = 1.0) -> jax.Array:
  """Per-example loss weights as a function of the timestep.

  Args:
    s: the schedule.
    t: [B] timestep indices.
    name: one of `LOSS_WEIGHTINGS`:
      'uniform': all ones (the "simple" DDPM loss in the chosen parameterization).
      'min_snr': Min-SNR-gamma (Hang et al. 2023). In x0 space the weight is
        min(SNR, gamma); expressed for the loss in the model's parameterization that
        is min(SNR, gamma) / SNR for 'eps', min(SNR, gamma) / (SNR + 1) for 'v' and
        min(SNR, gamma) for 'x0'.
      'p2': perception-prioritized weighting (Choi et al. 2022), 1 / (k + SNR)^gamma
        on the eps loss; for other parameterizations it is converted through the same
        x0-space factors as 'min_snr', so that every parameterization optimizes the
        same objective.
    prediction_type: the parameterization the loss is computed in.
    min_snr_gamma: gamma of 'min_snr'.
    p2_gamma: gamma of 'p2' (0 is uniform in eps space; the paper uses 0.5 or 1).
    p2_k: k of 'p2'.

  Returns:
    [B] float32 weights.

  Raises:
    ValueError: for an unknown weighting or prediction type.
  """
  if name not in LOSS_WEIGHTINGS:
    raise ValueError(f"unknown loss weighting '{name}'; accepted: "
                     f"{', '.join(LOSS_WEIGHTINGS)}")
  diffusion.check_prediction_type(prediction_type)
  t = jnp.asarray(t)
  if name == 'uniform':
    return jnp.ones(t.shape, jnp.float32)
  snr = diffusion.snr(s, t)
  # Both weightings are defined as weights w_x0 on the x0-space error; the squared
  # error of an eps (v) prediction is SNR (SNR + 1) times that of the x0 it implies.
  # The eps weights w_x0 / SNR are taken in closed form: finite at SNR = 0 (a
  # zero-terminal-SNR schedule), where the quotient is 0 / 0.
  if name == 'min_snr':
    x0_weight = jnp.minimum(snr, min_snr_gamma)
    eps_weight = jnp.where(snr > min_snr_gamma, min_snr_gamma / snr, 1.0)
  else:  # p2: 1 / (k + SNR)^gamma on the eps loss = SNR / (k + SNR)^gamma on x0.
    eps_weight = 1.0 / (p2_k + snr) ** p2_gamma
    x0_weight = snr * eps_weight
  if prediction_type == 'eps':
    return eps_weight
  if prediction_type == 'v':
    return x0_weight / (snr + 1.0)
  return x0_weight


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over non-batch dims.

  Args:
    mean: [B, ...] posterior mean.
    logvar: [B, ...] posterior log variance.

  Returns:
    [B] KL divergences in nats.
  """
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


def autoencoder_loss(reconstruction: jax.Array, images: jax.Array, mean: jax.Array,
                     logvar: jax.Array, *, kl_weight: float,
                     reconstruction_loss: str = 'l1') -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss of the KL-regularized first-stage autoencoder (LDM's KL-f models).

  loss = reconstruction term + kl_weight * KL, where the reconstruction term is the
  per-pixel L1 or squared error averaged over pixels and batch, and KL is that of the
  latent posterior N(mean, exp(logvar)) against N(0, I), summed over latent dims and
  averaged over the batch.

  Args:
    reconstruction: [B, H, W, C] decoder output.
    images: [B, H, W, C] inputs, in [-1, 1].
    mean: [B, h, w, c] latent posterior mean.
    logvar: [B, h, w, c] latent posterior log variance.
    kl_weight: weight of the KL term (LDM uses ~1e-6).
    reconstruction_loss: one of `RECONSTRUCTION_LOSSES`.

  Returns:
    (loss, metrics) with metrics 'reconstruction_loss', 'kl' and 'loss' (scalars).

  Raises:
    ValueError: for an unknown reconstruction loss.
  """
  if reconstruction_loss not in RECONSTRUCTION_LOSSES:
    raise ValueError(f"unknown reconstruction loss '{reconstruction_loss}'; accepted: "
                     f"{', '.join(RECONSTRUCTION_LOSSES)}")
  diff = reconstruction - images
  per_pixel = jnp.abs(diff) if reconstruction_loss == 'l1' else jnp.square(diff)
  rec = jnp.mean(per_pixel)
  kl = jnp.mean(kl_to_standard_normal(mean, logvar))
  loss = rec + kl_weight * kl
  return loss, {'reconstruction_loss': rec, 'kl': kl, 'loss': loss}


def psnr(a: jax.Array, b: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB of each example.

  Args:
    a: [B, ...] images (default range [-1, 1]).
    b: [B, ...] images of the same shape.
    data_range: max - min of the pixel range (2 for [-1, 1]).

  Returns:
    [B] 10 log10(data_range^2 / MSE), the MSE taken over each example's pixels;
    +inf for identical examples. Average it over examples for a dataset PSNR.
  """
  mse = _mean_over_non_batch(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
  return 10.0 * jnp.log10(data_range**2 / mse)


# ------------------------------------------- first stage: LPIPS + PatchGAN ----
# As taming-transformers' / LDM's `LPIPSWithDiscriminator` and `VQLPIPSWithDiscriminator`.

DISCRIMINATOR_LOSSES = ('hinge', 'vanilla')
# Bounds of the adaptive weight and the epsilon of its denominator, as in taming.
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array,
                       name: str = 'hinge') -> jax.Array:
  """The discriminator's loss on real and reconstructed images' logits.

  'hinge': (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2;
  'vanilla': (mean(softplus(-real)) + mean(softplus(fake))) / 2, the non-saturating
  binary cross-entropy of real = 1, fake = 0.

  Raises:
    ValueError: for an unknown loss name.
  """
  if name == 'hinge':
    real, fake = jax.nn.relu(1.0 - logits_real), jax.nn.relu(1.0 + logits_fake)
  elif name == 'vanilla':
    real, fake = jax.nn.softplus(-logits_real), jax.nn.softplus(logits_fake)
  else:
    raise ValueError(f"unknown discriminator loss '{name}'; accepted: "
                     f"{', '.join(DISCRIMINATOR_LOSSES)}")
  return 0.5 * (jnp.mean(real) + jnp.mean(fake))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The autoencoder's adversarial term, -mean(D(reconstruction)) (taming, both losses)."""
  return -jnp.mean(logits_fake)


def adopt_weight(weight: float, step: jax.Array, threshold: int) -> jax.Array:
  """`weight` from step `threshold` on, 0 before (taming's `disc_start`)."""
  return jnp.where(step < threshold, 0.0, weight)


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array) -> jax.Array:
  """λ = ‖∇L_rec‖ / (‖∇L_GAN‖ + 1e-4), clipped to [0, 1e4], without gradient.

  Args:
    rec_grad: gradient of the reconstruction (NLL) loss w.r.t. the decoder's last layer.
    gan_grad: gradient of the generator's adversarial loss w.r.t. the same weights.
  """
  weight = jnp.linalg.norm(rec_grad.ravel()) / (
      jnp.linalg.norm(gan_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, ADAPTIVE_WEIGHT_MAX))


def gaussian_nll(reconstruction_error: jax.Array, logvar: jax.Array) -> jax.Array:
  """LDM's NLL of a Laplace/Gaussian-like likelihood with one learned log-variance.

  Args:
    reconstruction_error: [B, ...] per-pixel error (|x - x̂| + perceptual term).
    logvar: [] the log-variance.

  Returns:
    sum(error / exp(logvar) + logvar) / B: summed over pixels, averaged over the batch.
  """
  nll = reconstruction_error / jnp.exp(logvar) + logvar
  return jnp.sum(nll) / reconstruction_error.shape[0]
