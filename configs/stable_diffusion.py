"""Stable Diffusion 1.x / 2.x (diffusers folders or Hub ids): sample, edit, fine-tune, export.

    python -m ldm_jax.main --config=configs/stable_diffusion.py --workdir=runs/sd \
        --config.pretrained=stabilityai/stable-diffusion-2-1-base \
        --mode=sample --prompt="a photo of an astronaut riding a horse"

Fine-tuning (`--mode=train`) trains the U-Net on a captioned TFDS dataset with the
CLIP text encoder and the VAE frozen: LoRA adapters on the self- and
cross-attention projections with `diffusion.lora.rank > 0`, else the whole U-Net.
`--mode=merge_lora` writes WORKDIR/export/ (a full diffusers pipeline folder with the
trained U-Net) and WORKDIR/export_lora/pytorch_lora_weights.safetensors (LoRA runs).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.pipeline = 'stable_diffusion'  # modes.run routes --mode to ldm_jax/sd_modes.py.
  config.pretrained = ''  # A diffusers Stable Diffusion folder or Hub repo id (required).
  config.seed = 0
  config.mesh_shape = dict(data=-1, fsdp=1)

  # Fine-tuning data: any captioned TFDS dataset (images resized and center-cropped),
  # or name='folder' with folder=PATH: images with captions in sidecar .txt files or a
  # metadata.jsonl (ldm_jax/datasets/folder.py).
  config.data = dict(
      name='digits_captions',
      folder='',
      data_dir='',
      image_size=512,
      num_channels=3,          # The SD VAE takes RGB; grayscale is replicated.
      batch_size=4,
      train_split='train',
      eval_split='test',
      shuffle_buffer=1_000,
      random_flip=False,
      image_key='image',
      label_key='',
      caption_key='caption',
  )

  config.diffusion = dict(
      num_train_steps=1_000,
      ema_decay=0.0,           # 0: the EMA copy is the trained weights.
      cond_drop_prob=0.1,      # Captions -> '' at this rate (classifier-free guidance).
      # Encode the train split once (VAE posteriors and CLIP embeddings of the captions)
      # into WORKDIR/sd_latents and train from there; no flips, one process.
      cache_latents=False,
      # rank > 0: LoRA adapters on these U-Net layers (attn1 = self-, attn2 = cross-attention).
      lora=dict(rank=4, alpha=4.0, targets=('to_q', 'to_k', 'to_v', 'to_out_0')),
      optim=dict(
          learning_rate=1e-4, warmup_steps=0, lr_schedule='constant', end_lr_factor=1.0,
          b1=0.9, b2=0.999, weight_decay=1e-2, grad_clip_norm=1.0,
      ),
  )

  config.train = dict(
      log_every=50,
      checkpoint_every=200,
      keep_checkpoints=2,
      image_every=0,
      eval_every=0,
      report_to='tensorboard',  # tensorboard | wandb (TensorBoard and Weights & Biases).
      profile_steps=0,          # > 0: a JAX profiler trace of that many steps (see default.py).
      compilation_cache_dir='default',  # 'default' | 'workdir' | '' (off) | a path.
  )

  # --mode=sample: prompts from --prompt (repeatable), --negative_prompt.
  config.sample = dict(
      method='ddim',           # ddim | dpm_solver++ | euler (the diffusers schedulers)
      num_steps=50,
      guidance_scale=7.5,
      num_samples=1,           # Images per prompt.
      image_size=0,            # 0 = the pipeline's default (U-Net sample_size x VAE factor).
  )

  # --mode=edit: img2img (SDEdit from `strength`) or inpainting (masked blending) in
  # latent space, guided by --prompt.
  config.edit = dict(
      task='img2img',          # img2img | inpaint
      input='',                # PNG/JPEG, resized to a multiple of 8 x the VAE factor
      mask='',                 # inpaint: PNG, white = regenerate
      strength=0.75,           # img2img: fraction of the schedule re-noised and denoised
      num_samples=1,           # Edits written, each with its own noise.
      jump_length=10,          # inpaint: RePaint's jump length j
      jump_n_sample=10,        # inpaint: RePaint's resampling count r (1: no jumps)
  )
  return config
