"""Raw text documents: local files, Hugging Face datasets, TFDS, read in shards.

A "document" is the unit that packing keeps contiguous and separates with [SEP] /
<|endoftext|>. A `Source` names one split's text (which files or dataset, how to cut it
into documents). `plan_shards` cuts a source into shards that are read independently
(`iter_shard`), so tokenizing runs in parallel processes and hosts and never holds the
corpus in memory: a large .txt / .jsonl file is cut into byte ranges whose ends move
forward to the next document boundary, a Parquet file by row groups, an HF dataset or a
TFDS source by row ranges, a streamed HF dataset by its own file shards. Reading the
shards of a plan in order gives exactly the documents of reading the whole source.

Files: .txt .text (documents are blank-line-separated blocks, or lines with
doc_split='line'), .jsonl .ndjson .json (one object per line, or a .json array),
.csv .tsv (with a header row), .parquet; `text_column` names the text field.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import sys
import threading
from typing import Iterator, Sequence

from jaxft.files import InputError, MissingInput

_EXTENSIONS = {'.txt': 'txt', '.text': 'txt', '.jsonl': 'jsonl', '.json': 'jsonl',
               '.ndjson': 'jsonl', '.csv': 'csv', '.tsv': 'tsv', '.parquet': 'parquet'}
_FORMATS = ('txt', 'jsonl', 'csv', 'tsv', 'parquet')
_TFDS_ROW_BYTES = 2048  # a guess at a TFDS record's text size, to size its shards


@dataclasses.dataclass(frozen=True)
class Source:
  """One split's raw text. kind 'files' reads `paths` (paths, globs, directories);
  'hf' calls datasets.load_dataset(hf_name, hf_config, split=hf_split,
  data_files=hf_data_files, streaming=hf_streaming); 'tfds' tfds.data_source(tfds_name,
  split=tfds_split, data_dir=tfds_data_dir). max_docs > 0 keeps the first documents only."""
  kind: str = 'files'
  paths: tuple[str, ...] = ()
  key: str = 'data.files'  # the config key that named the paths, for error messages
  file_format: str = ''
  doc_split: str = 'blank_line'
  text_column: str = 'text'
  hf_name: str = ''
  hf_config: str = ''
  hf_split: str = ''
  hf_data_files: tuple[str, ...] = ()
  hf_streaming: bool = False
  tfds_name: str = ''
  tfds_split: str = ''
  tfds_data_dir: str = ''
  max_docs: int = 0

  def describe(self) -> str:
    if self.kind == 'files':
      return f'{self.key}={",".join(self.paths)}'
    if self.kind == 'hf':
      return f'HF dataset {self.hf_name!r} ({self.hf_config or "-"}) split {self.hf_split!r}'
    return f'TFDS {self.tfds_name!r} split {self.tfds_split!r}'


@dataclasses.dataclass(frozen=True)
class Piece:
  """Part of one input, [start, end) in the unit of `fmt`: bytes of a txt/jsonl file (each
  end moved forward to the next document boundary when read: both neighbours agree on
  it), row groups of a parquet file, rows of an HF dataset ('hf') or TFDS source ('tfds'),
  source shards of a streamed HF dataset ('hf_stream'); whole-file formats (csv, tsv, a
  .json array) are one piece. `size`: input bytes, for progress (0 = unknown)."""
  fmt: str
  path: str = ''
  start: int = 0
  end: int = 0
  size: int = 0


Shard = tuple  # tuple[Piece, ...], read in order


def as_list(value) -> list[str]:
  """A path, 'a,b' (handy for command-line overrides), a list of paths, or '' -> list."""
  if value is None or value == '':
    return []
  if isinstance(value, os.PathLike):
    return [os.fspath(value)]
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return [os.fspath(v) for v in value]


# ----------------------------------------------------------------------------- planning

def plan_shards(source: Source, shard_bytes: int) -> list[Shard]:
  """The source cut into shards of about `shard_bytes` input bytes, in reading order."""
  if source.kind == 'files':
    pieces = _file_pieces(source, shard_bytes)
  elif source.kind == 'hf':
    pieces = _hf_pieces(source, shard_bytes)
  elif source.kind == 'tfds':
    pieces = _tfds_pieces(source, shard_bytes)
  else:
    raise ValueError(f"data.source must be 'files', 'hf' or 'tfds', got {source.kind!r}")
  if source.max_docs > 0:  # the first documents: one shard read in order, stopped early
    return [tuple(pieces)]
  shards, current, size = [], [], 0
  for piece in pieces:  # small files share a shard; a big file's pieces are shards alone
    if current and (size + piece.size > shard_bytes or not piece.size):
      shards.append(tuple(current))
      current, size = [], 0
    current.append(piece)
    size += piece.size
    if not piece.size:
      shards.append(tuple(current))
      current, size = [], 0
  if current:
    shards.append(tuple(current))
  return shards


def file_format(path: str, configured: str = '') -> str:
  fmt = configured or _EXTENSIONS.get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise InputError(f'{path}: unknown file type; supported: {sorted(_EXTENSIONS)} '
                     "(or set data.file_format='txt'|'jsonl'|'csv'|'tsv'|'parquet')")
  if fmt not in _FORMATS:
    raise ValueError(f'data.file_format must be one of {_FORMATS}, got {fmt!r}')
  return fmt


def _file_pieces(source: Source, shard_bytes: int) -> list[Piece]:
  pieces = []
  for path in expand_paths(source.paths, source.key):
    fmt = file_format(path, source.file_format)
    size = os.path.getsize(path)
    if fmt == 'jsonl' and _first_char(path) == '[':
      fmt = 'json'  # a whole-file JSON array: not splittable
    if fmt == 'parquet':
      pieces.extend(_parquet_pieces(path, shard_bytes))
    elif fmt in ('txt', 'jsonl') and size > shard_bytes:
      n = math.ceil(size / shard_bytes)
      bounds = [size * k // n for k in range(n + 1)]
      pieces.extend(Piece(fmt, path, a, b, b - a) for a, b in zip(bounds, bounds[1:]))
    else:
      pieces.append(Piece(fmt, path, 0, size, size))
  return pieces


def _parquet_pieces(path: str, shard_bytes: int) -> list[Piece]:
  import pyarrow.parquet as pq
  meta = pq.ParquetFile(path).metadata
  pieces, start, size = [], 0, 0
  for g in range(meta.num_row_groups):
    size += meta.row_group(g).total_byte_size
    if size >= shard_bytes or g == meta.num_row_groups - 1:
      pieces.append(Piece('parquet', path, start, g + 1, size))
      start, size = g + 1, 0
  return pieces


def _hf_pieces(source: Source, shard_bytes: int) -> list[Piece]:
  ds = hf_dataset(source)
  if source.hf_streaming:
    return [Piece('hf_stream', '', i, i + 1, 0) for i in range(ds.n_shards)]
  n, nbytes = len(ds), max(int(ds.data.nbytes), 1)
  rows = max(1, int(n * shard_bytes // nbytes))
  return [Piece('hf', '', a, min(a + rows, n), nbytes * (min(a + rows, n) - a) // max(n, 1))
          for a in range(0, n, rows)]


def _tfds_pieces(source: Source, shard_bytes: int) -> list[Piece]:
  n = len(tfds_source(source))
  rows = max(1, shard_bytes // _TFDS_ROW_BYTES)
  return [Piece('tfds', '', a, min(a + rows, n), 0) for a in range(0, n, rows)]


def _first_char(path: str) -> str:
  with open(path, 'rb') as f:
    head = f.read(4096).lstrip()
  return head[:1].decode('ascii', 'replace')


def fingerprint(source: Source, mode: str = 'content', sha256=None) -> str:
  """Hash of what decides the documents: the source settings and its data. mode
  'content' hashes every input file's bytes (safe when files are edited or copied;
  `sha256(path)` may remember hashes of unchanged files); 'stat' their path, size and
  modification time. HF datasets contribute their own fingerprint (streamed ones: their
  name, config, split and data files), TFDS sources their name, split and length."""
  if mode not in ('content', 'stat'):
    raise ValueError(f"data.store_key must be 'content' or 'stat', got {mode!r}")
  sha256 = sha256 or file_sha256
  desc = dataclasses.asdict(source)
  desc.pop('key')
  if source.kind == 'files':
    desc['files'] = _files_fingerprint(expand_paths(source.paths, source.key), mode, sha256)
  elif source.kind == 'hf':
    local = [p for pattern in source.hf_data_files for p in sorted(glob.glob(pattern))]
    desc['data_files'] = _files_fingerprint(local, mode, sha256) if local else None
    if not source.hf_streaming:
      desc['hf_fingerprint'] = getattr(hf_dataset(source), '_fingerprint', None)
  else:
    desc['rows'] = len(tfds_source(source))
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _files_fingerprint(paths: list[str], mode: str, sha256) -> list:
  if mode == 'stat':
    out = []
    for p in paths:
      st = os.stat(p)
      out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(sha256, paths))  # hashlib releases the GIL on big blocks


def file_sha256(path: str, block: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(block):
      h.update(chunk)
  return h.hexdigest()


class HashCache:
  """file_sha256 that remembers each file's hash by (size, mtime_ns, inode) in a JSON file:
  a restart re-reads only the files that changed. (A change that keeps a file's size and
  modification time, like bit rot, goes unnoticed until the file is written again.)"""

  def __init__(self, path: str):
    self.path = path
    self.entries = _read_json_dict(path)
    self.lock = threading.Lock()
    self.changed = False

  def __call__(self, file: str) -> str:
    st = os.stat(file)
    key, stamp = os.path.abspath(file), [st.st_size, st.st_mtime_ns, st.st_ino]
    with self.lock:
      known = self.entries.get(key)
    if known and known[:3] == stamp:
      return known[3]
    digest = file_sha256(file)
    with self.lock:
      self.entries[key] = stamp + [digest]
      self.changed = True
    return digest

  def remember(self, file: str, digest: str) -> None:
    """Record a hash just computed elsewhere (a shard's writer) for the file as it is now."""
    st = os.stat(file)
    with self.lock:
      self.entries[os.path.abspath(file)] = [st.st_size, st.st_mtime_ns, st.st_ino, digest]
      self.changed = True

  def save(self) -> None:
    """Merged with what other processes saved meanwhile; a temp file, then a rename."""
    if not self.changed:
      return
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    entries = {**_read_json_dict(self.path), **self.entries}
    tmp = f'{self.path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(entries, f)
    os.replace(tmp, self.path)
    self.changed = False


def _read_json_dict(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


# ----------------------------------------------------------------------------- reading

def iter_shard(source: Source, shard: Shard) -> Iterator[str]:
  """The non-empty documents of one shard, in order (max_docs applies within it)."""
  n = 0
  for piece in shard:
    for doc in _iter_piece(source, piece):
      yield doc
      n += 1
      if source.max_docs and n >= source.max_docs:
        return


def iter_documents(source: Source, shard_bytes: int = 1 << 30) -> Iterator[str]:
  """Every document of the source, in order."""
  n = 0
  for shard in plan_shards(source, shard_bytes):
    for doc in iter_shard(source, shard):
      yield doc
      n += 1
      if source.max_docs and n >= source.max_docs:
        return


def load_documents(source: Source) -> list[str]:
  """All documents as a list: for small sources and tests (the store streams them)."""
  return list(iter_documents(source))


def _iter_piece(source: Source, piece: Piece) -> Iterator[str]:
  fmt = piece.fmt
  if fmt == 'txt':
    yield from _iter_txt(piece.path, source.doc_split, piece.start, piece.end)
  elif fmt == 'jsonl':
    yield from _iter_jsonl_lines(piece.path, source.text_column, piece.start, piece.end)
  elif fmt == 'json':
    yield from read_jsonl(piece.path, source.text_column)
  elif fmt in ('csv', 'tsv'):
    yield from iter_csv(piece.path, source.text_column, '\t' if fmt == 'tsv' else ',')
  elif fmt == 'parquet':
    yield from _iter_parquet(piece.path, source.text_column, piece.start, piece.end)
  elif fmt in ('hf', 'hf_stream'):
    yield from _iter_hf(source, piece)
  elif fmt == 'tfds':
    yield from _iter_tfds(source, piece.start, piece.end)
  else:
    raise ValueError(f'unknown piece format {fmt!r}')


# ----------------------------------------------------------------------------- files

def expand_paths(patterns: Sequence[str], key: str = 'data.files') -> list[str]:
  """Globs, directories (their supported files) and plain paths -> sorted file list."""
  out = []
  for pattern in as_list(patterns):
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise MissingInput(f'{key}: pattern {pattern!r} matches no files')
      out.extend(matches)
    elif os.path.isdir(pattern):
      matches = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                       if os.path.splitext(f)[1].lower() in _EXTENSIONS)
      if not matches:
        raise MissingInput(f'{key}: directory {pattern!r} has no '
                                f'{"/".join(sorted(_EXTENSIONS))} files')
      out.extend(matches)
    elif os.path.isfile(pattern):
      out.append(pattern)
    else:
      raise MissingInput(f'{key}: file {pattern!r} does not exist')
  return out


def read_files(paths: Sequence[str] | str, *, doc_split: str = 'blank_line',
               text_column: str = 'text', file_format: str = '',
               key: str = 'data.files') -> list[str]:
  """Documents from local files, in the (sorted-glob) order given."""
  return load_documents(Source(paths=tuple(as_list(paths)), key=key, doc_split=doc_split,
                               text_column=text_column, file_format=file_format))


_BLANK = re.compile(r'\n[ \t\r\f\v]*\n\s*')
_BLANK_BYTES = re.compile(rb'\n[ \t\r\f\v]*\n')


def read_txt(path: str, doc_split: str = 'blank_line') -> list[str]:
  """'blank_line': each block between blank lines is a document (line breaks kept);
  'line': each non-empty line is a document."""
  return list(_iter_txt(path, doc_split, 0, os.path.getsize(path)))


def _iter_txt(path: str, doc_split: str, start: int, end: int) -> Iterator[str]:
  if doc_split not in ('blank_line', 'line'):
    raise ValueError(f"data.doc_split must be 'blank_line' or 'line', got {doc_split!r}")
  data, offset = _read_range(path, start, end, doc_split)
  text = _decode(data, path, offset)
  parts = text.split('\n') if doc_split == 'line' else _BLANK.split(text)
  for p in parts:
    p = p.strip()
    if p:
      yield p


def _read_range(path: str, start: int, end: int, boundary: str) -> tuple[bytes, int]:
  """Bytes [start', end') of `path`, each end moved forward to a document boundary:
  after a blank line ('blank_line') or a newline ('line'); returns (bytes, start')."""
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    a = _boundary(f, start, boundary) if 0 < start < size else min(start, size)
    b = _boundary(f, end, boundary) if 0 < end < size else size
    f.seek(a)
    return f.read(max(b - a, 0)), a


def _boundary(f, pos: int, boundary: str, block: int = 1 << 20) -> int:
  """The first document boundary at or after byte `pos` (a function of pos alone)."""
  if boundary != 'blank_line':  # the start of the first line at or after pos
    f.seek(pos - 1)
    f.readline()
    return f.tell()
  f.seek(pos)
  buf, searched = b'', 0
  while True:
    chunk = f.read(block)
    buf += chunk
    m = _BLANK_BYTES.search(buf, searched)
    if m:  # text[:p] ends with a blank line: both parts parse into the same documents
      return pos + m.end()
    if not chunk:
      return pos + len(buf)
    searched = max(buf.rfind(b'\n'), 0)  # a match can only start at or after the last \n


def _decode(data: bytes, path: str, offset: int) -> str:
  """Strict UTF-8 with universal newlines (what open(..., newline=None) reads)."""
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = text_line_of(path, offset + e.start)
    raise InputError(f'{path}:{line}: not valid UTF-8 ({e.reason})') from e
  return text.replace('\r\n', '\n').replace('\r', '\n')


def text_line_of(path: str, byte_offset: int) -> int:
  with open(path, 'rb') as f:
    line = 1
    while byte_offset > 0:
      chunk = f.read(min(byte_offset, 1 << 22))
      if not chunk:
        break
      line += chunk.count(b'\n')
      byte_offset -= len(chunk)
  return line


def read_jsonl(path: str, text_column: str = 'text') -> list[str]:
  """One JSON object per line (or a .json file holding one list of objects)."""
  if _first_char(path) != '[':
    return list(_iter_jsonl_lines(path, text_column, 0, os.path.getsize(path)))
  with open(path, encoding='utf-8') as f:
    try:
      rows = json.load(f)
    except json.JSONDecodeError as e:
      raise InputError(f'{path}:{e.lineno}: bad JSON: {e.msg}') from e
  docs = []
  for i, row in enumerate(rows):
    text = _column(row, text_column, f'{path}: item {i}')
    if text.strip():
      docs.append(text)
  return docs


def _iter_jsonl_lines(path: str, text_column: str, start: int, end: int) -> Iterator[str]:
  data, offset = _read_range(path, start, end, 'line')
  text = _decode(data, path, offset)
  for i, line in enumerate(text.split('\n')):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f'{path}:{text_line_of(path, offset) + i}: bad JSON line: {e.msg} '
                       f'(column {e.colno}): {line.strip()[:80]!r}') from e
    doc = _column(row, text_column, lambda: f'{path}:{text_line_of(path, offset) + i}')
    if doc.strip():
      yield doc


