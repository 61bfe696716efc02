"""The token store: every document's token ids on disk, built once in parallel, memory-mapped.

Tokenizing is the slow part of LM data and depends only on the text and the tokenizer, so
it is done once into a store keyed by both (`store_key`) and shared by every run (and every
host) that reads the same corpus with the same tokenizer; packing into rows is a cheap view
over it (jaxft.data.packing). Layout of `<root>/<key>/`:

  plan.json           the shards: which input pieces (jaxft.data.text.Piece) each one reads
  shards/00000.arrow  Arrow IPC stream, one record batch with columns `input_ids`
                      (list<int32>: a document's token ids, no special tokens) and
                      `stream_start` (int64: where the document starts in the shard's
                      stream, the documents each followed by one separator when non-empty);
                      datasets.Dataset.from_file() reads it too
  shards/00000.json   written after its .arrow: documents, tokens, bytes, sha256; a shard is
                      complete when both exist and agree
  locks/00000.lock    flock()ed by the process building that shard
  manifest.json       written once every shard is complete: the store is ready
  packed/             row indexes of packed views
and `<root>/sha256.json`: hashes of input files and shards, remembered by size, mtime and
inode (text.HashCache), so that opening a store re-reads only files that changed.

Reading: document offsets are zero-copy views of the memory-mapped file; token ids are read
with pread (TokenValues), so rows read at random never map the store into the process.

Building is safe to interrupt and to share: every file appears by an atomic rename, a killed
build resumes with the shards it completed, a shard whose bytes no longer match its sha256
is rebuilt, and processes (of one run, or of two runs sharing the store) claim shards with
a lock, each starting with its own share (shard i % process_count == process_index).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import queue as queue_lib
import socket
import threading
import time
from typing import Iterator

import numpy as np

from jaxft.data import text as text_lib

STORE_VERSION = 1
_OPEN_SHARDS = 128  # memory-mapped shards kept open (each holds a file descriptor)


# ----------------------------------------------------------------------------- keys

def tokenizer_fingerprint(tokenizer) -> str:
  """Hash of everything that decides token ids: the backend JSON and special tokens."""
  h = hashlib.sha256()
  h.update(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  if backend is not None:
    h.update(backend.to_str().encode())
  else:  # a slow tokenizer: its vocabulary is the best we have
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(json.dumps(getattr(tokenizer, 'special_tokens_map', {}), sort_keys=True,
                      default=str).encode())
  return h.hexdigest()


def store_key(source_fingerprint: str, tokenizer_fp: str, shard_bytes: int) -> str:
  settings = dict(version=STORE_VERSION, add_special_tokens=False, split_special_tokens=True,
                  shard_bytes=int(shard_bytes))
  payload = json.dumps(dict(source=source_fingerprint, tokenizer=tokenizer_fp, **settings),
                       sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- reading

class TokenValues:
  """A shard's token ids, read with pread: the page cache serves them, and nothing is
  mapped into the process. (Read through a memory map, each random row would map a whole
  page-cache folio, ~350 KB measured here, into the process's resident memory, which would
  then grow to the size of the store as training reads it.)"""

  def __init__(self, path: str, offset: int, size: int):
    self.path, self.offset, self.size = path, offset, size
    self._fd = os.open(path, os.O_RDONLY)

  def __len__(self):
    return self.size

  def __del__(self):
    fd = getattr(self, '_fd', None)
    if fd is not None:
      os.close(fd)

  def read(self, lo: int, hi: int) -> np.ndarray:
    """Token ids [lo, hi) as an int32 array."""
    if not 0 <= lo <= hi <= self.size:
      raise IndexError(f'tokens [{lo}, {hi}) of {self.size} in {self.path}')
    data = os.pread(self._fd, (hi - lo) * 4, self.offset + lo * 4)
    return np.frombuffer(data, np.int32)


@dataclasses.dataclass(frozen=True)
class ShardArrays:
  """One shard: document d is values.read(offsets[d], offsets[d+1]); offsets and
  stream_start are zero-copy views of the memory-mapped Arrow file (12 bytes a document)."""
  offsets: np.ndarray       # int32 [docs + 1]
  values: TokenValues       # int32 [tokens], read on demand
  stream_start: np.ndarray  # int64 [docs]


class TokenStore:
  """A complete store, read-only (at most _OPEN_SHARDS shards open at a time). Documents
  are numbered 0..n_docs-1 across shards; the *stream* is the documents in order, each
  non-empty one followed by one separator (whose id the packer chooses), numbered
  0..stream_len-1."""

  def __init__(self, path: str, manifest: dict, info: dict | None = None):
    self.path = path
    self.manifest = manifest
    self.info = info or {}
    shards = manifest['shards']
    self.doc_starts = np.cumsum([0] + [s['docs'] for s in shards], dtype=np.int64)
    self.stream_starts = np.cumsum([0] + [s['stream'] for s in shards], dtype=np.int64)
    self.n_docs = int(self.doc_starts[-1])
    self.n_tokens = int(sum(s['tokens'] for s in shards))
    self.stream_len = int(self.stream_starts[-1])
    self.nbytes = int(sum(s['bytes'] for s in shards))
    self._open: collections.OrderedDict[int, ShardArrays] = collections.OrderedDict()
    self._lock = threading.Lock()  # the LRU of open shards, if a loader reads from threads

  def __getstate__(self):  # picklable for loader worker processes: they map shards again
    state = dict(self.__dict__)
    del state['_open'], state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state, _open=collections.OrderedDict(), _lock=threading.Lock())

  @property
  def n_shards(self) -> int:
    return len(self.manifest['shards'])

  def shard(self, i: int) -> ShardArrays:
    with self._lock:
      arrays = self._open.get(i)
      if arrays is None:
        arrays = read_shard(shard_path(self.path, i))
        self._open[i] = arrays
        if len(self._open) > _OPEN_SHARDS:
          self._open.popitem(last=False)
      else:
        self._open.move_to_end(i)
      return arrays

  def _locate(self, d: int) -> tuple[int, int]:
    s = int(np.searchsorted(self.doc_starts, d, 'right')) - 1
    return s, d - int(self.doc_starts[s])

  def doc_tokens(self, d: int) -> np.ndarray:
    if not 0 <= d < self.n_docs:
      raise IndexError(f'document {d} of {self.n_docs} in {self.path}')
    s, local = self._locate(d)
    sh = self.shard(s)
    return sh.values.read(int(sh.offsets[local]), int(sh.offsets[local + 1]))

  def stream_positions(self, docs) -> np.ndarray:
    """Where each document starts in the stream (n_docs -> stream_len)."""
    docs = np.asarray(docs, np.int64)
    out = np.full(len(docs), self.stream_len, np.int64)
    shard_of = np.searchsorted(self.doc_starts, docs, 'right') - 1
    for s in np.unique(shard_of[docs < self.n_docs]):
      sel = (shard_of == s) & (docs < self.n_docs)
      out[sel] = self.stream_starts[s] + self.shard(int(s)).stream_start[
          docs[sel] - self.doc_starts[s]]
    return out

  def stream_lengths(self, docs: np.ndarray) -> np.ndarray:
    """Stream items of each document: its tokens plus its separator (0 when empty)."""
    docs = np.asarray(docs, np.int64)
    out = np.zeros(len(docs), np.int64)
    shard_of = np.searchsorted(self.doc_starts, docs, 'right') - 1
    for s in np.unique(shard_of):
      sel = shard_of == s
      local = docs[sel] - self.doc_starts[s]
      offsets = self.shard(int(s)).offsets
      n = offsets[local + 1].astype(np.int64) - offsets[local]
      out[sel] = n + (n > 0)
    return out

  def read_stream(self, pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream items [pos, pos + n) (fewer at the end): (token ids int32, is_separator bool);
    a separator's token id is 0."""
    toks, seps = [], []
    while n > 0 and pos < self.stream_len:
      s = int(np.searchsorted(self.stream_starts, pos, 'right')) - 1
      sh = self.shard(s)
      q = pos - int(self.stream_starts[s])
      k = min(n, int(self.stream_starts[s + 1]) - pos)
      p = np.arange(q, q + k, dtype=np.int64)
      # The last document starting at or before p; an empty one shares its start with the
      # next, so it is never picked.
      d = np.searchsorted(sh.stream_start, p, 'right') - 1
      rel = p - sh.stream_start[d]
      start = sh.offsets[d].astype(np.int64)
      length = sh.offsets[d + 1] - start
      is_sep = rel >= length
      idx = start + np.minimum(rel, length - 1)  # non-decreasing: one contiguous read
      lo = int(idx[0])
      toks.append(np.where(is_sep, 0, sh.values.read(lo, int(idx[-1]) + 1)[idx - lo]))
      seps.append(is_sep)
      pos, n = pos + k, n - k
    if len(toks) == 1:
      return toks[0].astype(np.int32, copy=False), seps[0]
    if not toks:
      return np.zeros(0, np.int32), np.zeros(0, bool)
    return np.concatenate(toks).astype(np.int32, copy=False), np.concatenate(seps)

  def separator_positions(self, lo: int, hi: int) -> Iterator[np.ndarray]:
    """Stream positions of the separators of documents [lo, hi), a shard at a time."""
    s_lo = int(np.searchsorted(self.doc_starts, lo, 'right')) - 1
    for s in range(max(s_lo, 0), self.n_shards):
      first, last = int(self.doc_starts[s]), int(self.doc_starts[s + 1])
      if first >= hi:
        break
      a, b = max(lo, first) - first, min(hi, last) - first
      if a >= b:
        continue
      sh = self.shard(s)
      n = np.diff(sh.offsets[a:b + 1]).astype(np.int64)
      keep = n > 0
      yield self.stream_starts[s] + sh.stream_start[a:b][keep] + n[keep]


