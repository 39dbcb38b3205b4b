"""Noise schedule × prediction target, 2 seeds each, on the embedded digits data.

    python -m ldm_jax.ablate --sweep=experiments/schedule_x_prediction.py \
        --workdir=runs/schedule_x_prediction \
        --results_dir=experiments/results/schedule_x_prediction

Every variant shares one first stage (trained once) and the default U-Net, trained
for 600 steps instead of 2,200 so the 12 runs fit in about an hour on a 2-core CPU.
Each run is evaluated with guidance 2 by three samplers:

  ddim50          DDIM-50, 500 samples: the study's original evaluation;
  ddim50-n100     DDIM-50, 100 samples;
  ddpm250-n100    ancestral DDPM-250 (the default config's sampler), 100 samples.

The last two see the same number of samples, so they compare the samplers on one
footing; DDPM-250 costs 5x the model evaluations of DDIM-50, hence the smaller count
(FD is biased upward by few samples: compare FDs only within one sample count). The
re-evaluation ran seed 0 only, within its time budget:

    python -m ldm_jax.ablate --sweep=experiments/schedule_x_prediction.py --seeds=0 \
        --workdir=runs/schedule_x_prediction \
        --results_dir=experiments/results/schedule_x_prediction_samplers
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
      samplers=(
          dict(name='ddim50', method='ddim', num_steps=50),
          dict(name='ddim50-n100', method='ddim', num_steps=50, **{'eval.num_samples': 100}),
          dict(name='ddpm250-n100', method='ddpm', num_steps=250,
               **{'eval.num_samples': 100}),
      ),
  )
