"""Test setup: 8 simulated CPU devices (set before jax initialises its backend)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# model.dtype='auto' (the configs' default) is bf16 on CPUs with avx512_bf16 / AMX and fp32
# elsewhere: the suite compares numbers across runs, so it runs fp32 on every CPU kind
# (tests/test_engine.py checks the resolution itself with mocked CPU flags).
os.environ.setdefault('JAXFT_AUTO_DTYPE', 'float32')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
