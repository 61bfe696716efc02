"""What every downstream-data reader shares: where a split's file is, HF `datasets` loading,
the bad-row policy, truncation, padding and class balance.

Bad input is never turned into a silently wrong label: every problem names file and line
(1-based, header included) and either raises `InputError` (jaxft.files) or, with
`data.on_bad_row='skip'`, is skipped and counted in the returned stats.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from jaxft.files import InputError, MissingInput

IGNORE_INDEX = -100  # label of positions the loss and metrics ignore (HF convention)
_MAX_LOGGED = 10  # skipped rows logged one by one before only counting
_REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = _REPO_ROOT / 'data'  # jaxft's data directory: the bundled data, GLUE presets

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # GLUE parse-tree columns are long

_SPLIT_ALIASES = {'validation': 'dev', 'valid': 'dev', 'eval': 'dev', 'val': 'dev',
                  'validation_matched': 'dev', 'validation_mismatched': 'dev_mismatched'}

def normalize_split(split: str) -> str:
  return _SPLIT_ALIASES.get(split, split)


# ----------------------------------------------------------------------------- bad rows

SKIP_HINT = "set data.on_bad_row='skip' to skip and count such rows"


class BadRows:
  """Applies `on_bad_row` ('error' | 'skip'): raise with location (and `hint`: what the
  user can do, for a stage that reads no data.on_bad_row another one), or count and log."""

  def __init__(self, on_bad_row: str, hint: str = SKIP_HINT):
    if on_bad_row not in ('error', 'skip'):
      raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    self.skip = on_bad_row == 'skip'
    self.hint = hint
    self.counts: collections.Counter = collections.Counter()

  def __call__(self, where: str, reason: str, message: str):
    msg = f'{where}: {message}'
    if not self.skip:
      raise InputError(f'{msg} ({self.hint})')
    self.counts[reason] += 1
    total = sum(self.counts.values())
    if total <= _MAX_LOGGED:
      logging.warning('skipping bad input %s', msg)
    elif total == _MAX_LOGGED + 1:
      logging.warning('more bad input rows are skipped; see the stats for counts')

  def stats(self) -> dict:
    return {'n_skipped': int(sum(self.counts.values())), 'skipped': dict(self.counts)}


def no_rows_message(path, bad: BadRows) -> str:
  """What to say about a file that gave no rows (a header alone, or every row skipped)."""
  skipped = sum(bad.counts.values())
  return f'{path}: no rows' + (f' ({skipped} bad rows skipped: {dict(bad.counts)})' if skipped
                               else ' (the file holds a header at most)')


# ---------------------------------------------------------------------- text files

_UNDECODABLE = re.compile('[\udc80-\udcff]')


def open_text(path, newline: str | None = None):
  """A UTF-8 text file (a BOM is dropped) whose undecodable bytes are kept as lone
  surrogates (Python's surrogateescape) instead of stopping the read with a bare
  UnicodeDecodeError: `bad_bytes` then names each one, and the row can be skipped."""
  return open(path, encoding='utf-8-sig', errors='surrogateescape', newline=newline)


def bad_bytes(text: str) -> str | None:
  """'invalid UTF-8 byte 0xe9 at character 4 (...)' for the first byte of `text` that was
  not UTF-8 (read through `open_text`), else None."""
  m = _UNDECODABLE.search(text)
  if m is None:
    return None
  return (f'invalid UTF-8 byte 0x{ord(m.group()) - 0xdc00:02x} at character {m.start() + 1} '
          f'(the file is not UTF-8: convert it, e.g. iconv -f latin1 -t utf-8)')


def read_text_lines(path, on_bad_row: str = 'error') -> tuple[list[tuple[str, str]], dict]:
  """([('file:line', text)] of the non-blank lines of a plain text file, stats); lines with
  bytes that are not UTF-8 raise naming file, line and byte, or are skipped and counted."""
  bad = BadRows(on_bad_row)
  rows = []
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      text = line.rstrip('\n')
      why = bad_bytes(text)
      if why is not None:
        bad(f'{path}:{lineno}', 'bad_encoding', why)
      elif text.strip():
        rows.append((f'{path}:{lineno}', text))
  return rows, bad.stats()


# ----------------------------------------------------------------------------- encoding

def pad_id(tokenizer) -> int:
  """Pad with the tokenizer's pad token, else EOS (GPT-2); masked out either way."""
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  if tokenizer.eos_token_id is not None:
    return int(tokenizer.eos_token_id)
  raise ValueError('the tokenizer has neither a pad nor an eos token to pad with')


def check_truncation(truncation: str):
  if truncation not in ('truncate', 'skip', 'error'):
    raise ValueError(f"data.truncation must be 'truncate', 'skip' or 'error', "
                     f"got {truncation!r}")


def too_long_rows(lengths, max_len: int, truncation: str, sources, length_text: str):
  """(indices longer than max_len, keep mask) under data.truncation; 'error' raises naming
  the first offending row. The caller re-tokenizes the indices when truncating."""
  too_long = [i for i, n_tok in enumerate(lengths) if n_tok > max_len]
  keep = np.ones(len(lengths), bool)
  if too_long:
    if truncation == 'error':
      i = too_long[0]
      raise ValueError(f'{sources[i]}: {length_text.format(lengths[i])} > data.max_len={max_len} '
                       f"({len(too_long)} such rows; set data.truncation='truncate' or 'skip')")
    if truncation == 'skip':
      keep[too_long] = False
    logging.info('%d of %d rows are longer than max_len=%d: %s', len(too_long), len(lengths),
                 max_len, 'truncated' if truncation == 'truncate' else 'skipped')
  return too_long, keep


def wants_token_types(tokenizer) -> bool:
  return 'token_type_ids' in getattr(tokenizer, 'model_input_names', ())


# ---------------------------------------------------------------------- config helpers

class MissingSplitError(MissingInput):
  """A split has no file / HF split: callers may treat dev and test as optional."""


@dataclasses.dataclass(frozen=True)
class TaskData:
  """The `data` config keys every downstream task shares; '' (or ()) means unset.

  Files: data.<split>_file, absolute or under data.path (or the preset's name).
  HF datasets (source='hf'): hf_path (a hub name, a local builder like csv, or a
  save_to_disk folder), hf_name, hf_data_files (a path/glob for train, or a mapping /
  'split=path,split=path' per split), hf_kwargs (builder options, e.g. csv sep)."""
  source: str = 'files'        # files | hf
  path: str = ''
  train_file: str = ''
  dev_file: str = ''
  test_file: str = ''
  tokenizer: str = ''          # used when init_from brings none
  max_len: int = 128
  truncation: str = 'truncate'  # truncate | skip | error
  on_bad_row: str = 'error'     # error | skip
  class_balance: str = 'none'   # none | weights | resample (train split)
  seed: int = 0                 # of the class_balance resampling
  hf_path: str = ''
  hf_name: str = ''
  hf_data_files: Any = ''
  hf_cache_dir: str = ''
  hf_kwargs: Any = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.source not in ('files', 'hf'):
      raise ValueError(f"data.source must be 'files' or 'hf', got {self.source!r}")
    check_truncation(self.truncation)
    if self.on_bad_row not in ('error', 'skip'):
      raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
    if self.class_balance not in ('none', 'weights', 'resample'):
      raise ValueError(f"data.class_balance must be 'none', 'weights' or 'resample', "
                       f"got {self.class_balance!r}")

  @property
  def data_files(self):
    """hf_data_files as `datasets` takes it: None, a path (train), a list, or {split: paths}."""
    return _data_files(self.hf_data_files)

  @property
  def builder_kwargs(self) -> dict:
    kwargs = self.hf_kwargs
    return dict(kwargs.to_dict() if hasattr(kwargs, 'to_dict') else kwargs or {})


def _data_files(value):
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, str):
    if not value:
      return None
    if '=' in value:
      pairs = [p.split('=', 1) for p in value.split(',') if p.strip()]
      return {k.strip(): v.strip() for k, v in pairs}
  return value or None


