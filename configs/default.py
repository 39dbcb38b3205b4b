"""Two-stage latent diffusion on the embedded `digits` data; minutes on a laptop CPU.

    python -m ldm_jax.main --config=configs/default.py --workdir=runs/default

Stage 1 learns a KL autoencoder 32x32x1 -> 8x8x4 (f=4); stage 2 learns a
class-conditional U-Net on those latents. Every field below may be overridden from
the command line, e.g. `--config.diffusion.schedule=cosine`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order, diffusion noise and sampling.
  # Devices as a (data, fsdp) mesh; -1 = the rest. Parameters and optimizer state
  # are split over `fsdp` (fsdp=1: replicated, pure data parallelism).
  config.mesh_shape = dict(data=-1, fsdp=1)

  config.data = dict(
      name='digits',          # Any TFDS name: digits (embedded), mnist, cifar10, ...; or 'folder'.
      folder='',              # name='folder': a directory (or gs:// URI) of images, see
                              # ldm_jax/datasets/folder.py (class subdirectories, captions).
      data_dir='',            # TFDS data dir; '' = TFDS default (~/tensorflow_datasets).
      image_size=32,          # Images are resized (and center-cropped) to this square.
      num_channels=1,         # 1 = grayscale, 3 = RGB; converted in the pipeline.
      batch_size=64,          # Global batch over all devices and hosts.
      train_split='train',
      eval_split='test',
      shuffle_buffer=2_000,
      random_flip=False,      # Horizontal flips would turn digits into mirror images.
      image_key='image',
      label_key='label',      # '' for datasets without labels.
  )

  # Stage 1: KL-regularized autoencoder (same block structure as the SD VAE).
  config.autoencoder = dict(
      workdir='',             # Reuse stage 1 of another run (its WORKDIR) instead of training.
      # A diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-mse) used instead of
      # training stage 1; `model` is then read from its config.json and its scaling_factor
      # is the diffusion scale_factor unless that is set.
      pretrained='',
      model=dict(
          name='autoencoder_kl',
          block_out_channels=(16, 32, 32),  # Downsampling factor 2**(len - 1) = 4.
          layers_per_block=1,
          latent_channels=4,
          norm_num_groups=8,
          mid_block_attention=True,
      ),
      kl_weight=1e-6,         # LDM's KL-reg weight: latents stay close to identity-scaled.
      reconstruction_loss='l1',
      # LDM's first-stage objective (taming's LPIPSWithDiscriminator; for VQ models
      # VQLPIPSWithDiscriminator) replaces the plain loss above when perceptual_weight
      # or disc.weight is > 0, and always for model.name='vq'.
      perceptual_weight=0.0,  # > 0: adds weight * LPIPS(x, x_rec); needs both files:
      lpips_vgg_weights='',   # torchvision's vgg16 state dict (vgg16-397923af.pth).
      lpips_lin_weights='',   # the lpips package's weights/v0.1/vgg.pth.
      logvar_init=0.0,        # KL models: log-variance of the NLL.
      learn_logvar=False,     # LDM's KL models keep it at logvar_init (not optimized).
      codebook_weight=1.0,    # VQ models: weight of the codebook loss.
      disc=dict(              # PatchGAN discriminator (taming's NLayerDiscriminator).
          weight=0.0,         # 0 = no discriminator; scales the adaptive weight.
          start=50_001,       # Step from which the adversarial terms are on.
          factor=1.0,
          loss='hinge',       # hinge | vanilla
          num_layers=3,
          ndf=64,
          optim=dict(learning_rate=4.5e-6, warmup_steps=0, lr_schedule='constant',
                     end_lr_factor=1.0, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip_norm=0.0),
      ),
      compute_dtype='float32',  # float32 | bfloat16 activations; params stay float32.
      num_train_steps=350,
      ema_decay=0.0,          # 0 = use the raw parameters.
      optim=dict(
          learning_rate=2e-3, warmup_steps=100, lr_schedule='cosine', end_lr_factor=0.05,
          b1=0.9, b2=0.99, weight_decay=0.0, grad_clip_norm=1.0,  # 0 = no clipping.
      ),
  )

  # Stage 2: denoising U-Net on latents.
  config.diffusion = dict(
      model=dict(
          name='unet',
          base_channels=32,
          channel_mult=(1, 2),
          num_res_blocks=2,
          attention_resolutions=(4,),   # Feature-map sizes with self-attention.
          num_heads=4,
          head_dim=0,                   # > 0: heads of this width instead of num_heads.
          dropout=0.0,
          norm_num_groups=16,
          context_dim=0,                # > 0: spatial transformers cross-attend to a context this wide.
          transformer_depth=1,          # Transformer blocks per spatial transformer.
          use_linear_projection=False,  # Spatial transformer proj_in/out: Dense (SD 2), not 1x1 conv.
          remat='',                     # '' | full | dots_saveable: recompute activations
                                        # of each block in the backward pass (less memory).
          attention_impl='auto',        # auto | xla | cudnn: how self-attention is computed
                                        # (auto: cuDNN fused attention on NVIDIA GPUs in bf16/fp16).
          fuse_norm_activation=False,   # GroupNorm+SiLU as one function (slower on CPU and H200).
      ),
      # A diffusers UNet2DModel folder that stage 2 starts from; the U-Net is built from
      # its config.json (`model` above is then unused).
      init_from='',
      # LoRA fine-tuning of the init_from U-Net: rank 0 = off (train all weights).
      # Adapters on the kernels of the named submodules (ldm_jax/lora.py lists them;
      # e.g. add 'conv1', 'conv2' for the ResnetBlock convs), scaled by alpha / rank.
      lora=dict(rank=0, alpha=4.0, targets=('to_q', 'to_k', 'to_v', 'to_out')),
      cond_drop_prob=0.1,      # Label and condition -> null at this rate (classifier-free guidance).
      # What else the U-Net is conditioned on (LDM section 3.3); see ldm_jax/conditioning.py.
      conditioning=dict(
          # '' (none) | class (dataset labels, embedded by the denoiser) | text |
          # precomputed | concat; ldm_jax/conditioning.py lists what each reads.
          name='class',
          frozen=False,        # True: the conditioner's parameters are not trained.
          text=dict(           # A word-level tokenizer + BERT-style encoder trained from scratch.
              caption_key='caption',  # TFDS feature ('a/b' for nested ones, e.g. captions/text).
              vocab_size=256,         # Most frequent training-caption words + 3 special tokens.
              max_length=16,          # Tokens per caption, [CLS] included; longer ones are cut.
              num_layers=2,
              num_heads=4,
          ),
          precomputed=dict(context_key='context'),  # TFDS feature [L, context_dim]; zero rows = padding.
          concat=dict(factor=4),  # Low-res condition: the image downsampled by this factor.
      ),
      schedule='linear',       # linear | scaled_linear | cosine | sigmoid
      beta_start=0.0,          # 0 = the schedule's own default (linear: 1e-4, scaled_linear: 8.5e-4).
      beta_end=0.0,            # 0 = the schedule's own default (linear: 0.02, scaled_linear: 0.012).
      num_timesteps=1_000,
      rescale_zero_terminal_snr=False,  # Lin et al. 2024; pair with prediction_type='v'.
      prediction_type='eps',   # eps | x0 | v
      loss_weighting='uniform',  # uniform | min_snr | p2
      min_snr_gamma=5.0,
      p2_gamma=1.0,
      p2_k=1.0,
      scale_factor=0.0,        # 0 = from data: 1/std of the encoder posterior over the
                               # first batch, or over the whole cache with cache_latents.
      compute_dtype='float32',  # float32 | bfloat16 activations; params, optimizer state,
                                # GroupNorm statistics, softmax and loss stay float32.
      grad_accum_steps=1,      # Microbatches per update; the update equals one big batch.
      cache_latents=False,     # Encode the train split once into WORKDIR/latents and train
                               # from the cached posteriors (--mode=encode builds it alone).
      cache_shard_size=10_000,  # Examples per cache file (rounded to whole batches).
      num_train_steps=2_200,
      ema_decay=0.999,        # Warmed up: min(ema_decay, (1 + step) / (10 + step)).
      optim=dict(
          learning_rate=1e-3, warmup_steps=200, lr_schedule='cosine', end_lr_factor=0.05,
          b1=0.9, b2=0.99, weight_decay=0.0, grad_clip_norm=1.0,
      ),
  )

  config.train = dict(
      log_every=100,           # Scalars to TensorBoard, NaN check.
      checkpoint_every=500,  # Also saved at the end of each stage.
      keep_checkpoints=2,
      image_every=0,           # Reconstruction / sample images to TensorBoard; 0 = at the end.
      eval_every=0,            # Stage 2 runs the --mode=eval metrics every N steps; 0 = never.
      report_to='tensorboard',  # tensorboard | wandb (TensorBoard and Weights & Biases).
      profile_steps=0,         # > 0: a JAX profiler trace of that many steps per stage,
                               # after the compiling one, in the stage's TensorBoard dir.
      # Compiled programs kept between runs: 'default' ($JAX_COMPILATION_CACHE_DIR or
      # ~/.cache/ldm_jax/jax) | 'workdir' (WORKDIR/jax_cache, shared by a pod) | '' (off) | a path.
      compilation_cache_dir='default',
      # The train state's device layouts: 'auto' (XLA's choice: no kernel transposes
      # around cuDNN's convolutions; see ldm_jax/layouts.py) | 'default' (row-major).
      state_layouts='auto',
  )

  config.sample = dict(
      # Ancestral DDPM: on this small, briefly trained model it gives clean digits
      # where the deterministic solvers leave a few speckled samples.
      method='ddpm',           # ddpm | ddim | dpm_solver++ | euler | heun
      num_steps=250,
      eta=0.0,                 # DDIM noise (0 = deterministic, 1 = DDPM-like).
      timestep_spacing='leading',  # leading | trailing | linspace
      ddpm_variance='posterior',   # posterior (beta tilde) | beta
      guidance_scale=2.0,      # Classifier-free guidance; 1 = the conditional model.
      class_label=-1,          # -1 = every class, one row each; else this class only.
      num_samples=100,
      batch_size=100,          # Samples per jitted call (rounded to the device count).
      seed=0,
      # A bar over each batch's steps. It reports from inside the compiled sampling loop,
      # and JAX keeps no program that calls back to the host in its persistent
      # compilation cache, so with it every run compiles the sampler anew.
      step_progress=False,
  )

  # --mode=eval (and train.eval_every): sample metrics against the train split.
  config.eval = dict(
      num_samples=1_000,       # Samples generated (with config.sample's sampler) per evaluation.
      batch_size=100,          # Images per feature-extraction call (rounded to the device count).
      # FID/KID: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or the same tensors
      # as .npz / .safetensors); '' = FID and KID are skipped.
      inception_weights='',
      kid_subsets=100,
      kid_subset_size=1_000,   # Clipped to the smaller set.
      pr_k=3,                  # Precision/recall: k-th neighbour radius.
      # Digits classifier (features for FD and precision/recall; class accuracy).
      classifier_dir='',       # '' = WORKDIR/eval/classifier; set one path to share it between runs.
      classifier_seed=0,       # Its own seed: runs of any config.seed share the feature space.
      classifier_steps=600,
      classifier_batch_size=64,
      classifier_channels=(16, 32, 64),
      classifier_features=128,
      classifier_optim=dict(
          learning_rate=2e-3, warmup_steps=50, lr_schedule='cosine', end_lr_factor=0.05,
          b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip_norm=1.0,
      ),
  )

  # --mode=edit: inpainting (RePaint) or img2img (SDEdit) of one image.
  config.edit = dict(
      task='inpaint',          # inpaint | img2img
      input='',                # PNG/JPEG of data.image_size, or .npz key images|image (first).
      mask='',                 # inpaint: PNG, white = fill, black = keep; or .npz key mask, 1 = fill.
      strength=0.6,            # img2img: fraction of the diffusion redone, in (0, 1].
      jump_length=10,          # RePaint: steps per jump back.
      jump_n_sample=10,        # RePaint: times each stretch is resampled; 1 = no jumps.
      num_samples=8,           # Variations written.
      class_label=-1,          # Condition on this class; -1 = the null class (unconditional).
  )
  return config
