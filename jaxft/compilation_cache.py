"""JAX's persistent compilation cache: compiled programs on disk, so a restarted run (after a
preemption) reaches its first step without compiling again.

On by default under `compilation_cache_dir` (a top-level config key; '' turns it off);
JAX_COMPILATION_CACHE_DIR in the environment wins over it. JAX's own thresholds apply
(programs that compile in under `jax_persistent_cache_min_compile_time_secs`, 1 s by
default, are not stored; set JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS to change it).
Off on CPU runs of several processes: restarted processes that loaded cached executables
timed out setting up their gloo collectives (docs/multihost.md).
"""
from __future__ import annotations

import logging
import os

DEFAULT_DIR = '~/.cache/jaxft/jax_cache'


def setup(cfg) -> str | None:
  """enable() with the config's directory: main.py calls this once, before any compile."""
  return enable(configured_dir(cfg))


def configured_dir(cfg) -> str:
  """The config's compilation_cache_dir (a pipeline's: its first section's), else default."""
  if 'compilation_cache_dir' not in cfg and cfg.get('stage') == 'pipeline' and cfg.pipeline:
    cfg = cfg[cfg.pipeline[0]]
  value = cfg.get('compilation_cache_dir', None)
  if value is not None and not isinstance(value, str):
    return ''  # off; the stage's config check names the key (jaxft.config.parse_settings)
  return DEFAULT_DIR if value is None else value


def enable(cache_dir: str) -> str | None:
  """Turns the cache on under `cache_dir` before anything compiles; returns the directory
  in use, or None when it is off (with the reason logged)."""
  import jax
  from_env = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if from_env:
    logging.info('compilation cache: %s (JAX_COMPILATION_CACHE_DIR)', from_env)
    return from_env
  if not cache_dir:
    return None
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    logging.info('compilation cache off: CPU processes restarted with cached executables time '
                 'out setting up gloo collectives')
    return None
  path = os.path.abspath(os.path.expanduser(cache_dir))
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  logging.info('compilation cache: %s', path)
  return path