def resolve_dir(path: str | os.PathLike) -> Path:
  """Relative paths: the working directory first, then the repository root."""
  p = Path(path).expanduser()
  if p.is_absolute() or p.exists() or not (_REPO_ROOT / p).exists():
    return p
  return _REPO_ROOT / p


def split_file(data: TaskData, split: str, default_files: Mapping[str, str],
               subdirs: Sequence[str] = ()) -> Path:
  """The file for `split`: data.<split>_file (absolute or under data.path) or preset."""
  name = getattr(data, f'{split}_file', '') or default_files.get(split)
  if not name:
    raise MissingSplitError(f'no file for split {split!r}: set data.{split}_file')
  p = Path(name).expanduser()
  if p.is_absolute():
    return p
  root = data.path
  if not root:
    if p.exists():
      return p
    raise MissingSplitError(f'{name} does not exist and data.path is not set (split '
                            f'{split!r})')
  root = resolve_dir(root)
  for cand in [root / p] + [root / d / p for d in subdirs]:
    if cand.exists():
      return cand
  raise MissingSplitError(f'{root / p} does not exist (split {split!r}, data.path={root})')


def hf_load(data: TaskData, split_name: str, default_path: str, default_name: str | None):
  """A `datasets.Dataset` for one split: a save_to_disk folder or `load_dataset`."""
  import datasets
  path = data.hf_path or default_path
  # The GLUE task is the hub config name; local builders (csv, json) take none.
  is_default = path == default_path or str(path).endswith('/' + default_path)
  name = data.hf_name or (default_name if is_default else None)
  data_files = data.data_files
  local = Path(str(path)).expanduser()
  if local.is_dir() and ((local / 'dataset_dict.json').exists() or
                         (local / 'state.json').exists()):
    ds = datasets.load_from_disk(str(local))
    if isinstance(ds, datasets.DatasetDict):
      if split_name not in ds:
        raise MissingSplitError(f'{local}: no split {split_name!r}; splits are {list(ds)}')
      ds = ds[split_name]
    where = f'{local}[{split_name}]'
  else:
    if isinstance(data_files, Mapping) and split_name not in data_files:
      raise MissingSplitError(f'data.hf_data_files has no split {split_name!r}; it has '
                              f'{list(data_files)}')
    if data_files is not None and not isinstance(data_files, Mapping) and \
        split_name != 'train':
      raise MissingSplitError(f'data.hf_data_files without split names is the train '
                              f'split only; asked for {split_name!r}')
    ds = datasets.load_dataset(path, name, data_files=data_files, split=split_name,
                               cache_dir=data.hf_cache_dir or None, **data.builder_kwargs)
    where = f'{path}' + (f'/{name}' if name else '') + f'[{split_name}]'
  return ds, where


