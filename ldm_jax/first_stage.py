"""LDM's first-stage objective: LPIPS + PatchGAN on a KL or VQ autoencoder.

As taming-transformers' `LPIPSWithDiscriminator` (KL models, LDM
`contperceptual.py`) and `VQLPIPSWithDiscriminator` (VQ models):

  rec  = |x - x̂| + perceptual_weight · LPIPS(x, x̂)                      (per pixel)
  KL:  nll = Σ_pixels (rec / exp(logvar) + logvar) / B,  reg = kl_weight · KL
  VQ:  nll = mean(rec),                                    reg = codebook_weight · L_codebook
  generator:     nll + reg + λ · f(step) · (−mean D(x̂))
  discriminator: f(step) · hinge / vanilla loss of D(x), D(sg[x̂])

with f(step) = disc.factor from `disc.start` on (0 before) and the adaptive weight
λ = disc.weight · clip(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) at the decoder's last
conv kernel W. Both updates happen in one jitted step: the discriminator sees the
reconstruction of the generator's forward pass (before its update), and real and
fake batches go through it separately, so batch norm normalizes each on its own, as
in taming. The discriminator (params and optimizer state) and the NLL log-variance
live in the stage-1 `TrainState`, so checkpoints, resume and FSDP cover them.

A VQ model with `codebook_update='ema'` drops the codebook term (its loss is the
commitment term alone) and after each step sets the codebook to the EMA of the
encoder outputs assigned to each code (`autoencoder.ema_codebook_update`); the EMA
statistics (cluster sizes, embedding sums) are state fields too.

The per-term gradients the adaptive weight needs are taken as cotangents at the
reconstruction and pulled back through the last layer only; the autoencoder is
differentiated once, with the combined cotangent.
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax import losses, optim, perceptual
from ldm_jax.errors import UserError
from ldm_jax.models.autoencoder import VQModel, codebook_statistics, ema_codebook_update
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.train_state import TrainState, ema_decay_at

Params = Any
Metrics = dict[str, jax.Array]


def uses_objective(config: ml_collections.ConfigDict) -> bool:
  """Whether stage 1 trains with this objective (else: plain L1/L2 + KL)."""
  c = config.autoencoder
  return (c.perceptual_weight > 0 or c.disc.weight > 0 or c.model.name == 'vq')


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The fields of `config.autoencoder` the objective reads."""
  kl_weight: float
  perceptual_weight: float
  codebook_weight: float
  learn_logvar: bool
  disc_weight: float
  disc_start: int
  disc_factor: float
  disc_loss: str
  ema_decay: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'LossSpec':
    c = config.autoencoder
    return cls(kl_weight=c.kl_weight, perceptual_weight=c.perceptual_weight,
               codebook_weight=c.codebook_weight, learn_logvar=c.learn_logvar,
               disc_weight=c.disc.weight, disc_start=c.disc.start, disc_factor=c.disc.factor,
               disc_loss=c.disc.loss, ema_decay=c.ema_decay)

  @property
  def adversarial(self) -> bool:
    return self.disc_weight > 0 and self.disc_factor > 0


@flax.struct.dataclass
class FirstStageTrainState(TrainState):
  """The stage-1 state with the discriminator and the NLL log-variance."""
  disc_params: Params = None
  disc_opt_state: optax.OptState = None
  logvar: jax.Array = None                 # [] float32
  logvar_opt_state: optax.OptState = None  # The autoencoder's optimizer on `logvar`.
  # VQ with codebook_update='ema' (else None): the EMA statistics of the codebook.
  codebook_cluster_size: jax.Array = None  # [K] float32
  codebook_embed_sum: jax.Array = None     # [K, D] float32
  # The discriminator's optimizer is an argument of `train_step`, not a static field:
  # states built by separate calls must have equal tree structures.