def shard_path(store_path: str, i: int, suffix: str = '.arrow') -> str:
  return os.path.join(store_path, 'shards', f'{i:05d}{suffix}')


def read_shard(path: str) -> ShardArrays:
  """The shard's offsets and stream starts as zero-copy views of the memory-mapped Arrow
  file, and its token ids as a pread reader at their place in the file."""
  import mmap

  import pyarrow as pa
  with open(path, 'rb') as f:
    mapped = pa.py_buffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
  batch = pa.ipc.open_stream(pa.BufferReader(mapped)).read_next_batch()
  ids = batch.column('input_ids')
  values = ids.values
  data = values.buffers()[1]
  offset = data.address - mapped.address + values.offset * 4
  return ShardArrays(offsets=ids.offsets.to_numpy(), values=TokenValues(path, offset, len(values)),
                     stream_start=batch.column('stream_start').to_numpy())


# ----------------------------------------------------------------------------- building

@dataclasses.dataclass(frozen=True)
class BuildOptions:
  num_proc: int = 0              # worker processes (0 = every core this process may use)
  batch_size: int = 1000         # documents per tokenizer call
  verify: str = 'checksum'       # 'checksum' (sha256 of every shard) | 'size'
  key_mode: str = 'content'      # text.fingerprint mode: 'content' | 'stat'
  shard_bytes: int = 32 << 20
  process_index: int = 0         # this process's share of the shards ...
  process_count: int = 1         # ... among this many (hosts of one run)
  show_progress: bool = True
  desc: str = 'tokenize'
  poll_seconds: float = 1.0      # waiting for shards other processes build


