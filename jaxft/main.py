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
  from jaxft import workdir as workdir_lib
  config_lib.check_mesh(cfg, jax.device_count())
  # Before anything is written: one run per workdir (lock), never a different run's files.
  lock, write_config = workdir_lib.guard(cfg, workdir)
  try:
    if cfg.stage == 'pipeline':
      return run_pipeline(cfg, workdir)
    if write_config and jax.process_index() == 0:
      config_lib.save_config(cfg, workdir)
    return _run(cfg, workdir)
  finally:
    if lock is not None:
      lock.release()


def _run(cfg, workdir: str):
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
  if stage == 'finetune_lm':
    from jaxft.stages import finetune_lm
    return finetune_lm.run(cfg, workdir)
  if stage == 'generate':
    from jaxft.stages import generate
    return generate.run(cfg, workdir)
  raise ValueError(f'stage {stage!r} has no runner')


class _QuietLibraries:
  """Keep INFO logs for jaxft; libraries (Orbax writes ~30 lines per save) log WARNING+ only."""

  def filter(self, record):
    return record.levelno >= 30 or '/jaxft/' in record.pathname


def quiet_library_logs():
  import logging as py_logging
  logging.get_absl_handler().addFilter(_QuietLibraries())
  py_logging.getLogger('absl').addFilter(_QuietLibraries())


def run_pipeline(cfg, workdir: str):
  """Run the sections named in cfg.pipeline in order, each in workdir/<name>; a step with an
  empty init_from starts from the previous step's workdir (pretrain -> fine-tune)."""
  results, previous = {}, None
  for name in cfg.pipeline:
    sub = cfg[name]
    if previous is not None and 'init_from' in sub and not sub.init_from:
      sub.init_from = previous
    sub_dir = os.path.join(workdir, name)
    logging.info('pipeline step %r (stage %s) in %s', name, sub.stage, sub_dir)
    results[name] = run_stage(sub, sub_dir)
    if isinstance(results[name], dict) and results[name].get('preempted'):
      # Stop here: a rerun resumes this step; the next must not start from an unfinished one.
      logging.warning('pipeline step %r was preempted; not starting %s', name,
                      list(cfg.pipeline)[list(cfg.pipeline).index(name) + 1:])
      break
    previous = sub_dir
  return results


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
  try:
    run_stage(cfg, os.path.abspath(_WORKDIR.value))
  except Exception as e:  # noqa: BLE001
    code = _user_error(e)
    if code is None:
      raise
    print(f'{"config error" if code == 2 else "error"}: {e}', file=sys.stderr)
    sys.exit(code)


def _config_error(msg: str):
  print(f'config error: {msg}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with --config problems reported as one line (no traceback)."""
  import re
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
    m = re.search(r'(--config\.\S+?): (invalid literal for (int|float)\(\)|could not convert '
                  r'string to (float))', msg)
    if m:
      kind = 'an int' if (m.group(3) or m.group(4)) == 'int' else 'a number'
      _config_error(f'{m.group(1)}: must be {kind} ({msg.split(": ", 1)[-1]})')
    m = re.search(r'(--config\.\S+?): .*Non-boolean argument', msg)
    if m:
      _config_error(f'{m.group(1)}: must be a bool (True or False)')
    if '--config' in msg:
      _config_error(msg.removeprefix('flag '))
    print(f'FATAL Flags parsing error: {msg}\nPass --helpshort or --helpfull to see help on '
          'flags.', file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no such key
    text = str(e).encode().decode('unicode_escape')
    key = re.search(r"'([^'\\]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    key = key.group(1) if key else text.splitlines()[0]
    arg = next((a for a in argv if a.startswith('--config.') and
                key in re.split(r'[.=]', a.split('=', 1)[0])), None)
    where = f' in {arg}' if arg else ''
    _config_error(f'unknown key {key!r}{where}' +
                  (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
  except (ValueError, TypeError) as e:  # the config file refused its variant / values
    _config_error(f'{type(e).__name__}: {e}')


_USER_ERRORS = {'jaxft.config': ('ConfigError',), 'jaxft.workdir': ('WorkdirError',),
                'jaxft.checkpointing': ('NoIntactCheckpoint', 'CheckpointWriteError')}


def _user_error(e: BaseException) -> int | None:
  """Exit code for errors that are the user's to fix (reported in one line), else None."""
  for module, names in _USER_ERRORS.items():
    mod = sys.modules.get(module)
    kinds = tuple(getattr(mod, n) for n in names if hasattr(mod, n))
    if kinds and isinstance(e, kinds):
      return 2 if module == 'jaxft.config' else 1
  return None


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
