"""What the f-sweep and the first-stage ablation share: one stage-2 budget on 16x16 digits.

The digits are upsampled 8x8 scans, so 16x16 loses nothing and keeps pixel-space and
LPIPS trainings within a study's budget on a CPU.
"""
# The files `python -m experiments.lpips_weights --out_dir=runs/lpips` writes.
LPIPS_OVERRIDES = {'autoencoder.lpips_vgg_weights': 'runs/lpips/vgg16_features.npz',
                   'autoencoder.lpips_lin_weights': 'runs/lpips/lpips_vgg_v0.1.npz'}

# 600 stage-2 steps with the best schedule and target of schedule_x_prediction, judged
# on 300 DDIM-50 samples.
STAGE2_OVERRIDES = {
    'data.image_size': 16,
    'diffusion.num_train_steps': 600,
    'diffusion.schedule': 'scaled_linear',
    'diffusion.prediction_type': 'v',
    'train.log_every': 50,
    'sample.method': 'ddim',
    'sample.num_steps': 50,
    'eval.num_samples': 300,
    **LPIPS_OVERRIDES,
}