def open_or_build(source: text_lib.Source, tokenizer, root: str,
                  options: BuildOptions = BuildOptions()) -> TokenStore:
  """The store of `source` tokenized by `tokenizer` under `root`: opened when complete and
  intact, else built (only the missing or damaged shards)."""
  if options.verify not in ('checksum', 'size'):
    raise ValueError(f"data.store_verify must be 'checksum' or 'size', got {options.verify!r}")
  t0 = time.time()
  hashes = text_lib.HashCache(os.path.join(os.fspath(root), 'sha256.json'))
  key = store_key(text_lib.fingerprint(source, options.key_mode, hashes),
                  tokenizer_fingerprint(tokenizer), options.shard_bytes)
  path = os.path.join(os.fspath(root), key)
  manifest = _read_json(os.path.join(path, 'manifest.json'))
  if manifest is not None and manifest.get('version') == STORE_VERSION:
    intact = all(_intact(path, i, s, options.verify, hashes)
                 for i, s in enumerate(manifest['shards']))
    hashes.save()
    if intact:
      return TokenStore(path, manifest, {'built': False, 'seconds': time.time() - t0})
  os.makedirs(os.path.join(path, 'shards'), exist_ok=True)
  os.makedirs(os.path.join(path, 'locks'), exist_ok=True)
  plan = _plan(path, source, tokenizer, options.shard_bytes)
  stats = _build_shards(path, plan, source, tokenizer, options, hashes)
  infos = [_read_json(shard_path(path, i, '.json')) for i in range(len(plan))]
  for i, info in enumerate(infos):  # hashed by their writers as they wrote them
    hashes.remember(shard_path(path, i), info['sha256'])
  hashes.save()
  manifest = {'version': STORE_VERSION, 'key': key, 'source': source.describe(),
              'tokenizer': getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__,
              'shards': infos}
  _write_json(os.path.join(path, 'manifest.json'), manifest)
  return TokenStore(path, manifest, {'built': True, 'seconds': time.time() - t0, **stats})


