"""Raw text documents from a config: local files, Hugging Face datasets, or TFDS.

A "document" is the unit that packing keeps contiguous and separates with [SEP] /
<|endoftext|>. Every reader returns a plain `list[str]` so the tokenize cache can hash
the content itself: editing a file (or switching dataset version) can never reuse a
stale cache.

Config keys (`data.*`, defaults in `DEFAULTS`):
  source       'files' | 'hf' | 'tfds'; '' infers: hf_name -> 'hf', tfds_name -> 'tfds', else
               'files'
  files        a path, glob, directory, 'a,b' string, or list of them
               (.txt .text .jsonl .ndjson .json .csv .tsv)
  file_format  '' (by extension) | 'txt' | 'jsonl' | 'csv' | 'tsv': for other extensions
  doc_split    'blank_line' (blank-line-separated blocks) | 'line' (one document per line);
               .txt only
  text_column  column / key holding the text in jsonl/csv/tsv/HF/TFDS ('text')
  hf_name, hf_config, hf_split, hf_data_files     datasets.load_dataset(...) arguments
  tfds_name, tfds_split, tfds_data_dir            tfds.data_source(...) arguments
  eval_files, hf_eval_split, tfds_eval_split      an explicit eval source (else split from train)
  max_docs     keep only the first N documents (0 = all): quick runs on big sources
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from typing import Any, Sequence

DEFAULTS = dict(
    source='',
    files=(),
    file_format='',
    doc_split='blank_line',
    text_column='text',
    hf_name='',
    hf_config='',
    hf_split='train',
    hf_data_files=(),
    tfds_name='',
    tfds_split='train',
    tfds_data_dir='',
    eval_files=(),
    hf_eval_split='',
    tfds_eval_split='',
    max_docs=0,
)

_EXTENSIONS = {'.txt': 'txt', '.text': 'txt', '.jsonl': 'jsonl', '.json': 'jsonl',
               '.ndjson': 'jsonl', '.csv': 'csv', '.tsv': 'tsv'}


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads `cfg.key` from a ConfigDict/dict/object, `default` (or DEFAULTS) when unset."""
  if default is None:
    default = DEFAULTS.get(key)
  if cfg is None:
    return default
  if isinstance(cfg, dict) or hasattr(cfg, 'get'):
    try:
      value = cfg.get(key, default)
    except (AttributeError, KeyError):
      value = default
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def as_list(value) -> list[str]:
  """A path, 'a,b' (handy for command-line overrides), a list of paths, or '' -> list."""
  if value is None or value == '':
    return []
  if isinstance(value, os.PathLike):
    return [os.fspath(value)]
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return [os.fspath(v) for v in value]


def source_kind(data_cfg) -> str:
  kind = cfg_get(data_cfg, 'source')
  if not kind:
    if cfg_get(data_cfg, 'hf_name'):
      kind = 'hf'
    elif cfg_get(data_cfg, 'tfds_name'):
      kind = 'tfds'
    else:
      kind = 'files'
  if kind not in ('files', 'hf', 'tfds'):
    raise ValueError(f"data.source must be 'files', 'hf' or 'tfds', got {kind!r}")
  return kind


