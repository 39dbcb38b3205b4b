"""`--mode=eval`: the metrics of the latest diffusion checkpoint of a run."""
import os

import ml_collections

from ldm_jax import evaluation, sharding, train
from ldm_jax.validation import validate_config


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores the latest stage-2 checkpoint (EMA params) and runs `evaluation.run_evaluation`.

  Writes `WORKDIR/eval/metrics_<step>.json` and `eval/<name>` scalars in
  `WORKDIR/diffusion/tensorboard`; returns the record written.
  """
  validate_config(config)
  mesh = sharding.make_mesh(mesh_shape=config.mesh_shape)
  unet, state, _, autoencoder, ae_params = train.restore_trained(config, workdir, mesh)
  writer = train.summary_writer(os.path.join(workdir, 'diffusion', 'tensorboard'))
  return evaluation.run_evaluation(config, workdir, mesh, unet, state, autoencoder, ae_params,
                                   writer)