def uses_ema_codebook(config: ml_collections.ConfigDict) -> bool:
  """Whether stage 1 is a VQ model whose codebook follows EMAs of the encoder outputs."""
  model = config.autoencoder.model
  return model.name == 'vq' and model.get('codebook_update', 'loss') == 'ema'


def codebook(params: Params) -> jax.Array:
  """The [K, D] codebook in a `VQModel`'s params."""
  return params['quantize']['embedding']['embedding']


def _with_codebook(params: Params, codes: jax.Array) -> Params:
  quantize = {**params['quantize'], 'embedding': {**params['quantize']['embedding'],
                                                  'embedding': codes}}
  return {**params, 'quantize': quantize}


def build_discriminator(config: ml_collections.ConfigDict) -> nn.Module:
  d = config.autoencoder.disc
  return NLayerDiscriminator(ndf=d.ndf, n_layers=d.num_layers,
                             dtype=jnp.dtype(config.autoencoder.compute_dtype))


def make_disc_optimizer(config: ml_collections.ConfigDict):
  """(optimizer, lr schedule) of the discriminator, from `config.autoencoder.disc.optim`."""
  return optim.make_optimizer(config.autoencoder.disc.optim, config.autoencoder.num_train_steps)


def create_state(config: ml_collections.ConfigDict, params: Params,
                 tx: optax.GradientTransformation, rng: jax.Array, disc: nn.Module,
                 disc_tx: optax.GradientTransformation) -> FirstStageTrainState:
  """A fresh stage-1 state; the discriminator is initialized from its own seed stream."""
  size, channels = config.data.image_size, config.data.num_channels
  disc_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  disc_params = disc.init(disc_rng, jnp.zeros((1, size, size, channels)))['params']
  logvar = jnp.asarray(config.autoencoder.logvar_init, jnp.float32)
  cluster_size = embed_sum = None
  if uses_ema_codebook(config):
    # Every code starts as if it had been chosen once by itself: e_k = m_k / N_k is the
    # initial codebook, and a code no latent chooses keeps its place while N_k decays
    # (taming starts N at 0, which throws unchosen codes far out at the first step).
    embed_sum = jnp.asarray(codebook(params), jnp.float32)
    cluster_size = jnp.ones((embed_sum.shape[0],), jnp.float32)
  return FirstStageTrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), rng=rng, tx=tx,
      disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params), logvar=logvar,
      logvar_opt_state=tx.init(logvar), codebook_cluster_size=cluster_size,
      codebook_embed_sum=embed_sum)


def load_lpips_params(config: ml_collections.ConfigDict) -> dict | None:
  """LPIPS params when the perceptual term is on; refuses to run without its weights."""
  c = config.autoencoder
  if c.perceptual_weight <= 0:
    return None
  check_lpips_files(c.lpips_vgg_weights, c.lpips_lin_weights, 'config.autoencoder')
  return perceptual.load_lpips(c.lpips_vgg_weights, c.lpips_lin_weights)[1]


def check_lpips_files(vgg: str, lin: str, where: str) -> None:
  if not vgg or not lin:
    raise UserError(f'{where}.perceptual_weight > 0 needs the LPIPS weights: set '
                    f'{where}.lpips_vgg_weights (torchvision vgg16 .pth) and '
                    f'{where}.lpips_lin_weights (lpips weights/v0.1/vgg.pth)')


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    lr_schedule: optax.Schedule) -> Callable:
  """`train_step` with the discriminator, its optimizer and the loss settings of `config`:
  `step(state, batch, lpips_params) -> (state, metrics)`, to be jitted."""
  return functools.partial(train_step, model=model, disc=build_discriminator(config),
                           disc_tx=make_disc_optimizer(config)[0],
                           spec=LossSpec.from_config(config), lr_schedule=lr_schedule)


def _last_layer(grads: Params) -> jax.Array:
  return grads['decoder']['conv_out']['kernel']


