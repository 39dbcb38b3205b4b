"""Super-resolution of the eval split by a `concat`-conditioned run, and the bicubic baseline.

Every eval-split image is downsampled as in training (`conditioning.downsample`),
super-resolved by the model with `config.sample`'s sampler, and upsampled bicubically
as the baseline (LDM section 4.4). Both outputs are 8-bit like the originals;
`ldm_jax.evaluation` compares them with PSNR and SSIM under `--mode=eval`. A grid of
the first examples, one row each (bicubic | model | original), and all three arrays
go to WORKDIR/samples/superres_<step>.{png,npz}.
"""
import os

import jax
import ml_collections
import numpy as np

from ldm_jax import conditioning, generate, input_pipeline, stages
from ldm_jax import images as image_io

GRID_ROWS = 8


def superres_outputs(config: ml_collections.ConfigDict, workdir: str,
                     sampler: generate.Sampler, state, ae_params) -> dict[str, np.ndarray]:
  """The eval split super-resolved by the model and bicubically, with the originals.

  Returns:
    {'superres', 'bicubic', 'originals'}: uint8 [N, H, W, C] each, N = eval split size.
  """
  count = input_pipeline.dataset_info(config.data).num_examples[config.data.eval_split]
  examples = conditioning.eval_examples(config, None, count)
  superres, _ = sampler.generate(state.ema_params, ae_params, state.scale_factor,
                                 num_samples=count,
                                 conditions={'cond_image': examples['cond_image']})
  outputs = {
      'superres': superres,
      'bicubic': input_pipeline.postprocess(
          conditioning.bicubic_upsample(examples['cond_image'], config.data.image_size)),
      'originals': input_pipeline.postprocess(examples['image']),
  }
  if jax.process_index() == 0:
    rows = np.stack([outputs[k][:GRID_ROWS] for k in ('bicubic', 'superres', 'originals')],
                    axis=1)  # [rows, 3, H, W, C]
    step = int(jax.device_get(state.step))
    image_io.save_grid_and_arrays(
        os.path.join(stages.samples_dir(workdir), f'superres_{step}.png'),
        os.path.join(stages.samples_dir(workdir), f'superres_{step}.npz'),
        image_io.make_grid(rows.reshape(-1, *rows.shape[2:]), ncols=3), outputs)
  return outputs
