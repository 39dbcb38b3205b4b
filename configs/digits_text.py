"""Text-to-image on the embedded digits: captions like "a thick seven", "a small slanted two".

    python -m ldm_jax.main --config=configs/digits_text.py --workdir=runs/digits_text
    python -m ldm_jax.main --config=configs/digits_text.py --workdir=runs/digits_text \
        --mode=sample --prompt="a thick three" --prompt="a small slanted two"

The captions of `digits_captions` name the digit and its thickness, size and slant
(measured from each image). As in the LDM paper's text-to-image model, a BERT-style
encoder is trained from scratch with the U-Net, whose spatial transformers
cross-attend to the encoded caption; captions are dropped at `cond_drop_prob` for
classifier-free guidance.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.name = 'digits_captions'
  config.diffusion.model.update(
      context_dim=64,
      attention_resolutions=(4,),  # Cross-attention at the 4x4 level and in the middle.
      transformer_depth=1,
  )
  config.diffusion.num_train_steps = 1_000
  config.diffusion.conditioning.update(name='text')
  config.diffusion.conditioning.text.update(
      caption_key='caption', vocab_size=64, max_length=8, num_layers=2, num_heads=4)
  config.sample.update(num_steps=100, guidance_scale=3.0)
  config.eval.num_samples = 300  # --mode=eval: about one sample per test image.
  return config