def load_documents(data_cfg, split: str = 'train') -> list[str] | None:
  """Documents of `split` ('train' or 'eval') as a list of non-empty strings.

  For 'eval' returns None when the config names no separate eval source (the caller
  then holds out part of the train documents).
  """
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  kind = source_kind(data_cfg)
  column = cfg_get(data_cfg, 'text_column')
  if kind == 'files':
    key = 'files' if split == 'train' else 'eval_files'
    paths = as_list(cfg_get(data_cfg, key))
    if not paths:
      if split == 'eval':
        return None
      raise ValueError('data.files is empty: name text files (or set data.hf_name / '
                       'data.tfds_name)')
    docs = read_files(paths, doc_split=cfg_get(data_cfg, 'doc_split'), text_column=column,
                      file_format=cfg_get(data_cfg, 'file_format'), key=f'data.{key}')
  elif kind == 'hf':
    hf_split = cfg_get(data_cfg, 'hf_split' if split == 'train' else 'hf_eval_split')
    if not hf_split:
      return None
    docs = read_hf(cfg_get(data_cfg, 'hf_name'), cfg_get(data_cfg, 'hf_config') or None,
                   hf_split, text_column=column,
                   data_files=as_list(cfg_get(data_cfg, 'hf_data_files')) or None)
  else:
    tfds_split = cfg_get(data_cfg, 'tfds_split' if split == 'train' else 'tfds_eval_split')
    if not tfds_split:
      return None
    docs = read_tfds(cfg_get(data_cfg, 'tfds_name'), tfds_split, text_column=column,
                     data_dir=cfg_get(data_cfg, 'tfds_data_dir') or None)
  max_docs = int(cfg_get(data_cfg, 'max_docs') or 0)
  if max_docs > 0:
    docs = docs[:max_docs]
  if not docs:
    raise ValueError(f'the {split} source of data ({kind}) has no non-empty documents')
  return docs


# ----------------------------------------------------------------------------- files

def expand_paths(patterns: Sequence[str], key: str = 'data.files') -> list[str]:
  """Globs, directories (their supported files) and plain paths -> sorted file list."""
  out = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(f'{key}: pattern {pattern!r} matches no files')
      out.extend(matches)
    elif os.path.isdir(pattern):
      matches = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                       if os.path.splitext(f)[1].lower() in _EXTENSIONS)
      if not matches:
        raise FileNotFoundError(f'{key}: directory {pattern!r} has no '
                                f'{"/".join(sorted(_EXTENSIONS))} files')
      out.extend(matches)
    elif os.path.isfile(pattern):
      out.append(pattern)
    else:
      raise FileNotFoundError(f'{key}: file {pattern!r} does not exist')
  return out


def read_files(paths: Sequence[str] | str, *, doc_split: str = 'blank_line',
               text_column: str = 'text', file_format: str = '',
               key: str = 'data.files') -> list[str]:
  """Documents from local files, in the (sorted-glob) order given."""
  docs = []
  for path in expand_paths(as_list(paths), key):
    fmt = file_format or _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
      raise ValueError(f'{path}: unknown file type; supported: {sorted(_EXTENSIONS)} '
                       "(or set data.file_format='txt'|'jsonl'|'csv'|'tsv')")
    if fmt == 'txt':
      docs.extend(read_txt(path, doc_split))
    elif fmt == 'jsonl':
      docs.extend(read_jsonl(path, text_column))
    elif fmt in ('csv', 'tsv'):
      docs.extend(read_csv(path, text_column, delimiter='\t' if fmt == 'tsv' else ','))
    else:
      raise ValueError(f"data.file_format must be 'txt', 'jsonl', 'csv' or 'tsv', got {fmt!r}")
  return docs


_BLANK = re.compile(r'\n[ \t\r\f\v]*\n\s*')


def read_txt(path: str, doc_split: str = 'blank_line') -> list[str]:
  """'blank_line': each block between blank lines is a document (line breaks kept);
  'line': each non-empty line is a document."""
  with open(path, encoding='utf-8', errors='strict', newline=None) as f:
    try:
      text = f.read()
    except UnicodeDecodeError as e:
      line = text_line_of(path, e.start)
      raise ValueError(f'{path}:{line}: not valid UTF-8 ({e.reason})') from e
  if doc_split == 'line':
    parts = text.split('\n')
  elif doc_split == 'blank_line':
    parts = _BLANK.split(text)
  else:
    raise ValueError(f"data.doc_split must be 'blank_line' or 'line', got {doc_split!r}")
  return [p.strip() for p in parts if p.strip()]


def text_line_of(path: str, byte_offset: int) -> int:
  with open(path, 'rb') as f:
    return f.read(byte_offset).count(b'\n') + 1


