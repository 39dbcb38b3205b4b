"""Optimizer and learning-rate schedule from a stage's `optim` config."""
import jax
import ml_collections
import optax

LR_SCHEDULES = ('cosine', 'constant')


def make_lr_schedule(optim_config: ml_collections.ConfigDict,
                     num_train_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_lr_factor`× or constant."""
  lr, warmup = optim_config.learning_rate, optim_config.warmup_steps
  if optim_config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(num_train_steps, warmup + 1),
        end_value=lr * optim_config.end_lr_factor)
  if optim_config.lr_schedule == 'constant':
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  raise ValueError(f'unknown lr_schedule {optim_config.lr_schedule!r}; '
                   f'accepted: {", ".join(LR_SCHEDULES)}')


def _decay_mask(params):
  # Weight decay on kernels and embeddings only, not on biases or norm scales.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm gradient clipping (none when `grad_clip_norm` is 0).

  Returns:
    (optimizer, lr schedule).
  """
  schedule = make_lr_schedule(optim_config, num_train_steps)
  tx = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                   weight_decay=optim_config.weight_decay, mask=_decay_mask)
  if optim_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  return tx, schedule
