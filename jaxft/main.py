"""Entry point: python -m jaxft.main --config configs/<x>.py[:variant] --workdir DIR.

Loads the ConfigDict (overrides with --config.key=value), validates it before anything is
compiled, joins a multi-host run when asked, and runs the stage named by `config.stage`.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<x>.py[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   'host:port of process 0 for multi-process runs (GPU/CPU '
                                   'clusters); TPU pod workers detect it themselves.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0..num_processes-1).')


def _maybe_init_distributed():
  """jax.distributed.initialize() when flags or the environment say this is multi-process."""
  from jaxft import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def run_stage(cfg, workdir: str):
  """Validate `cfg` and run its stage; returns the stage's results dict."""
  from jaxft import config as config_lib
  config_lib.validate(cfg)
  import jax
  config_lib.check_mesh(cfg, jax.device_count())
  if jax.process_index() == 0:
    config_lib.save_config(cfg, workdir)
  stage = cfg.stage
  if stage == 'model_info':
    from jaxft.train import info
    return info.run(cfg, workdir)
  if stage in ('pretrain_mlm', 'pretrain_clm'):
    from jaxft.train import pretrain
    return pretrain.run(cfg, workdir)
  if stage in ('finetune_cls', 'finetune_ner'):
    from jaxft.train import finetune
    return finetune.run(cfg, workdir)
  if stage == 'predict':
    from jaxft.train import predict
    return predict.run(cfg, workdir)
  if stage == 'distill':
    from jaxft.distill import stage as distill_stage
    return distill_stage.run(cfg, workdir)
  raise ValueError(f'stage {stage!r} has no runner')


class _QuietLibraries:
  """Keep INFO logs for jaxft; libraries (Orbax writes ~30 lines per save) log WARNING+ only."""

  def filter(self, record):
    return record.levelno >= 30 or '/jaxft/' in record.pathname


def quiet_library_logs():
  import logging as py_logging
  logging.get_absl_handler().addFilter(_QuietLibraries())
  py_logging.getLogger('absl').addFilter(_QuietLibraries())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError('--config is required, e.g. --config configs/quickstart.py')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  quiet_library_logs()
  _maybe_init_distributed()
  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  if jax.process_count() > 1:
    from jaxft import distributed
    distributed.check_run(cfg)  # same config, devices and batch layout on every process
  run_stage(cfg, os.path.abspath(_WORKDIR.value))


def run():
  app.run(main)


if __name__ == '__main__':
  run()
