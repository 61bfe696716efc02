"""JAX's persistent compilation cache: on by default under compilation_cache_dir, off for CPU
runs of several processes, and the environment variable wins."""
import jax
import ml_collections

from jaxft import compilation_cache
from jaxft.config import base_config


def test_on_by_default_off_for_cpu_processes_env_wins(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert compilation_cache.configured_dir(base_config()) == compilation_cache.DEFAULT_DIR
  pipeline = ml_collections.ConfigDict({'stage': 'pipeline', 'pipeline': ('a',),
                                        'a': {'compilation_cache_dir': ''}})
  assert compilation_cache.configured_dir(pipeline) == ''  # a pipeline's first section's
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.setattr(jax, 'process_count', lambda: 2)  # this is a CPU backend
    assert compilation_cache.enable(str(tmp_path / 'c')) is None
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setattr(jax, 'process_count', lambda: 1)
    assert compilation_cache.enable('') is None
    assert compilation_cache.enable(str(tmp_path / 'c')) == str(tmp_path / 'c')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'c')
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/elsewhere')
    assert compilation_cache.enable(str(tmp_path / 'd')) == '/elsewhere'
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
    from jax.experimental.compilation_cache import compilation_cache as cc
    cc.reset_cache()