def _plan(path: str, source, tokenizer, shard_bytes: int) -> list[list[text_lib.Piece]]:
  """The shard plan, the same for every process: the first one to write plan.json wins."""
  plan_file = os.path.join(path, 'plan.json')
  stored = _read_json(plan_file)
  if stored is None:
    shards = text_lib.plan_shards(source, shard_bytes)
    _write_json(plan_file, {'version': STORE_VERSION, 'source': source.describe(),
                            'shards': [[dataclasses.asdict(p) for p in s] for s in shards]})
    stored = _read_json(plan_file)
  return [[text_lib.Piece(**p) for p in s] for s in stored['shards']]


def _intact(path: str, i: int, info: dict | None, verify: str, sha256=None) -> bool:
  """Shard i matches its .json: its size, and with verify='checksum' its sha256
  (`sha256`: a text.HashCache, which re-reads only files changed since they were hashed)."""
  if not info:
    return False
  data = shard_path(path, i)
  try:
    if os.path.getsize(data) != info['bytes']:
      return False
  except OSError:
    return False
  return verify == 'size' or (sha256 or text_lib.file_sha256)(data) == info['sha256']


_BYTES_PER_WORKER = 16 << 20  # automatic worker count: less input is faster in-process


def _num_workers(options: BuildOptions, pending: int, pending_bytes: int) -> int:
  """options.num_proc when set, else every usable core but no more than the input is worth:
  a worker process costs seconds to start (imports, tokenizer)."""
  if options.num_proc > 0:
    return max(1, min(options.num_proc, pending))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, min(cores or 1, pending, pending_bytes // _BYTES_PER_WORKER))


def _build_shards(path, plan, source, tokenizer, options: BuildOptions, hashes) -> dict:
  """Builds every shard that is not complete, in parallel, claiming each with a lock."""
  pending = []
  for i in range(len(plan)):
    info = _read_json(shard_path(path, i, '.json'))
    if not _intact(path, i, info, options.verify, hashes):
      if info is not None:
        _discard_damaged(path, i, options.verify)
      pending.append(i)
  p, count = options.process_index, options.process_count
  pending.sort(key=lambda i: (i % count != p, i))  # this process's share first
  stats = {'shards_built': 0, 'docs': 0, 'tokens': 0, 'text_bytes': 0, 'workers': 0}
  if not pending:
    return stats
  pending_bytes = sum(sum(pc.size for pc in plan[i]) for i in pending)
  workers = _num_workers(options, len(pending), pending_bytes)
  stats['workers'] = workers
  progress = _Progress(pending_bytes, options)
  if workers == 1:
    pool, updates = _InlinePool(), queue_lib.Queue()
    _WORKER.update(tokenizer=tokenizer, queue=updates)
  else:
    ctx = multiprocessing.get_context('spawn')  # no fork of a process that runs threads
    updates = ctx.Queue()
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer, updates))
  try:
    _schedule(path, plan, source, pending, pool, workers, updates, progress, stats, options)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    _WORKER.clear()
    progress.close()
  return stats