def read_jsonl(path: str, text_column: str = 'text') -> list[str]:
  """One JSON object per line (or a .json file holding one list of objects)."""
  docs = []
  with open(path, encoding='utf-8') as f:
    first = f.read(1)
    while first and first.isspace():
      first = f.read(1)
    f.seek(0)
    if first == '[':  # a whole-file JSON array
      try:
        rows = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{e.lineno}: bad JSON: {e.msg}') from e
      for i, row in enumerate(rows):
        text = _column(row, text_column, f'{path}: item {i}')
        if text.strip():
          docs.append(text)
      return docs
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: bad JSON line: {e.msg} '
                         f'(column {e.colno}): {line.strip()[:80]!r}') from e
      text = _column(row, text_column, f'{path}:{lineno}')
      if text.strip():
        docs.append(text)
  return docs


def _column(row, text_column: str, where: str) -> str:
  if not isinstance(row, dict):
    raise ValueError(f'{where}: expected a JSON object with key {text_column!r}, '
                     f'got {type(row).__name__}')
  if text_column not in row:
    raise KeyError(f'{where}: no column {text_column!r} (data.text_column); '
                   f'available columns: {sorted(row)}')
  text = row[text_column]
  if text is None:
    return ''
  if not isinstance(text, str):
    raise ValueError(f'{where}: column {text_column!r} is {type(text).__name__}, not text')
  return text


def read_csv(path: str, text_column: str = 'text', delimiter: str = ',') -> list[str]:
  """CSV (quoted, RFC 4180) or TSV (unquoted, GLUE-style) with a header row."""
  csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
  quoting = csv.QUOTE_NONE if delimiter == '\t' else csv.QUOTE_MINIMAL
  docs = []
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    try:
      header = next(reader)
    except StopIteration:
      raise ValueError(f'{path}: empty file (expected a header row)') from None
    if text_column not in header:
      raise KeyError(f'{path}:1: no column {text_column!r} (data.text_column); '
                     f'available columns: {header}')
    col = header.index(text_column)
    for row in reader:
      if not row:
        continue
      if len(row) <= col:
        raise ValueError(f'{path}:{reader.line_num}: row has {len(row)} fields, '
                         f'header has {len(header)} (column {text_column!r} missing)')
      if row[col].strip():
        docs.append(row[col])
  return docs


# ----------------------------------------------------------------------------- HF / TFDS

def read_hf(name: str, config: str | None, split: str, *, text_column: str = 'text',
            data_files=None) -> list[str]:
  """`datasets.load_dataset(name, config, split=split)`; local `data_files` work too."""
  if not name:
    raise ValueError('data.hf_name is empty')
  import datasets
  kwargs = {'split': split}
  if data_files:
    kwargs['data_files'] = data_files
  where = f'HF dataset {name!r}' + (f' ({config})' if config else '') + f' split {split!r}'
  try:
    ds = datasets.load_dataset(name, config, **kwargs)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{where}: {e}') from e
  if text_column not in ds.column_names:
    raise KeyError(f'{where}: no column {text_column!r} (data.text_column); '
                   f'available columns: {ds.column_names}')
  return [t for t in ds[text_column] if t and t.strip()]


def read_tfds(name: str, split: str, *, text_column: str = 'text',
              data_dir: str | None = None) -> list[str]:
  """`tfds.data_source(name, split=split)`: random-access array_record, no TensorFlow."""
  if not name:
    raise ValueError('data.tfds_name is empty')
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        f'data.tfds_name={name!r} needs tensorflow-datasets, which is an optional extra: '
        "pip install 'jaxft[tfds]' (tensorflow-datasets and array_record; TensorFlow "
        'itself is not needed)') from e
  kwargs = {'split': split}
  if data_dir:
    kwargs['data_dir'] = data_dir
  source = tfds.data_source(name, **kwargs)
  docs = []
  for i in range(len(source)):
    row = source[i]
    if text_column not in row:
      raise KeyError(f'TFDS {name!r} split {split!r} record {i}: no feature {text_column!r} '
                     f'(data.text_column); available: {sorted(row)}')
    text = row[text_column]
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    elif hasattr(text, 'item'):  # numpy scalar / 0-d array of bytes
      text = text.item()
      text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    if text.strip():
      docs.append(text)
  return docs
