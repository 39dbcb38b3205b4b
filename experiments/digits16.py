"""What the digits studies share: one short stage-2 budget, at 16x16 for the f-sweep and
the first-stage ablation.

The digits are upsampled 8x8 scans, so 16x16 loses nothing and keeps pixel-space and
LPIPS trainings within a study's budget on a CPU.
"""
# The files `python -m experiments.lpips_weights --out_dir=runs/lpips` writes.
LPIPS_OVERRIDES = {'autoencoder.lpips_vgg_weights': 'runs/lpips/vgg16_features.npz',
                   'autoencoder.lpips_lin_weights': 'runs/lpips/lpips_vgg_v0.1.npz'}

# The studies' short stage-2 budget: 600 steps with the best schedule and target of
# schedule_x_prediction, sampled with DDIM-50 (backbone.py uses it at 32x32 too).
SHORT_BUDGET = {
    'diffusion.num_train_steps': 600,
    'diffusion.schedule': 'scaled_linear',
    'diffusion.prediction_type': 'v',
    'train.log_every': 50,
    'sample.method': 'ddim',
    'sample.num_steps': 50,
}

# The budget at 16x16, judged on 300 samples.
STAGE2_OVERRIDES = {
    'data.image_size': 16,
    **SHORT_BUDGET,
    'eval.num_samples': 300,
    **LPIPS_OVERRIDES,
}