def _schedule(path, plan, source, pending, pool, workers, updates, progress, stats, options):
  """Submit shards this process can lock; wait for those other processes hold."""
  waiting, running = list(pending), {}
  last_note = time.time()
  while waiting or running:
    for i in list(waiting):
      if len(running) >= workers:
        break
      if _intact(path, i, _read_json(shard_path(path, i, '.json')), 'size'):
        waiting.remove(i)  # another process finished it
        continue
      lock = _try_lock(path, i)
      if lock is None:
        continue  # another process is building it
      waiting.remove(i)
      if _intact(path, i, _read_json(shard_path(path, i, '.json')), 'size'):
        _unlock(lock)  # finished between the check and the lock
        continue
      _remove_stale(path, i)
      fut = pool.submit(_build_shard, path, i, source, plan[i], options.batch_size)
      running[fut] = (i, lock)
    if running:
      done, _ = concurrent.futures.wait(list(running), timeout=0.5,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
    else:
      done = ()
      progress.drain(updates)
      if time.time() - last_note > 30:
        logging.info('token store: waiting for %d shard(s) other processes are building: %s',
                     len(waiting), waiting[:10])
        last_note = time.time()
      time.sleep(options.poll_seconds)
    progress.drain(updates)
    for fut in done:
      i, lock = running.pop(fut)
      try:
        info = fut.result()
      finally:
        _unlock(lock)
      stats['shards_built'] += 1
      for k in ('docs', 'tokens', 'text_bytes'):
        stats[k] += info[k]


class _Progress:
  """tqdm over input bytes with documents/s and tokens/s beside it."""

  def __init__(self, total_bytes: int, options: BuildOptions):
    from tqdm.auto import tqdm
    self.bar = tqdm(total=total_bytes or None, desc=options.desc, unit='B', unit_scale=True,
                    disable=not options.show_progress, mininterval=1.0, smoothing=0.05)
    self.t0 = time.time()
    self.docs = self.tokens = 0

  def drain(self, updates):
    moved = 0
    while True:
      try:
        docs, tokens, nbytes = updates.get_nowait()
      except queue_lib.Empty:
        break
      self.docs += docs
      self.tokens += tokens
      moved += nbytes
    if moved:
      dt = max(time.time() - self.t0, 1e-9)
      self.bar.set_postfix_str(f'{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s',
                               refresh=False)
      self.bar.update(moved)

  def close(self):
    self.bar.close()


# Worker side: the tokenizer and the progress queue, set once per worker process.
_WORKER: dict = {}


def _init_worker(tokenizer, updates):
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # parallel across processes instead
  _WORKER.update(tokenizer=tokenizer, queue=updates)


class _InlinePool:
  """The pool interface, run in this process (one worker: no process start-up)."""

  def submit(self, fn, *args):
    fut = concurrent.futures.Future()
    try:
      fut.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - re-raised by fut.result()
      fut.set_exception(e)
    return fut

  def shutdown(self, wait=True, cancel_futures=False):
    del wait, cancel_futures


def _build_shard(path: str, i: int, source, pieces, batch_size: int) -> dict:
  """Tokenize one shard into shards/<i>.arrow (temp file, then rename) and its .json."""
  tokenizer, updates = _WORKER['tokenizer'], _WORKER['queue']
  lengths, chunks = [], []
  text_bytes = reported = 0
  docs = text_lib.iter_shard(source, tuple(pieces))
  while batch := list(itertools.islice(docs, batch_size)):
    ids = tokenizer(batch, add_special_tokens=False, split_special_tokens=True,
                    return_attention_mask=False, return_token_type_ids=False,
                    verbose=False)['input_ids']
    n = [len(seq) for seq in ids]
    lengths.extend(n)
    chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, sum(n)))
    nbytes = sum(len(d.encode('utf-8')) for d in batch)
    text_bytes += nbytes
    reported += nbytes
    updates.put((len(batch), sum(n), nbytes))
  updates.put((0, 0, max(sum(pc.size for pc in pieces) - reported, 0)))
  values = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  lengths = np.asarray(lengths, np.int64)
  if len(values) >= 2**31:
    raise ValueError(f'token store shard {i} has {len(values)} tokens (> 2^31): lower '
                     'data.store_shard_mb')
  info = _write_shard(path, i, lengths, values)
  info['text_bytes'] = text_bytes
  return info


