"""ldm_jax: latent diffusion models in JAX/Flax."""
from ldm_jax import xla_flags as _xla_flags

# Before any JAX backend starts: the CPU kernels ldm_jax was measured with, unless the
# user's XLA_FLAGS says otherwise (see ldm_jax/xla_flags.py).
_xla_flags.apply_defaults()
