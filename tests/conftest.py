"""Test-wide setup: eight fake CPU devices, so sharding is tested on every run.

The flag must be set before JAX initializes its backends, hence at import time here.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
