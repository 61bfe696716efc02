"""Workdir safety: one run per workdir, and never a different run's checkpoints.

`guard(cfg, workdir)` runs before a stage writes anything:
  * a lock: `workdir/.jaxft.lock`, an exclusive `flock` held for the whole run (the kernel
    drops it when the process dies, even by SIGKILL, so a crash never leaves a stale lock);
    a second process fails at once with the holder's pid, host and start time;
  * a config check: when the workdir already holds a run (`config.json`), its stage,
    architecture (`model.*` except runtime-only keys), `init_from` and `data.task` must
    equal the new config's. A mismatch is refused, naming each differing key, unless
    `overwrite=True`: the old run's files are then moved to `workdir/overwritten-<time>/`
    (kept, not deleted). A matching config resumes as usual (overwrite changes nothing).
  * a stage that only reads the workdir (init_from=workdir, or `predict` without init_from)
    is allowed and must not replace its config.json: `guard` returns write_config=False.
Only process 0 checks and locks; with several processes its verdict is shared (through the
coordination service) so that every process stops together instead of hanging in the first
collective.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from absl import logging

LOCK_NAME = '.jaxft.lock'
# model.* keys that change how a run trains or runs, not what its checkpoints hold.
RUNTIME_MODEL_KEYS = ('hidden_dropout', 'attention_dropout', 'classifier_dropout', 'dtype',
                      'remat', 'initializer_range')
# What a previous run leaves in its workdir (moved aside on overwrite; cache/ is kept: it is
# keyed by content).
RUN_FILES = ('config.json', 'checkpoints', 'checkpoints.damaged', 'best', 'best.damaged',
             'metrics.jsonl', 'results.json', 'tb', 'export', 'tokenizer', 'labels.json',
             'predictions.jsonl', 'generations.jsonl')


class WorkdirError(RuntimeError):
  pass


class WorkdirLock:
  """An exclusive flock on workdir/.jaxft.lock; release() (or process exit) frees it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> 'WorkdirLock':
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f'{os.path.dirname(self.path)} is in use by another jaxft run ({holder}); wait for '
            f'it to finish, stop it, or use another --workdir') from None
      logging.warning('cannot lock %s (%s): the filesystem has no flock; not guarding against '
                      'a second run in this workdir', self.path, e)
      return self
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self):
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def _read_holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or '{}')
    return f'pid {info["pid"]} on {info["host"]}, since {info["since"]}'
  except (OSError, ValueError, KeyError):
    return 'pid unknown'


def _norm(path: str) -> str:
  return os.path.normpath(os.path.abspath(path)) if path else ''


def reads_workdir(cfg, workdir: str) -> bool:
  """The stage reads this workdir as its source (it does not train a run there)."""
  init_from = cfg.get('init_from', '') or ''
  if init_from and _norm(init_from) == _norm(workdir):
    return True
  return cfg.get('stage') == 'predict' and not init_from


def differences(saved: dict, cfg) -> list[str]:
  """'key: saved -> new' for what makes `cfg` a different run than the saved config."""
  new = json.loads(cfg.to_json_best_effort())
  out = []
  if saved.get('stage') != new.get('stage'):
    out.append(f'stage: {saved.get("stage")!r} -> {new.get("stage")!r}')
  old_m, new_m = saved.get('model') or {}, new.get('model') or {}
  for k in sorted(set(old_m) | set(new_m)):
    if k not in RUNTIME_MODEL_KEYS and old_m.get(k) != new_m.get(k):
      out.append(f'model.{k}: {old_m.get(k)!r} -> {new_m.get(k)!r}')
  if _norm(saved.get('init_from') or '') != _norm(new.get('init_from') or ''):
    out.append(f'init_from: {saved.get("init_from")!r} -> {new.get("init_from")!r}')
  old_t = (saved.get('data') or {}).get('task')
  new_t = (new.get('data') or {}).get('task')
  if old_t != new_t and old_t is not None and new_t is not None:
    out.append(f'data.task: {old_t!r} -> {new_t!r}')
  return out


def _move_aside(workdir: str) -> str:
  dest = os.path.join(workdir, 'overwritten-' + time.strftime('%Y%m%d-%H%M%S'))
  os.makedirs(dest, exist_ok=False)
  for name in RUN_FILES:
    src = os.path.join(workdir, name)
    if os.path.lexists(src):
      os.replace(src, os.path.join(dest, name))
  return dest


def check(cfg, workdir: str) -> bool:
  """Refuse a workdir holding a different run; True when the stage may write config.json."""
  if reads_workdir(cfg, workdir):
    return False
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return True
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise WorkdirError(f'{path} is not valid JSON ({e}); this workdir holds something else. '
                       'Use another --workdir, or set overwrite=True to move its files aside') \
        from None
  diffs = differences(saved, cfg)
  if not diffs:
    return True
  if cfg.get('overwrite', False):
    dest = _move_aside(workdir)
    logging.warning('%s held a different run (%s); overwrite=True: moved its files to %s',
                    workdir, '; '.join(diffs), dest)
    return True
  raise WorkdirError(
      f'{workdir} holds a different run ({saved.get("stage")}): ' + '; '.join(diffs) +
      '. Use another --workdir, set overwrite=True to move that run aside and start this one '
      f'here, or init_from={workdir} to start from its weights')


def guard(cfg, workdir: str) -> tuple[WorkdirLock | None, bool]:
  """(lock held for the run or None, write_config); raises WorkdirError on every process."""
  import jax
  lock, write, error = None, True, ''
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
      write = check(cfg, workdir)
    except WorkdirError as e:
      if lock is not None:
        lock.release()
        lock = None
      error = str(e)
  if jax.process_count() > 1:  # through the coordination service: no device collective
    from jaxft import distributed
    verdict = distributed.allgather_json({'error': error, 'write': write})[0]
    if verdict['error'] and not error:
      error = f'process 0 refused the workdir {workdir}: {verdict["error"]}'
    write = bool(verdict['write'])
  if error:
    raise WorkdirError(error)
  return lock, write
