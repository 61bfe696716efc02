"""Packing documents into fixed-length LM rows, read lazily from a token store.

Packing follows RoBERTa FULL-SENTENCES: rows are filled with contiguous text that may
cross document boundaries, never NSP pairs.
  BERT  (mlm): [CLS] doc1 ... [SEP] doc2 ... [SEP]   every row starts with [CLS] and
               ends with [SEP]; a document cut at a row end continues after the next [CLS].
  GPT-2 (clm): doc1 <|endoftext|> doc2 <|endoftext|> ...   cut into rows of max_len, plus
               `segment_ids` (1, 2, ... per document within a row, 0 on padding) so the
               loss/attention can stop at document boundaries. A document's trailing
               <|endoftext|> belongs to that document's segment.
Only the very last row of a packing can be padded.

`pack_mlm` / `pack_clm` pack in-memory arrays at once: the definition, for small data and
tests. `PackedRows` gives the same rows one at a time from a `TokenStore`: a row is read
from where it starts in the document stream. GPT-2 rows start every max_len items; a BERT
row's start depends on the rows before it, so a streamed pass over the separators' positions
(`mlm_row_starts`, fast: it visits only the rows whose last item is a separator) writes the
starts once into a small memory-mapped index (8 bytes a row) beside the store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import socket
from typing import Iterator

import numpy as np

from jaxft.data.token_store import TokenStore


# ----------------------------------------------------------------------------- in memory

def _drop_empty(tokens, offsets):
  lengths = np.diff(offsets)
  if (lengths > 0).all():
    return tokens, offsets
  keep = np.flatnonzero(lengths > 0)
  new_offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
  return np.concatenate([tokens[offsets[d]:offsets[d + 1]] for d in keep] or
                        [np.zeros(0, np.int32)]), new_offsets


def _stream_with_separators(tokens, offsets, sep_id):
  """Documents with `sep_id` after each one; also each token's document index."""
  tokens, offsets = _drop_empty(tokens, offsets)
  n_docs = len(offsets) - 1
  lengths = np.diff(offsets)
  stream = np.insert(tokens, offsets[1:], sep_id).astype(np.int32)
  is_sep = np.zeros(len(stream), bool)
  is_sep[offsets[1:] + np.arange(n_docs)] = True
  doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths + 1)
  return stream, is_sep, doc_of


def pack_mlm(tokens: np.ndarray, offsets: np.ndarray, max_len: int, *, cls_id: int,
             sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """BERT rows `[CLS] ... [SEP] ... [SEP]`, full except possibly the last one."""
  if max_len < 3:
    raise ValueError(f'data.max_len={max_len} is too short for [CLS] x [SEP]')
  stream, is_sep, _ = _stream_with_separators(tokens, offsets, sep_id)
  body = max_len - 1  # tokens after [CLS], the last of which must be [SEP]
  n = len(stream)
  starts, takes, closes = [], [], []
  i = 0
  while i < n:
    if n - i <= body:
      take, close = n - i, False  # the tail, which ends with its document's [SEP]
    elif is_sep[i + body - 1]:
      take, close = body, False  # a document ends at the row end: its [SEP] closes the row
    else:
      # Cut here; the row gets a closing [SEP] (after a document [SEP] in the rare case
      # that one ends just before the cut, like RoBERTa's </s></s>).
      take, close = body - 1, True
    starts.append(i)
    takes.append(take)
    closes.append(close)
    i += take
  rows = len(starts)
  ids = np.full((rows, max_len), pad_id, np.int32)
  attn = np.zeros((rows, max_len), np.int32)
  special = np.ones((rows, max_len), np.int32)
  for r, (s, t, close) in enumerate(zip(starts, takes, closes)):
    ids[r, 0] = cls_id
    ids[r, 1:1 + t] = stream[s:s + t]
    special[r, 1:1 + t] = is_sep[s:s + t]
    end = 1 + t
    if close:
      ids[r, end] = sep_id
      end += 1
    attn[r, :end] = 1
  return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special}