def _write_shard(path: str, i: int, lengths: np.ndarray, values: np.ndarray) -> dict:
  import pyarrow as pa
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  nonempty_before = np.concatenate([[0], np.cumsum(lengths > 0)[:-1]]).astype(np.int64)
  stream_start = offsets[:-1].astype(np.int64) + nonempty_before
  batch = pa.record_batch(
      [pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32())),
       pa.array(stream_start, pa.int64())], names=['input_ids', 'stream_start'])
  final = shard_path(path, i)
  tmp = f'{shard_path(path, i, ".arrow")}.{socket.gethostname()}-{os.getpid()}.tmp'
  try:
    with open(tmp, 'wb') as f:
      with pa.ipc.new_stream(f, batch.schema) as writer:
        writer.write_batch(batch)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  info = {'docs': int(len(lengths)), 'tokens': int(len(values)),
          'stream': int(len(values) + (lengths > 0).sum()), 'bytes': os.path.getsize(final),
          'sha256': text_lib.file_sha256(final)}
  _write_json(shard_path(path, i, '.json'), info)
  return info


# ----------------------------------------------------------------------------- files, locks

def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj) -> None:
  """Temp file in the same directory, then os.replace: readers never see half a file."""
  tmp = f'{path}.{socket.gethostname()}-{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


_NO_LOCKS_WARNED = []


def _try_lock(path: str, i: int) -> int | None:
  """An exclusive flock on locks/<i>.lock (released when this process dies), or None when
  another process holds it. Without file locks (some network filesystems) every process may
  build every shard: duplicate work, never a corrupt store (atomic renames)."""
  fd = os.open(os.path.join(path, 'locks', f'{i:05d}.lock'), os.O_CREAT | os.O_RDWR, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd
  except BlockingIOError:
    os.close(fd)
    return None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      os.close(fd)
      raise
    if not _NO_LOCKS_WARNED:
      logging.warning('token store %s: no file locks here (%s); processes may duplicate work',
                      path, e)
      _NO_LOCKS_WARNED.append(True)
    return fd


def _unlock(fd: int) -> None:
  try:
    fcntl.flock(fd, fcntl.LOCK_UN)
  except OSError:
    pass
  os.close(fd)


def _discard_damaged(path: str, i: int, verify: str) -> None:
  """Shard i failed its check: log it and remove its files (under its lock, re-checked),
  so that it is built again like a missing one."""
  lock = _try_lock(path, i)
  if lock is None:
    return  # another process holds it: it is rebuilding the shard
  try:
    if _intact(path, i, _read_json(shard_path(path, i, '.json')), verify):
      return
    logging.warning('token store %s: shard %d damaged (%s does not match the size / sha256 in '
                    'its .json); rebuilding it', path, i, shard_path(path, i))
    for suffix in ('.json', '.arrow'):
      try:
        os.remove(shard_path(path, i, suffix))
      except FileNotFoundError:
        pass
  finally:
    _unlock(lock)


def _remove_stale(path: str, i: int) -> None:
  """Temp files of shard i left by a killed build (we hold its lock: nobody writes them)."""
  if _NO_LOCKS_WARNED:
    return  # no real locks: another process may be writing them right now
  for name in os.listdir(os.path.join(path, 'shards')):
    if name.startswith((f'{i:05d}.arrow.', f'{i:05d}.json.')) and name.endswith('.tmp'):
      try:
        os.remove(os.path.join(path, 'shards', name))
      except OSError:
        pass