def hf_split_name(data: TaskData, split: str, preset_splits: Mapping[str, str] | None) -> str:
  data_files = data.data_files
  if data_files is not None and hasattr(data_files, 'keys'):
    keys = list(data_files.keys())
    for cand in (split, {'dev': 'validation'}.get(split, split)):
      if cand in keys:
        return cand
  splits = preset_splits or {'train': 'train', 'dev': 'validation', 'test': 'test'}
  return splits.get(split, split)


# -------------------------------------------------------------------- class balancing

def class_weights(labels: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
                  ) -> np.ndarray:
  """Per-class weights n / (k * count_c), like sklearn's compute_class_weight('balanced').

  k counts only classes present in `labels` (sklearn with classes=np.unique(y)); absent
  classes get weight 0. Labels equal to `ignore_index` are not counted.
  """
  y = np.asarray(labels).reshape(-1)
  y = y[y != ignore_index].astype(np.int64)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'labels outside 0..{num_classes - 1}')
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  present = counts > 0
  w = np.zeros(num_classes, np.float64)
  w[present] = y.size / (present.sum() * counts[present])
  return w.astype(np.float32)


def balanced_resample_indices(labels: np.ndarray, *, seed: int = 0,
                              num_samples: int | None = None) -> np.ndarray:
  """Row indices drawn (with replacement) so every present class is equally frequent.

  Deterministic in `seed`; `num_samples` defaults to len(labels). The result is shuffled.
  """
  y = np.asarray(labels).reshape(-1)
  num_samples = len(y) if num_samples is None else int(num_samples)
  classes = np.unique(y)
  if not len(classes):
    return np.zeros(0, np.int64)
  rng = np.random.default_rng(seed)
  base, extra = divmod(num_samples, len(classes))
  parts = []
  for j, c in enumerate(classes):
    members = np.flatnonzero(y == c)
    parts.append(rng.choice(members, size=base + (j < extra), replace=True))
  idx = np.concatenate(parts)
  return idx[rng.permutation(len(idx))]


def apply_balance(data: TaskData, arrays: dict, num_classes: int, split: str,
                  stats: dict) -> dict:
  """data.class_balance on the train split: 'weights' adds `weights`, 'resample' resamples."""
  mode = data.class_balance
  if mode == 'none' or split != 'train' or 'labels' not in arrays:
    return arrays
  labels = arrays['labels']
  if mode == 'weights':
    cw = class_weights(labels, num_classes)
    stats['class_weights'] = cw.tolist()
    w = np.where(labels == IGNORE_INDEX, 0.0, cw[np.where(labels == IGNORE_INDEX, 0, labels)])
    return {**arrays, 'weights': w.astype(np.float32)}
  if labels.ndim != 1:
    raise ValueError("data.class_balance='resample' needs one label per example")
  idx = balanced_resample_indices(labels, seed=int(data.seed))
  stats['resampled_from'] = int(len(labels))
  return {k: v[idx] for k, v in arrays.items()}

def hf_column(dataset, column: str) -> list:
  """A column as a python list in one arrow conversion (per-row access is slow)."""
  return dataset[column][:]
