"""Entry point: python -m jaxft.main --config configs/<x>.py[:variant] --workdir DIR.

Loads the ConfigDict (overrides with --config.key=value), joins a multi-host run when
asked, turns on JAX's persistent compilation cache (`compilation_cache_dir`), and runs the
stage named by `config.stage` through `jaxft.stages` (which validates it before anything is
compiled).
"""
from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxft import checkpointing, compilation_cache, distributed, files, measured, stages
from jaxft.config import ConfigError
from jaxft.data.pretrain import DataSettingsError
from jaxft.export import OnnxMismatch
from jaxft.workdir import WorkdirError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<x>.py[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   'host:port of process 0 for multi-process runs (GPU/CPU '
                                   'clusters); TPU pod workers detect it themselves.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0..num_processes-1).')
_SHOW_CONFIG = flags.DEFINE_bool('show_config', False,
                                 'Print every key of --config (with overrides) with its value '
                                 'and meaning, then exit (no --workdir needed).')


def run_stage(cfg, workdir: str) -> dict:
  """Validate `cfg` and run its stage in `workdir` (see jaxft.stages.run)."""
  return stages.run(cfg, workdir)


class _QuietLibraries:
  """Keep INFO logs for jaxft; libraries (Orbax writes ~30 lines per save) log WARNING+ only,
  without Orbax's warnings about what jaxft does on purpose (reading one item's metadata, a
  read-only manager over best/)."""
  NOISE = ('_CHECKPOINT_METADATA', 'read_only', 'could not be restored. Please provide')

  def filter(self, record):
    if '/jaxft/' in record.pathname:
      return True
    message = record.getMessage()  # the formatted text: a path argument may hold the noise
    return record.levelno >= 30 and not any(n in message for n in self.NOISE)


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
  if _SHOW_CONFIG.value:  # the listing, then the checks a run makes before it starts
    print(stages.describe(cfg), flush=True)
    _exit_on_user_error(stages.validate, cfg)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  quiet_library_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  compilation_cache.setup(cfg)  # before anything compiles (off for multi-process CPU runs)
  _exit_on_user_error(_configure_choices, cfg)  # the `choices` key (JAXFT_CHOICES wins)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  if jax.process_count() > 1:
    distributed.check_processes(cfg)  # the same config and devices on every process
  run_reporting_errors(cfg, os.path.abspath(_WORKDIR.value))


def run_reporting_errors(cfg, workdir: str) -> dict:
  """run_stage, with the errors that are the user's to fix printed as one line and the
  process ended with their exit code (what the command line does)."""
  return _exit_on_user_error(run_stage, cfg, workdir)


def _configure_choices(cfg):
  try:
    measured.configure(measured.configured(cfg))
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _exit_on_user_error(fn, *args):
  """fn(*args); an error that is the user's to fix (_USER_ERRORS) exits with its one line."""
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001
    code = _user_error(e)
    if code is None:
      raise
    kind = 'config error' if isinstance(e, (ConfigError, DataSettingsError)) else 'error'
    print(f'{kind}: {e}', file=sys.stderr)
    sys.exit(code)


def _config_error(msg: str):
  print(f'config error: {msg}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with --config problems reported as one line (no traceback)."""
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


# Errors that are the user's to fix, reported in one line: (kinds, exit code).
_USER_ERRORS = (((ConfigError, DataSettingsError, files.InputError), 2),
                ((WorkdirError, checkpointing.NoIntactCheckpoint, checkpointing.StateMismatch,
                  checkpointing.CheckpointWriteError, files.OutputWriteError, OnnxMismatch), 1))


def _user_error(e: BaseException) -> int | None:
  """Exit code for errors that are the user's to fix (reported in one line), else None."""
  return next((code for kinds, code in _USER_ERRORS if isinstance(e, kinds)), None)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
