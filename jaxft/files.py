"""Writing a run's outputs: the OS refusals a user must fix (disk full, quota, read-only,
no permission) become one line naming the path, and files and directories are replaced
atomically so that a crash or a full disk never leaves a half-written output in place.

JSON outputs go through `json_text`: strict JSON, a non-finite number written as null.

Checkpoint saves have their own error (`checkpointing.CheckpointWriteError`, which also
names the intact steps); everything else a stage writes (config.json, labels.json, the
Hugging Face export, predictions, generations, results) goes through here.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil

import numpy as np

NO_SPACE = {errno.ENOSPC: 'No space left on device', errno.EDQUOT: 'Disk quota exceeded',
            errno.EFBIG: 'File too large'}
NOT_WRITABLE = {errno.EROFS: 'Read-only file system', errno.EACCES: 'Permission denied',
                errno.EPERM: 'Operation not permitted'}
_REASONS = {**NO_SPACE, **NOT_WRITABLE}
# (text, reason) for errors that carry only a message (Orbax / tensorstore write
# "os_error_code='28'" into theirs).
_MESSAGES = [(r, r) for r in _REASONS.values()] + [
    (f"os_error_code='{n}'", r) for n, r in NO_SPACE.items()]


class OutputWriteError(RuntimeError):
  """An output could not be written for a reason the user must fix (one-line message)."""


class InputError(ValueError):
  """An input the user gave that cannot be used as it is: a missing, empty, undecodable or
  malformed file, a bad row, a directory that ships code. The message names the file, line
  and key; the command line reports it in one line (exit code 2), like a config error."""


class MissingInput(InputError, FileNotFoundError):
  """An input file or directory that does not exist (a FileNotFoundError too)."""


def check_writable(path: str, key: str) -> None:
  """InputError naming `key` unless a file can be created at `path`: checked before the
  work whose result goes there, not after it."""
  where = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(where, exist_ok=True)
    probe = os.path.join(where, f'.{os.path.basename(path)}.{secrets.token_hex(4)}.probe')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise InputError(f'{key}={path!r} cannot be written: {e.strerror or e} '
                     f'({e.filename or where})') from None
  if os.path.isdir(path):
    raise InputError(f'{key}={path!r} is a directory; name a file')


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def write_problem(e: BaseException) -> str | None:
  """'No space left on device', 'Read-only file system', ... when `e` (or an error in its
  cause chain) is such a refusal; None for any other error."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _REASONS:
      return _REASONS[x.errno]
    text = str(x)
    for marker, reason in _MESSAGES:
      if marker in text:
        return reason
  return None


def is_no_space(e: BaseException) -> bool:
  return write_problem(e) in NO_SPACE.values()


def write_error(e: BaseException, what: str, path: str, note: str = '') -> BaseException:
  """An OutputWriteError for `e` when it is a write refusal (else `e` itself), naming what
  could not be written where, and what to do."""
  reason = write_problem(e)
  if reason is None:
    return e
  fix = ('free space (or raise the quota) and rerun the same command' if reason in
         NO_SPACE.values() else 'make it writable, or use another --workdir')
  err = OutputWriteError(f'could not write {what} to {path}: {reason}{note}; {fix}')
  err.__cause__ = e
  return err


@contextlib.contextmanager
def atomic_open(path: str, what: str = '', binary: bool = False):
  """`with atomic_open(path) as f:` write f; on success it replaces `path` whole.

  The temporary file is a new sibling (O_EXCL, O_NOFOLLOW, a random name) renamed over
  `path`: readers see the old or the new content, never a part; a symlink at `path` is
  replaced, not followed; on any error (or a kill) `path` is left as it was. Refusals raise
  OutputWriteError naming `path`."""
  path = os.path.abspath(path)
  what = what or os.path.basename(path)
  tmp = f'{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
  except OSError as e:
    raise write_error(e, what, path) from e
  try:
    with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    _remove(tmp)
    err = write_error(e, what, path) if isinstance(e, OSError) else e
    if err is e:
      raise
    raise err from e


def atomic_write(path: str, data: str | bytes, what: str = '') -> None:
  """Write `path` whole through a temporary file (atomic_open)."""
  with atomic_open(path, what, binary=True) as f:
    f.write(data.encode() if isinstance(data, str) else data)


def _remove(path: str) -> None:
  try:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)
  except OSError:
    pass


class AtomicDir:
  """`with AtomicDir(out_dir) as tmp:` fill `tmp`; on success it replaces `out_dir`.

  `tmp` is a hidden sibling (same filesystem, so the rename is atomic); an existing
  `out_dir` is renamed aside first and removed after, so `out_dir` is never a mix of two
  writes. On any error (or a crash) the old `out_dir` stays and the partial copy goes
  (a crash leaves a hidden `.name.tmp-*`, removed by the next write)."""

  def __init__(self, out_dir: str, what: str = 'output directory'):
    self.out_dir = os.path.abspath(out_dir)
    self.what = what
    parent, name = os.path.split(self.out_dir)
    tag = f'{os.getpid()}-{secrets.token_hex(4)}'
    self.tmp = os.path.join(parent, f'.{name}.tmp-{tag}')
    self.old = os.path.join(parent, f'.{name}.old-{tag}')

  def _stale(self) -> list[str]:
    parent, name = os.path.split(self.out_dir)
    marks = (f'.{name}.tmp-', f'.{name}.old-')
    return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(marks)]

  def __enter__(self) -> str:
    try:
      os.makedirs(os.path.dirname(self.out_dir), exist_ok=True)
      for p in self._stale():
        _remove(p)
      os.mkdir(self.tmp)  # mode 0777 & ~umask, like any directory the user creates
    except OSError as e:
      raise write_error(e, self.what, self.out_dir) from e
    return self.tmp

  def __exit__(self, kind, e, tb):
    if kind is not None:
      _remove(self.tmp)
      if isinstance(e, Exception) and write_problem(e) is not None:
        raise write_error(e, self.what, self.out_dir, ' (the previous one, if any, is '
                          'unchanged)') from e
      return False
    moved = False
    try:
      if os.path.lexists(self.out_dir):
        os.replace(self.out_dir, self.old)
        moved = True
      os.replace(self.tmp, self.out_dir)
    except OSError as err:
      if moved and not os.path.lexists(self.out_dir):
        os.replace(self.old, self.out_dir)
      _remove(self.tmp)
      raise write_error(err, self.what, self.out_dir) from err
    if moved:
      _remove(self.old)
    return False


def json_safe(value):
  """`value` with numpy / jax numbers and arrays as Python ones and every non-finite float
  (NaN, +-inf) as None: json.dumps would write bare NaN / Infinity, which strict JSON
  parsers (JavaScript, jq, Go) reject."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (str, bool, int)) or value is None:
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, '__array__'):
    array = np.asarray(value)
    if array.dtype.kind in 'biuf':
      return json_safe(array.tolist())
  return value


def json_text(value, **dumps_kw) -> str:
  """json.dumps of `json_safe(value)` (strict JSON); other objects as str()."""
  return json.dumps(json_safe(value), allow_nan=False, default=str, **dumps_kw)
