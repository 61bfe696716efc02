"""Workdir safety: one run per workdir, and never a different run's checkpoints.

`guard(cfg, workdir)` runs before a stage writes anything:
  * a lock: an exclusive `flock` on the workdir directory itself, held for the whole run
    (the kernel drops it when the process dies, even by SIGKILL, so a crash never leaves a
    stale lock; deleting a file cannot defeat it). `workdir/.jaxft.lock` holds the holder's
    pid, host and start time (and is flocked too, for filesystems without directory locks):
    a second process fails at once naming them;
  * a workdir that cannot be written (read-only, no permission, disk full) is refused in
    one line naming the path, before the stage starts;
  * a config check: when the workdir already holds a run (`config.json`), its stage,
    `init_from`, `teacher`, `data.task` and, when the architecture comes from the config
    (no init_from / teacher), `model.*` except runtime keys must equal the new config's. A mismatch is refused, naming each differing key, unless
    `overwrite=True`: the old run's files are then moved to `workdir/overwritten-<time>/`
    (kept, not deleted). A matching config resumes as usual (overwrite changes nothing).
  * a stage that only reads the workdir (init_from=workdir, or `predict` without init_from)
    is allowed and must not replace its config.json: `guard` returns write_config=False,
    and the stage runs in WORKDIR/<stage>/ (`reader_run`): a later stage's outputs never
    replace the run's records.
Only process 0 checks and locks; with several processes its verdict is shared (through the
coordination service) so that every process stops together instead of hanging in the first
collective.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import socket
import time

import jax
from absl import logging

from jaxft import distributed, files
from jaxft.models.config import RUNTIME_FIELDS

LOCK_NAME = '.jaxft.lock'
# What a previous run leaves in its workdir (moved aside on overwrite; cache/ is kept: it is
# keyed by content).
RUN_FILES = ('config.json', 'checkpoints', 'checkpoints.damaged', 'best', 'best.damaged',
             'metrics.jsonl', 'results.json', 'tb', 'export', 'tokenizer', 'labels.json',
             'predictions.jsonl', 'generations.jsonl')


class WorkdirError(RuntimeError):
  pass


class WorkdirLock:
  """An exclusive flock on the workdir directory and on workdir/.jaxft.lock; release() (or
  process exit) frees both."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._dir_fd: int | None = None
    self._file_fd: int | None = None

  def acquire(self) -> 'WorkdirLock':
    try:
      os.makedirs(self.workdir, exist_ok=True)
      self._dir_fd = self._open_locked(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
      self._file_fd = self._open_locked(self.path, os.O_RDWR | os.O_CREAT)
      self._write_holder()
    except BaseException as e:
      self.release()
      reason = files.write_problem(e) if isinstance(e, OSError) else None
      if reason is None:
        raise
      raise WorkdirError(f'cannot write to the workdir {self.workdir}: {reason} '
                         f'({e.filename or self.path}); use a writable --workdir'
                         + (' or free space' if files.is_no_space(e) else '')) from None
    return self

  def _open_locked(self, path: str, flags: int) -> int | None:
    """An fd of `path` holding an exclusive flock (kept until release); None where the
    filesystem has no flock; WorkdirError naming the holder when another process has it."""
    fd = os.open(path, flags, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return fd
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f'{self.workdir} is in use by another jaxft run ({_read_holder(self.path)}); wait '
            f'for it to finish, stop it, or use another --workdir') from None
      logging.warning('cannot lock %s (%s): the filesystem has no flock there', path, e)
      return None

  def _write_holder(self):
    info = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                       'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode()
    fd = self._file_fd if self._file_fd is not None else os.open(self.path, os.O_WRONLY)
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, info, 0)
      os.fsync(fd)
    finally:
      if fd != self._file_fd:
        os.close(fd)

  def release(self):
    if self._file_fd is not None:
      try:
        os.ftruncate(self._file_fd, 0)
      except OSError:
        pass
    for fd in (self._file_fd, self._dir_fd):
      if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    self._dir_fd = self._file_fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def _read_holder(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      info = json.loads(f.read(4096) or '{}')
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


def reader_run(cfg, workdir: str):
  """(config, workdir) for a stage that reads `workdir` as its source: WORKDIR/<stage>/ with
  init_from=WORKDIR, an ordinary run there, so that the source run's files (config.json,
  results.json, generations.jsonl, ...) are never replaced by a later stage's outputs."""
  sub = copy.deepcopy(cfg)
  with sub.unlocked():
    sub.init_from = _norm(workdir)
  return sub, os.path.join(_norm(workdir), cfg.stage)


def differences(saved: dict, cfg) -> list[str]:
  """'key: saved -> new' for what makes `cfg` a different run than the saved config."""
  new = json.loads(cfg.to_json_best_effort())
  out = []
  if saved.get('stage') != new.get('stage'):
    out.append(f'stage: {saved.get("stage")!r} -> {new.get("stage")!r}')
  for key in ('init_from', 'teacher'):
    if _norm(saved.get(key) or '') != _norm(new.get(key) or ''):
      out.append(f'{key}: {saved.get(key)!r} -> {new.get(key)!r}')
  # With init_from or a teacher the architecture comes from there (config.json records the
  # model built), so the model keys of the two configs need not agree.
  if not (new.get('init_from') or new.get('teacher')):
    old_m, new_m = saved.get('model') or {}, new.get('model') or {}
    for k in sorted(set(old_m) | set(new_m)):
      if k == 'vocab_size' and not new_m.get(k):
        continue  # 0 = the tokenizer's size; config.json records the size it resolved to
      if k not in RUNTIME_FIELDS and old_m.get(k) != new_m.get(k):
        out.append(f'model.{k}: {old_m.get(k)!r} -> {new_m.get(k)!r}')
  old_t = (saved.get('data') or {}).get('task')
  new_t = (new.get('data') or {}).get('task')
  if old_t != new_t and old_t is not None and new_t is not None:
    out.append(f'data.task: {old_t!r} -> {new_t!r}')
  return out


def _move_aside(workdir: str) -> str:
  """Move the run's files, and the outputs of stages that read it (reader_run), aside."""
  dest = os.path.join(workdir, 'overwritten-' + time.strftime('%Y%m%d-%H%M%S'))
  os.makedirs(dest, exist_ok=False)
  readers = [n for n in os.listdir(workdir) if _reads_from(os.path.join(workdir, n), workdir)]
  for name in (*RUN_FILES, *readers):
    src = os.path.join(workdir, name)
    if os.path.lexists(src):
      os.replace(src, os.path.join(dest, name))
  return dest


def _reads_from(sub_dir: str, workdir: str) -> bool:
  """`sub_dir` holds a run started from `workdir` (a reader_run's subfolder)."""
  try:
    with open(os.path.join(sub_dir, 'config.json')) as f:
      return _norm(json.load(f).get('init_from') or '') == _norm(workdir)
  except (OSError, ValueError, AttributeError):
    return False


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
    verdict = distributed.allgather_json({'error': error, 'write': write})[0]
    if verdict['error'] and not error:
      error = f'process 0 refused the workdir {workdir}: {verdict["error"]}'
    write = bool(verdict['write'])
  if error:
    raise WorkdirError(error)
  return lock, write