def train_step(state: FirstStageTrainState, batch: dict[str, jax.Array],
               lpips_params: dict | None, *, model: nn.Module, disc: nn.Module,
               disc_tx: optax.GradientTransformation, spec: LossSpec,
               lr_schedule: optax.Schedule) -> tuple[FirstStageTrainState, Metrics]:
  """One generator (autoencoder) update and one discriminator update.

  Args:
    state: the stage-1 state.
    batch: 'image' [B, H, W, C] in [-1, 1].
    lpips_params: LPIPS params (frozen), or None when perceptual_weight is 0.
    model: an `AutoencoderKL` or `VQModel`.
    disc: the discriminator.
    disc_tx: its optimizer.
    spec: the loss settings.
    lr_schedule: for the logged learning rate.

  Returns:
    (new state, metrics): loss, rec_loss, nll, kl or codebook_loss (+ usage and
    perplexity), p_loss, g_loss, d_weight, disc_factor, logvar, disc_loss,
    logits_real, logits_fake, grad_norm, lr.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  images = batch['image']
  is_vq = isinstance(model, VQModel)

  ema_codebook = is_vq and model.codebook_update == 'ema'

  def forward(params):
    if is_vq:
      reconstruction, codebook_loss, indices, latents = model.apply(
          {'params': params}, images, method=model.reconstruct)
      return (reconstruction, codebook_loss), (indices, latents)
    reconstruction, mean, logvar = model.apply({'params': params}, images, rng)
    return (reconstruction, (mean, logvar)), (None, None)

  (reconstruction, reg_inputs), pullback, (indices, latents) = jax.vjp(
      forward, state.params, has_aux=True)

  def nll_fn(reconstruction, logvar):
    error = jnp.abs(images - reconstruction)
    p_loss = jnp.zeros((images.shape[0],), jnp.float32)
    if spec.perceptual_weight > 0:
      p_loss = perceptual.lpips_fn(jax.lax.stop_gradient(lpips_params), images, reconstruction)
      error = error + spec.perceptual_weight * p_loss[:, None, None, None]
    nll = jnp.mean(error) if is_vq else losses.gaussian_nll(error, logvar)
    return nll, (jnp.mean(jnp.abs(images - reconstruction)), jnp.mean(p_loss))

  (nll, (rec_loss, p_loss)), (nll_cotangent, logvar_grad) = jax.value_and_grad(
      nll_fn, argnums=(0, 1), has_aux=True)(reconstruction, state.logvar)

  metrics: Metrics = {}
  if is_vq:
    reg_loss = spec.codebook_weight * reg_inputs
    reg_cotangent = jnp.asarray(spec.codebook_weight, jnp.float32)
    metrics['codebook_loss'] = reg_inputs
    metrics.update(codebook_statistics(indices, model.num_vq_embeddings))
  else:
    kl_fn = lambda moments: jnp.mean(losses.kl_to_standard_normal(*moments))
    kl, kl_grads = jax.value_and_grad(kl_fn)(reg_inputs)
    reg_loss = spec.kl_weight * kl
    reg_cotangent = jax.tree.map(lambda g: spec.kl_weight * g, kl_grads)
    metrics['kl'] = kl
  zero_reg = jax.tree.map(jnp.zeros_like, reg_cotangent)

  disc_factor = losses.adopt_weight(spec.disc_factor, state.step, spec.disc_start)
  active = spec.adversarial & (disc_factor > 0)

  def adversarial(_):
    def g_fn(reconstruction):
      return losses.generator_loss(disc.apply({'params': state.disc_params}, reconstruction))
    g_loss, g_cotangent = jax.value_and_grad(g_fn)(reconstruction)
    # Gradients w.r.t. the last layer only: the rest of these pullbacks is dead code.
    nll_last = _last_layer(pullback((nll_cotangent, zero_reg))[0])
    g_last = _last_layer(pullback((g_cotangent, zero_reg))[0])
    d_weight = losses.adaptive_weight(nll_last, g_last) * spec.disc_weight
    return g_loss, d_weight, g_cotangent

  def inactive(_):
    zero = jnp.zeros((), jnp.float32)
    return zero, zero, jnp.zeros_like(reconstruction)

  if spec.adversarial:
    # Computed every step and masked before disc.start, not skipped by `lax.cond`: on
    # XLA:CPU the step with the branch inside a conditional ran 5x slower than this.
    g_loss, d_weight, g_cotangent = adversarial(None)
    g_loss, d_weight = (jnp.where(active, v, 0.0) for v in (g_loss, d_weight))
  else:
    g_loss, d_weight, g_cotangent = inactive(None)
  gan_scale = d_weight * disc_factor
  grads = pullback((nll_cotangent + gan_scale * g_cotangent, reg_cotangent))[0]
  loss = nll + reg_loss + gan_scale * g_loss

  new_state = state.apply_gradients(grads, ema_decay=spec.ema_decay)
  if ema_codebook:
    # The codebook has no gradient here (straight-through, no codebook term): it is set
    # to the EMA of its assigned encoder outputs, and the parameter EMA follows it.
    cluster_size, embed_sum, codes = ema_codebook_update(
        state.codebook_cluster_size, state.codebook_embed_sum, jax.lax.stop_gradient(latents),
        indices, model.codebook_ema_decay, model.codebook_ema_epsilon)
    decay = ema_decay_at(state.step, spec.ema_decay)
    ema_codes = decay * codebook(state.ema_params) + (1.0 - decay) * codes
    new_state = new_state.replace(
        params=_with_codebook(new_state.params, codes),
        ema_params=_with_codebook(new_state.ema_params, ema_codes),
        codebook_cluster_size=cluster_size, codebook_embed_sum=embed_sum)
  logvar, logvar_opt_state = state.logvar, state.logvar_opt_state
  if spec.learn_logvar and not is_vq:
    updates, logvar_opt_state = state.tx.update(logvar_grad, logvar_opt_state, logvar)
    logvar = optax.apply_updates(logvar, updates)

  # The discriminator's update, on the reconstruction of the generator's forward pass.
  fake = jax.lax.stop_gradient(reconstruction)

  def disc_loss_fn(disc_params):
    logits_real = disc.apply({'params': disc_params}, images)
    logits_fake = disc.apply({'params': disc_params}, fake)
    d_loss = disc_factor * losses.discriminator_loss(logits_real, logits_fake, spec.disc_loss)
    return d_loss, (jnp.mean(logits_real), jnp.mean(logits_fake))

  def disc_grads(_):
    return jax.value_and_grad(disc_loss_fn, has_aux=True)(state.disc_params)

  def no_disc_grads(_):
    zero = jnp.zeros((), jnp.float32)
    return (zero, (zero, zero)), jax.tree.map(jnp.zeros_like, state.disc_params)

  if spec.adversarial:
    # Before disc.start the loss is 0 · (...): zero gradients, as taming's optimizer sees
    # (computed, not skipped: see the generator's terms above).
    (d_loss, (logits_real, logits_fake)), d_grads = disc_grads(None)
    logits_real, logits_fake = (jnp.where(active, v, 0.0) for v in (logits_real, logits_fake))
    d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state,
                                                     state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)
  else:
    (d_loss, (logits_real, logits_fake)), _ = no_disc_grads(None)
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state

  new_state = new_state.replace(disc_params=disc_params, disc_opt_state=disc_opt_state,
                                logvar=logvar, logvar_opt_state=logvar_opt_state)
  metrics.update(
      loss=loss, rec_loss=rec_loss, nll=nll, p_loss=p_loss, g_loss=g_loss, d_weight=d_weight,
      disc_factor=disc_factor, logvar=state.logvar, disc_loss=d_loss, logits_real=logits_real,
      logits_fake=logits_fake, grad_norm=optax.global_norm(grads), lr=lr_schedule(state.step))
  return new_state, metrics
