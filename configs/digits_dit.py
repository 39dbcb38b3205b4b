"""A Diffusion Transformer (DiT) in place of the U-Net, on the embedded digits data.

    python -m ldm_jax.main --config=configs/digits_dit.py --workdir=runs/digits_dit

Everything but the stage-2 backbone is configs/default.py: the same first stage
(32x32x1 -> 8x8x4), data, schedule, optimizer and step budgets. The DiT (Peebles &
Xie 2023; adaLN-Zero blocks) is sized to the U-Net's training cost: one train step
per image, as counted by `ldm_jax.bench.train_flops_per_image` (forward, backward
and update; XLA's count on the CPU lowering):

    U-Net of configs/default.py                      0.1128 GFLOP/image, 1.00 M params
    DiT patch_size=1, hidden_size=64, depth=5, 4 heads 0.1157 GFLOP/image, 0.40 M params

With patch size 1 each of the 8x8 latent pixels is a token (64 tokens); patch size 2
(16 tokens) at hidden_size=128, depth=5 would cost 0.1024 GFLOP/image.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.diffusion.model = ml_collections.ConfigDict(dict(
      name='dit',
      patch_size=1,         # Side of the square latent patches; tokens = (8 / p)**2.
      hidden_size=64,       # Token width (divisible by num_heads and by 4).
      depth=5,              # DiT blocks.
      num_heads=4,
      mlp_ratio=4.0,        # MLP hidden width / hidden_size.
      context_dim=0,        # > 0: each block cross-attends to a context this wide (PixArt-alpha).
      remat='',             # '' | full | dots_saveable: recompute each block's activations
                            # in the backward pass (less memory, same result).
  ))
  return config