def _column(row, text_column: str, where) -> str:
  """row[text_column] as text ('' for null); `where` (a string, or a function giving one:
  computed on errors only) names the file and line in messages."""
  if not isinstance(row, dict) or text_column not in row or not isinstance(
      row[text_column], (str, type(None))):
    where = where() if callable(where) else where
  if not isinstance(row, dict):
    raise InputError(f'{where}: expected a JSON object with key {text_column!r}, '
                     f'got {type(row).__name__}')
  if text_column not in row:
    raise KeyError(f'{where}: no column {text_column!r} (data.text_column); '
                   f'available columns: {sorted(row)}')
  text = row[text_column]
  if text is None:
    return ''
  if not isinstance(text, str):
    raise InputError(f'{where}: column {text_column!r} is {type(text).__name__}, not text')
  return text


def iter_csv(path: str, text_column: str = 'text', delimiter: str = ',') -> Iterator[str]:
  """CSV (quoted, RFC 4180) or TSV (unquoted, GLUE-style) with a header row."""
  csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
  quoting = csv.QUOTE_NONE if delimiter == '\t' else csv.QUOTE_MINIMAL
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    try:
      header = next(reader)
    except StopIteration:
      raise InputError(f'{path}: empty file (expected a header row)') from None
    if text_column not in header:
      raise KeyError(f'{path}:1: no column {text_column!r} (data.text_column); '
                     f'available columns: {header}')
    col = header.index(text_column)
    for row in reader:
      if not row:
        continue
      if len(row) <= col:
        raise InputError(f'{path}:{reader.line_num}: row has {len(row)} fields, '
                         f'header has {len(header)} (column {text_column!r} missing)')
      if row[col].strip():
        yield row[col]