def pack_clm(tokens: np.ndarray, offsets: np.ndarray, max_len: int, *, eos_id: int,
             pad_id: int) -> dict[str, np.ndarray]:
  """GPT-2 rows: documents joined by <|endoftext|>, cut every max_len tokens."""
  if max_len < 2:
    raise ValueError(f'data.max_len={max_len} is too short for next-token prediction')
  stream, is_sep, doc_of = _stream_with_separators(tokens, offsets, eos_id)
  n = len(stream)
  rows = -(-n // max_len)
  size = rows * max_len
  ids = np.full(size, pad_id, np.int32)
  ids[:n] = stream
  attn = np.zeros(size, np.int32)
  attn[:n] = 1
  special = np.ones(size, np.int32)
  special[:n] = is_sep
  doc = np.full(size, -1, np.int64)
  doc[:n] = doc_of
  doc = doc.reshape(rows, max_len)
  segment = np.where(attn.reshape(rows, max_len) > 0, doc - doc[:, :1] + 1, 0)
  return {'input_ids': ids.reshape(rows, max_len),
          'attention_mask': attn.reshape(rows, max_len),
          'special_tokens_mask': special.reshape(rows, max_len),
          'segment_ids': segment.astype(np.int32)}


# ----------------------------------------------------------------------------- from a store

@dataclasses.dataclass(frozen=True)
class PackSpec:
  """How rows are made: 'mlm' (cls_id [CLS], sep_id [SEP]) or 'clm' (sep_id <|endoftext|>)."""
  style: str
  max_len: int
  sep_id: int
  pad_id: int
  cls_id: int = -1

  def __post_init__(self):
    least = 3 if self.style == 'mlm' else 2
    if self.max_len < least:
      what = '[CLS] x [SEP]' if self.style == 'mlm' else 'next-token prediction'
      raise ValueError(f'data.max_len={self.max_len} is too short for {what}')


class DocSequence:
  """Documents of a store in reading order, given as sorted disjoint ranges [a, b) of
  document ids (a split: every document but the held-out ones, or the held-out ones), and
  their stream: each non-empty document followed by one separator."""

  def __init__(self, store: TokenStore, ranges):
    ranges = np.asarray(ranges, np.int64).reshape(-1, 2)
    self.store = store
    self.ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    self.n_docs = int((self.ranges[:, 1] - self.ranges[:, 0]).sum())
    full = store.stream_positions(self.ranges.reshape(-1)).reshape(-1, 2)
    self.full_starts = full[:, 0]
    self.starts = np.concatenate([[0], np.cumsum(full[:, 1] - full[:, 0])]).astype(np.int64)
    self.length = int(self.starts[-1])

  @classmethod
  def complement(cls, store: TokenStore, held_out) -> 'DocSequence':
    """Every document of the store but `held_out` (sorted ids)."""
    edges = np.concatenate([[-1], np.asarray(held_out, np.int64), [store.n_docs]])
    return cls(store, np.stack([edges[:-1] + 1, edges[1:]], 1))

  @classmethod
  def of(cls, store: TokenStore, docs) -> 'DocSequence':
    """Documents `docs` (sorted ids), runs of consecutive ids merged into one range."""
    docs = np.asarray(docs, np.int64)
    if not len(docs):
      return cls(store, np.zeros((0, 2), np.int64))
    breaks = np.flatnonzero(np.diff(docs) != 1) + 1
    lo = np.concatenate([[0], breaks])
    hi = np.concatenate([breaks, [len(docs)]])
    return cls(store, np.stack([docs[lo], docs[hi - 1] + 1], 1))

  def key(self) -> str:
    return hashlib.sha256(self.ranges.tobytes()).hexdigest()[:16]

  def read(self, pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream items [pos, pos + n) of this sequence (fewer at its end)."""
    parts = []
    while n > 0 and pos < self.length:
      j = int(np.searchsorted(self.starts, pos, 'right')) - 1
      k = min(n, int(self.starts[j + 1]) - pos)
      parts.append(self.store.read_stream(int(self.full_starts[j]) + pos - int(self.starts[j]), k))
      pos, n = pos + k, n - k
    if len(parts) == 1:
      return parts[0]
    if not parts:
      return np.zeros(0, np.int32), np.zeros(0, bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

  def separator_chunks(self) -> Iterator[np.ndarray]:
    """This sequence's separator positions, in order, a store shard at a time."""
    for j, (a, b) in enumerate(self.ranges):
      shift = int(self.starts[j]) - int(self.full_starts[j])
      for chunk in self.store.separator_positions(int(a), int(b)):
        yield chunk + shift


def mlm_row_starts(seq: DocSequence, body: int) -> Iterator[np.ndarray]:
  """Where pack_mlm's rows start in `seq`'s stream, in order, in chunks.

  pack_mlm walks the stream: a row at i takes `body` items when item i + body - 1 is a
  separator (a "hit"), else body - 1 and a closing [SEP]; the row with n - i <= body is the
  last. Between hits rows advance by m = body - 1, so the next hit from i is the first
  separator s >= i + m with s = i + m (mod m); the walk jumps from hit to hit with one
  search per hit among the separators of that residue.
  """
  n, m = seq.length, body - 1
  if n == 0:
    return
  i, tail_from = 0, n - body  # a row starting at or after tail_from is the last one
  chunks = seq.separator_chunks()
  seps, chunk_end = np.zeros(0, np.int64), 0
  while True:
    if i >= tail_from:
      yield np.asarray([i], np.int64)
      return
    c = i + m  # the item a row at i ends on
    while c >= chunk_end:  # load separators until the chunk holding c
      seps = next(chunks, None)
      if seps is None:
        seps, chunk_end = np.zeros(0, np.int64), n
      else:
        chunk_end = int(seps[-1]) + 1 if len(seps) else chunk_end
      by_res = _by_residue(seps, m)
    hit = _first_hit(by_res, c, m)
    if hit is not None and hit < chunk_end:
      k_end = (hit - c) // m + 1  # rows i, i+m, ..., hit - m; the last takes `body`
      nxt = hit + 1
    else:
      k_end = -(-(chunk_end - c) // m)  # every row ending before chunk_end: no hit
      nxt = i + k_end * m
    rows = i + m * np.arange(k_end, dtype=np.int64)
    tail = np.searchsorted(rows, tail_from)
    if tail < len(rows):  # the last row is among these
      yield rows[:tail + 1]
      return
    yield rows
    i = nxt


def _by_residue(seps: np.ndarray, m: int):
  res = seps % m
  order = np.lexsort((seps, res))
  return res[order], seps[order]


def _first_hit(by_res, c: int, m: int) -> int | None:
  """The first separator s >= c with s = c (mod m)."""
  res, pos = by_res
  r = c % m
  lo, hi = np.searchsorted(res, r, 'left'), np.searchsorted(res, r, 'right')
  k = lo + np.searchsorted(pos[lo:hi], c, 'left')
  return int(pos[k]) if k < hi else None


class PackedRows:
  """Rows [lo, hi) of the packing of a DocSequence, as a grain random-access data source:
  row i -> dict of int32 [max_len] arrays, equal to row lo + i of pack_mlm / pack_clm over
  the same documents. `starts`: the BERT rows' starts (an index; None for GPT-2);
  `n_rows`: rows of the whole packing (its last row may be short); `complete`: False when
  `starts` is only a prefix of the packing (then no row is the short last one)."""

  def __init__(self, seq: DocSequence, spec: PackSpec, starts: np.ndarray | None = None,
               lo: int = 0, hi: int | None = None, complete: bool = True):
    self.seq, self.spec, self.starts = seq, spec, starts
    if spec.style == 'mlm':
      self.n_rows = len(starts)
    else:
      self.n_rows = -(-seq.length // spec.max_len)
    self.tail = self.n_rows - 1 if complete else -1
    self.lo = lo
    self.hi = self.n_rows if hi is None else min(hi, self.n_rows)

  def __len__(self):
    return max(self.hi - self.lo, 0)

  def __getstate__(self):  # a memory-mapped index travels as its path, not its contents
    state = dict(self.__dict__)
    if isinstance(self.starts, np.memmap):
      state['starts'] = ('memmap', self.starts.filename)
    return state

  def __setstate__(self, state):
    if isinstance(state['starts'], tuple):
      state['starts'] = np.load(state['starts'][1], mmap_mode='r')
    self.__dict__.update(state)

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'row {i} of {len(self)}')
    r = self.lo + i
    return self._mlm_row(r) if self.spec.style == 'mlm' else self._clm_row(r)

  def __repr__(self):
    return (f'PackedRows({self.spec.style}, max_len={self.spec.max_len}, rows={len(self)}, '
            f'docs={self.seq.n_docs}, store={self.seq.store.path})')

  def view(self, lo: int, hi: int) -> 'PackedRows':
    """Rows [lo, hi) of this one (sharing its index)."""
    out = PackedRows.__new__(PackedRows)
    out.__dict__.update(self.__dict__, lo=self.lo + lo, hi=min(self.lo + hi, self.hi))
    return out

  def rows(self, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
    """Rows [lo, hi) stacked into [n, max_len] arrays (eval sets, tests)."""
    hi = len(self) if hi is None else min(hi, len(self))
    items = [self[i] for i in range(lo, hi)]
    if not items:
      keys = ['input_ids', 'attention_mask', 'special_tokens_mask'] + (
          ['segment_ids'] if self.spec.style == 'clm' else [])
      return {k: np.zeros((0, self.spec.max_len), np.int32) for k in keys}
    return {k: np.stack([it[k] for it in items]) for k in items[0]}

  def _mlm_row(self, r: int) -> dict[str, np.ndarray]:
    spec, L = self.spec, self.spec.max_len
    body = L - 1
    items, seps = self.seq.read(int(self.starts[r]), body)
    if r == self.tail:
      take, close = len(items), False
    elif seps[body - 1]:
      take, close = body, False
    else:
      take, close = body - 1, True
    ids = np.full(L, spec.pad_id, np.int32)
    attn = np.zeros(L, np.int32)
    special = np.ones(L, np.int32)
    ids[0] = spec.cls_id
    ids[1:1 + take] = np.where(seps[:take], spec.sep_id, items[:take])
    special[1:1 + take] = seps[:take]
    end = 1 + take
    if close:
      ids[end] = spec.sep_id
      end += 1
    attn[:end] = 1
    return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special}

  def _clm_row(self, r: int) -> dict[str, np.ndarray]:
    spec, L = self.spec, self.spec.max_len
    items, seps = self.seq.read(r * L, L)
    k = len(items)
    ids = np.full(L, spec.pad_id, np.int32)
    attn = np.zeros(L, np.int32)
    special = np.ones(L, np.int32)
    segment = np.zeros(L, np.int32)
    ids[:k] = np.where(seps, spec.sep_id, items)
    attn[:k] = 1
    special[:k] = seps
    segment[:k] = 1 + np.concatenate([[0], np.cumsum(seps[:-1])]) if k else 0
    return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special,
            'segment_ids': segment}

  def attended_tokens(self) -> int:
    """Sum of attention_mask over these rows, from two index entries (the index is never
    read whole: its pages would count as resident memory)."""
    n = len(self)
    if n == 0:
      return 0
    L = self.spec.max_len
    if self.spec.style == 'clm':
      return min(self.hi * L, self.seq.length) - self.lo * L
    end = self.seq.length if self.hi >= self.n_rows else int(self.starts[self.hi])
    takes = end - int(self.starts[self.lo])  # stream items after the [CLS] of each row
    with_tail = self.tail == self.hi - 1
    regular = n - with_tail
    tail_take = end - int(self.starts[self.hi - 1]) if with_tail else 0
    # A regular row takes body - 1 items and a closing [SEP], or body items (a "hit").
    hits = takes - tail_take - regular * (L - 2)
    return n + takes + (regular - hits)

  def pad_fraction(self) -> float:
    n = len(self) * self.spec.max_len
    return 1.0 - self.attended_tokens() / n if n else 0.0


# ----------------------------------------------------------------------------- the index

def packed_rows(seq: DocSequence, spec: PackSpec, max_rows: int = 0) -> PackedRows:
  """Every row of `seq` (the BERT row index is read from, or first written to, the store's
  packed/ folder), or with max_rows > 0 its first max_rows rows (index in memory)."""
  if spec.style == 'clm':
    return PackedRows(seq, spec, hi=max_rows or None)
  body = spec.max_len - 1
  if max_rows > 0:
    starts, complete = [], True
    count = 0
    for chunk in mlm_row_starts(seq, body):
      starts.append(chunk)
      count += len(chunk)
      if count > max_rows:
        complete = False
        break
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return PackedRows(seq, spec, starts, hi=max_rows, complete=complete)
  path = os.path.join(seq.store.path, 'packed', f'mlm-L{spec.max_len}-{seq.key()}.npy')
  return PackedRows(seq, spec, _row_index(path, lambda: mlm_row_starts(seq, body)))


def _row_index(path: str, chunks) -> np.ndarray:
  """The int64 row-start index at `path` (memory-mapped), written first if missing: by one
  process at a time (a lock), through a temp file and a rename."""
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + '.lock'):
      if not os.path.exists(path):
        _write_index(path, chunks())
  return np.load(path, mmap_mode='r')


def _write_index(path: str, chunks) -> None:
  tmp = f'{path}.{socket.gethostname()}-{os.getpid()}.tmp'
  raw = tmp + '.raw'
  try:
    n = 0
    with open(raw, 'wb') as f:
      for chunk in chunks:
        f.write(np.ascontiguousarray(chunk, np.int64).tobytes())
        n += len(chunk)
    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.int64, shape=(n,))
    src = np.memmap(raw, np.int64, 'r', shape=(n,)) if n else np.zeros(0, np.int64)
    for a in range(0, n, 1 << 22):
      out[a:a + (1 << 22)] = src[a:a + (1 << 22)]
    out.flush()
    del out, src
    os.replace(tmp, path)
  finally:
    for p in (raw, tmp):
      if os.path.exists(p):
        os.remove(p)


@contextlib.contextmanager
def _locked(path: str):
  fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass  # no locks on this filesystem: concurrent writers write the same file
    yield
  finally:
    os.close(fd)
