"""The config is part of the checkpoint: a resumed or restored run must use the same model.

Each stage stores the resolved config with every checkpoint (`checkpointing.save`).
Before anything is written, a run compares its config with the stored one; every
field counts except those in `MAY_CHANGE`, and a difference stops the run with one
line listing the fields (old -> new). Only then does `stages.save_config` write
`config.json`, keeping the earlier versions of it as `config.<n>.json`.
"""
import json

import ml_collections

from ldm_jax import checkpointing
from ldm_jax.errors import UserError

# The one list of fields that may differ between a checkpoint's config and the run
# that resumes, samples, evaluates or edits it: budgets, intervals, sampling,
# evaluation and editing options, the learning-rate schedule's length, where the data
# lives, and how the same computation is laid out (mesh, microbatches, remat, cache).
# A prefix covers its subfields.
MAY_CHANGE = (
    'train',                          # log/checkpoint/image/eval intervals, keep_checkpoints.
    'sample',
    'eval',
    'edit',
    'mesh_shape',
    'data.data_dir',
    'autoencoder.num_train_steps',
    'autoencoder.optim.warmup_steps',
    'diffusion.num_train_steps',
    'diffusion.optim.warmup_steps',
    'diffusion.grad_accum_steps',     # The same update, in microbatches.
    'diffusion.model.remat',          # The same function, recomputed.
    'diffusion.cache_latents',
    'diffusion.cache_shard_size',
)

# The fields (prefixes) that define each stage's checkpoints. Stage 1 may be shared
# by runs of other seeds and data pipelines (`autoencoder.workdir`): only its model,
# its objective and the image shape count; stage 2 depends on everything.
STAGE_FIELDS = {
    'autoencoder': ('autoencoder', 'data.image_size', 'data.num_channels'),
    'diffusion': None,
}
STAGE_MAY_CHANGE = {'autoencoder': ('autoencoder.workdir',), 'diffusion': ()}


def _flatten(tree: dict, prefix: str = '') -> dict[str, object]:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, f'{name}.'))
    else:
      out[name] = value
  return out


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(f'{p}.') for p in prefixes)


def as_json(config: ml_collections.ConfigDict | dict) -> dict:
  """The config as plain JSON data (tuples become lists), as stored in checkpoints."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def differences(stored: dict, config: ml_collections.ConfigDict | dict,
                stage: str = 'diffusion') -> list[str]:
  """'field: old → new' for every field of `stage` that differs and may not change."""
  old, new = _flatten(stored), _flatten(as_json(config))
  fields, may_change = STAGE_FIELDS[stage], MAY_CHANGE + STAGE_MAY_CHANGE[stage]
  names = sorted(set(old) | set(new))
  if fields is not None:
    names = [n for n in names if _under(n, fields)]
  missing = object()
  found = []
  for name in names:
    a, b = old.get(name, missing), new.get(name, missing)
    if a != b and not _under(name, may_change):
      show = lambda v: '(absent)' if v is missing else json.dumps(v)
      found.append(f'{name}: {show(a)} → {show(b)}')
  return found


def check(config: ml_collections.ConfigDict, checkpoint_dirs: dict[str, str]) -> None:
  """Stops with one line if `config` differs from the config stored with any stage's checkpoints.

  Args:
    config: the run's config.
    checkpoint_dirs: stage name ('autoencoder' | 'diffusion') -> its checkpoint directory.
  """
  for stage, directory in checkpoint_dirs.items():
    stored = checkpointing.stored_config(directory)
    if stored is None:
      continue
    found = differences(stored, config, stage)
    if found:
      raise UserError(f'the config differs from the one that made the checkpoints in '
                      f'{directory}: {"; ".join(found)}. Use a new workdir, or the old values')

