"""ldm_jax: latent diffusion models in JAX/Flax."""
from ldm_jax import host_memory as _host_memory
from ldm_jax import xla_flags as _xla_flags

# `python -m ldm_jax.main|bench`: restart once with huge pages for XLA's buffers, before
# JAX is imported (see ldm_jax/host_memory.py); any other import continues here.
_host_memory.restart_with_huge_pages()
# Before any JAX backend starts: the CPU kernels ldm_jax was measured with, unless the
# user's XLA_FLAGS says otherwise (see ldm_jax/xla_flags.py).
_xla_flags.apply_defaults()
