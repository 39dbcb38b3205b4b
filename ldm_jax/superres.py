"""Super-resolution metrics of a `concat`-conditioned run against bicubic upsampling.

Every eval-split image is downsampled as in training (`conditioning.downsample`),
super-resolved by the model with `config.sample`'s sampler, and compared with the
original; bicubic upsampling of the same low-resolution input is the baseline (LDM
section 4.4). Both outputs are quantized to 8 bits like the originals, then PSNR
and SSIM (`ldm_jax.evaluation`, data range 2 for [-1, 1] images) are averaged over
the split. A grid of the first examples, one row each (bicubic | model | original),
goes to WORKDIR/samples/superres_<step>.png.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import conditioning, evaluation, generate, input_pipeline

GRID_ROWS = 8


def _to_model_range(pixels: np.ndarray) -> jax.Array:
  return jnp.asarray(pixels, jnp.float32) / 127.5 - 1.0


def superres_metrics(config: ml_collections.ConfigDict, workdir: str,
                     sampler: generate.Sampler, state, ae_params) -> dict[str, float]:
  """PSNR/SSIM of the model's and of bicubic super-resolution over the eval split.

  Returns:
    {'superres_psnr', 'superres_ssim', 'bicubic_psnr', 'bicubic_ssim'} in dB / [0, 1].
  """
  count = input_pipeline.dataset_info(config.data).num_examples[config.data.eval_split]
  examples = conditioning.eval_examples(config, None, count)
  samples, _ = sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                num_samples=count,
                                conditions={'cond_image': examples['cond_image']})
  originals = input_pipeline.postprocess(examples['image'])
  bicubic = input_pipeline.postprocess(
      conditioning.bicubic_upsample(examples['cond_image'], config.data.image_size))
  truth = _to_model_range(originals)
  metrics = {}
  for name, images in (('superres', samples), ('bicubic', bicubic)):
    x = _to_model_range(images)
    metrics[f'{name}_psnr'] = float(jnp.mean(evaluation.psnr(x, truth, 2.0)))
    metrics[f'{name}_ssim'] = float(jnp.mean(evaluation.ssim(x, truth, 2.0)))
  if jax.process_index() == 0:
    rows = np.stack([bicubic[:GRID_ROWS], samples[:GRID_ROWS], originals[:GRID_ROWS]], axis=1)
    step = int(jax.device_get(state.step))
    generate.save_grid_and_arrays(
        os.path.join(workdir, 'samples', f'superres_{step}.png'),
        os.path.join(workdir, 'samples', f'superres_{step}.npz'),
        generate.make_grid(rows.reshape(-1, *rows.shape[2:]), ncols=3),
        {'bicubic': bicubic, 'samples': samples, 'originals': originals})
  return metrics
