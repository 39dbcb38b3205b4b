"""Noise schedule × prediction target, 2 seeds each, on the embedded digits data.

    python -m ldm_jax.ablate --sweep=experiments/schedule_x_prediction.py \
        --workdir=runs/schedule_x_prediction \
        --results_dir=experiments/results/schedule_x_prediction

Every variant shares one first stage (trained once) and the default U-Net, trained
for 600 steps instead of 2,200 so the 12 runs fit in about an hour on a 2-core CPU;
samples come from DDIM-50 with guidance 2, 500 per run for the metrics.
"""
import itertools

SCHEDULES = ('linear', 'scaled_linear', 'cosine')
PREDICTIONS = ('eps', 'v')


def get_sweep():
  return dict(
      config='configs/default.py',
      overrides={
          'diffusion.num_train_steps': 600,
          'train.log_every': 50,
          'sample.method': 'ddim',
          'sample.num_steps': 50,
          'eval.num_samples': 500,
      },
      variants=[
          dict(name=f'{schedule}-{prediction}',
               overrides={'diffusion.schedule': schedule,
                          'diffusion.prediction_type': prediction})
          for schedule, prediction in itertools.product(SCHEDULES, PREDICTIONS)
      ],
      seeds=(0, 1),
      share_autoencoder=True,
  )