def _iter_parquet(path: str, text_column: str, start: int, end: int) -> Iterator[str]:
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(path)
  names = pf.schema_arrow.names
  if text_column not in names:
    raise KeyError(f'{path}: no column {text_column!r} (data.text_column); '
                   f'available columns: {names}')
  row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
  for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(start, end)),
                               columns=[text_column]):
    for text in batch.column(0).to_pylist():
      if text is not None and not isinstance(text, str):
        raise InputError(f'{path}: row {row}: column {text_column!r} is '
                         f'{type(text).__name__}, not text')
      row += 1
      if text and text.strip():
        yield text


# ----------------------------------------------------------------------------- HF / TFDS

@functools.lru_cache(maxsize=8)
def hf_dataset(source: Source):
  """`datasets.load_dataset(...)`: memory-mapped Arrow, or an IterableDataset when
  streaming; local `data_files` work too."""
  if not source.hf_name:
    raise ValueError('data.hf_name is empty')
  import datasets
  kwargs = {'split': source.hf_split}
  if source.hf_data_files:
    kwargs['data_files'] = list(source.hf_data_files)
  if source.hf_streaming:
    kwargs['streaming'] = True
  try:
    return datasets.load_dataset(source.hf_name, source.hf_config or None, **kwargs)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{source.describe()}: {e}') from e


def _iter_hf(source: Source, piece: Piece) -> Iterator[str]:
  ds, col = hf_dataset(source), source.text_column
  if piece.fmt == 'hf_stream':
    rows = ds.shard(num_shards=ds.n_shards, index=piece.start)
    for i, row in enumerate(rows):
      if col not in row:
        raise KeyError(f'{source.describe()} row {i} of shard {piece.start}: no column '
                       f'{col!r} (data.text_column); available columns: {sorted(row)}')
      if row[col] and row[col].strip():
        yield row[col]
    return
  if col not in ds.column_names:
    raise KeyError(f'{source.describe()}: no column {col!r} (data.text_column); '
                   f'available columns: {ds.column_names}')
  for a in range(piece.start, piece.end, 1024):
    for text in ds[a:min(a + 1024, piece.end)][col]:
      if text and text.strip():
        yield text


@functools.lru_cache(maxsize=8)
def tfds_source(source: Source):
  """`tfds.data_source(name, split=split)`: random-access array_record, no TensorFlow."""
  if not source.tfds_name:
    raise ValueError('data.tfds_name is empty')
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        f'data.tfds_name={source.tfds_name!r} needs tensorflow-datasets, which is an optional '
        "extra: pip install 'jaxft[tfds]' (tensorflow-datasets and array_record; TensorFlow "
        'itself is not needed)') from e
  kwargs = {'split': source.tfds_split}
  if source.tfds_data_dir:
    kwargs['data_dir'] = source.tfds_data_dir
  return tfds.data_source(source.tfds_name, **kwargs)


def _iter_tfds(source: Source, start: int, end: int) -> Iterator[str]:
  data = tfds_source(source)
  col = source.text_column
  for i in range(start, end):
    row = data[i]
    if col not in row:
      raise KeyError(f'TFDS {source.tfds_name!r} split {source.tfds_split!r} record {i}: no '
                     f'feature {col!r} (data.text_column); available: {sorted(row)}')
    text = row[col]
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    elif hasattr(text, 'item'):  # numpy scalar / 0-d array of bytes
      text = text.item()
      text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    if text.strip():
      yield text
