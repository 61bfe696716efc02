"""Sentence(-pair) classification and regression data: GLUE presets, TSV/CSV/JSONL files or
HF `datasets`, label mapping, tokenization into fixed-length arrays (see `splits` for what
every reader shares)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

from jaxft.data.splits import (BadRows, TaskData, apply_balance, bad_bytes, check_truncation,
                               hf_column, hf_load, hf_split_name, no_rows_message,
                               normalize_split, open_text, pad_id, split_file, too_long_rows,
                               wants_token_types)
from jaxft.files import InputError

# ----------------------------------------------------------------------------- presets

@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: where its columns are in the TSV distribution and on the HF hub."""
  name: str
  dir_name: str  # folder in the GLUE distribution (glue_data/<dir_name>/)
  text_column: str
  text_pair_column: str | None
  label_column: str | None
  label_values: tuple[str, ...]  # raw label strings in the TSVs; () for regression
  label_names: tuple[str, ...]  # readable names (HF ClassLabel names), same order
  metrics: tuple[str, ...]
  main_metric: str
  files: Mapping[str, str]  # split -> file name
  hf_text_column: str
  hf_text_pair_column: str | None
  hf_splits: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: {'train': 'train', 'dev': 'validation', 'test': 'test'})
  headerless: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  @property
  def is_regression(self) -> bool:
    return not self.label_values


_FILES = {'train': 'train.tsv', 'dev': 'dev.tsv', 'test': 'test.tsv'}
_COLA_COLUMNS = ('source', 'label', 'label_notes', 'sentence')

GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask('cola', 'CoLA', 'sentence', None, 'label', ('0', '1'),
             ('unacceptable', 'acceptable'), ('matthews',), 'matthews', _FILES,
             'sentence', None,
             # train/dev have no header; test.tsv has `index\tsentence`.
             headerless={'train': _COLA_COLUMNS, 'dev': _COLA_COLUMNS}),
    GlueTask('sst2', 'SST-2', 'sentence', None, 'label', ('0', '1'),
             ('negative', 'positive'), ('accuracy',), 'accuracy', _FILES, 'sentence', None),
    GlueTask('mrpc', 'MRPC', '#1 String', '#2 String', 'Quality', ('0', '1'),
             ('not_equivalent', 'equivalent'), ('accuracy', 'f1'), 'f1', _FILES,
             'sentence1', 'sentence2'),
    GlueTask('qqp', 'QQP', 'question1', 'question2', 'is_duplicate', ('0', '1'),
             ('not_duplicate', 'duplicate'), ('accuracy', 'f1'), 'f1', _FILES,
             'question1', 'question2'),
    GlueTask('stsb', 'STS-B', 'sentence1', 'sentence2', 'score', (), (),
             ('pearson', 'spearman'), 'spearman', _FILES, 'sentence1', 'sentence2'),
    GlueTask('mnli', 'MNLI', 'sentence1', 'sentence2', 'gold_label',
             ('entailment', 'neutral', 'contradiction'),
             ('entailment', 'neutral', 'contradiction'), ('accuracy',), 'accuracy',
             {'train': 'train.tsv', 'dev': 'dev_matched.tsv', 'test': 'test_matched.tsv',
              'dev_mismatched': 'dev_mismatched.tsv',
              'test_mismatched': 'test_mismatched.tsv'},
             'premise', 'hypothesis',
             hf_splits={'train': 'train', 'dev': 'validation_matched',
                        'test': 'test_matched', 'dev_mismatched': 'validation_mismatched',
                        'test_mismatched': 'test_mismatched'}),
    GlueTask('qnli', 'QNLI', 'question', 'sentence', 'label',
             ('entailment', 'not_entailment'), ('entailment', 'not_entailment'),
             ('accuracy',), 'accuracy', _FILES, 'question', 'sentence'),
    GlueTask('rte', 'RTE', 'sentence1', 'sentence2', 'label',
             ('entailment', 'not_entailment'), ('entailment', 'not_entailment'),
             ('accuracy',), 'accuracy', _FILES, 'sentence1', 'sentence2'),
    GlueTask('wnli', 'WNLI', 'sentence1', 'sentence2', 'label', ('0', '1'),
             ('not_entailment', 'entailment'), ('accuracy',), 'accuracy', _FILES,
             'sentence1', 'sentence2'),
]}

@dataclasses.dataclass(frozen=True)
class ClsData(TaskData):
  """The `data` section of sentence(-pair) classification / regression. With a GLUE `task`
  the columns, labels, files and metrics come from its preset; '' / () = unset."""
  task: str = ''                  # a GLUE task name (presets), '' for a custom task
  format: str = 'auto'            # auto (by extension) | tsv | csv | jsonl | parquet
  text_column: str = ''
  text_pair_column: str = ''
  label_column: str = ''          # default 'label'
  labels: tuple[str, ...] = ()    # raw label values in class order; () = sorted from train
  is_regression: bool = False
  has_header: bool = True
  column_names: tuple[str, ...] = ()  # names of a headerless file's columns

  def __post_init__(self):
    super().__post_init__()
    get_glue_task(self.task)
    labels = self.labels.split(',') if isinstance(self.labels, str) else self.labels or ()
    object.__setattr__(self, 'labels', tuple(str(x).strip() for x in labels))
    object.__setattr__(self, 'column_names', tuple(self.column_names or ()))


def get_glue_task(name: str | None) -> GlueTask | None:
  if not name:
    return None
  key = name.lower().replace('-', '')
  if key not in GLUE_TASKS:
    raise ValueError(f'data.task={name!r} is not a GLUE task; known: {sorted(GLUE_TASKS)}')
  return GLUE_TASKS[key]


# ------------------------------------------------------------------ classification: read

@dataclasses.dataclass
class ClsExamples:
  """Parallel lists of classification examples; `sources` are 'file:line' strings."""
  texts: list[str]
  pairs: list[str] | None
  labels: list[Any] | None  # class ids (int), floats (regression), or raw strings
  sources: list[str]

  def __len__(self):
    return len(self.texts)


def sort_labels(values: Iterable[str]) -> list[str]:
  values = sorted(set(values))
  try:
    return sorted(values, key=float)  # '0','1','10' numerically
  except ValueError:
    return values


def _label_to_str(v: Any) -> str:
  if isinstance(v, bool):
    return str(int(v))
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  return '' if v is None else str(v).strip()


class _LabelMapper:
  """Raw label -> class id / float, or None (with a reason) when it is not valid."""

  def __init__(self, labels: Sequence[str] | None, is_regression: bool):
    self.is_regression = is_regression
    self.labels = None if labels is None else [str(x) for x in labels]
    self.index = None if labels is None else {v: i for i, v in enumerate(self.labels)}

  def __call__(self, raw: Any) -> tuple[Any, str | None]:
    s = _label_to_str(raw)
    if self.is_regression:
      try:
        y = float(s)
      except ValueError:
        return None, f'regression label {s!r} is not a number'
      if not np.isfinite(y):
        return None, f'regression label {s!r} is not finite'
      return y, None
    if self.index is None:  # collecting raw labels (label list not known yet)
      return (s, None) if s else (None, 'empty label')
    if s not in self.index:
      return None, f'label {s!r} is not in the label set {self.labels}'
    return self.index[s], None


def _column_index(header: Sequence[str], column: str | int | None, where: str,
                  key: str) -> int | None:
  if column is None:
    return None
  if isinstance(column, (int, np.integer)):
    if not -len(header) <= column < len(header):
      raise InputError(f'{where}: {key}={column} is out of range for {len(header)} columns')
    return int(column) % len(header)
  if column not in header:
    raise InputError(f'{where}: {key}={column!r} is not a column; columns are {list(header)}')
  return list(header).index(column)


_FORMATS = ('tsv', 'csv', 'jsonl', 'parquet')


def _file_format(path: Path, fmt: str) -> str:
  if fmt != 'auto':
    if fmt not in _FORMATS:
      raise ValueError(f"data.format must be 'auto', 'tsv', 'csv', 'jsonl' or 'parquet', "
                       f"got {fmt!r}")
    return fmt
  suffix = path.suffix.lower()
  if suffix in ('.tsv', '.txt'):
    return 'tsv'
  if suffix == '.csv':
    return 'csv'
  if suffix in ('.jsonl', '.json', '.ndjson'):
    return 'jsonl'
  if suffix in ('.parquet', '.pq'):
    return 'parquet'
  raise InputError(f'{path}: cannot tell the format from the extension; set data.format')


class _Collector:
  """Rows -> examples: empty texts and bad labels go to the bad-row policy."""

  def __init__(self, text_column, text_pair_column, label_column, mapper, bad: BadRows):
    self.text_column, self.text_pair_column = text_column, text_pair_column
    self.label_column, self.mapper, self.bad = label_column, mapper, bad
    self.texts, self.pairs, self.ys, self.sources = [], [], [], []
    self.n_rows = self.n_blank = 0

  def add(self, where, text, pair, raw_label, has_labels: bool):
    if text is None or not str(text).strip():
      return self.bad(where, 'empty_text', f'empty text in column {self.text_column!r}')
    if self.text_pair_column is not None and (pair is None or not str(pair).strip()):
      return self.bad(where, 'empty_text', f'empty text in column {self.text_pair_column!r}')
    y = None
    if has_labels:
      y, why = self.mapper(raw_label)
      if why is not None:
        return self.bad(where, 'bad_label', f'{why} (column {self.label_column!r})')
    self.texts.append(str(text).strip())
    self.pairs.append(None if self.text_pair_column is None else str(pair).strip())
    self.ys.append(y)
    self.sources.append(where)

  def add_record(self, where, row: Mapping, has_labels: bool):
    """A row as {column: value} (JSONL, Parquet): missing keys are a bad row."""
    missing = [c for c in (self.text_column, self.text_pair_column,
                           self.label_column if has_labels else None)
               if c is not None and c not in row]
    if missing:
      return self.bad(where, 'bad_row', f'missing key(s) {missing}')
    self.add(where, row[self.text_column],
             None if self.text_pair_column is None else row[self.text_pair_column],
             row[self.label_column] if has_labels else None, has_labels)


def read_cls_file(path: str | os.PathLike, *, text_column: str | int,
                  text_pair_column: str | int | None = None,
                  label_column: str | int | None = None,
                  labels: Sequence[str] | None = None, is_regression: bool = False,
                  fmt: str = 'auto', has_header: bool = True,
                  column_names: Sequence[str] | None = None, on_bad_row: str = 'error',
                  require_labels: bool = True) -> tuple[ClsExamples, dict]:
  """Reads a TSV/CSV/JSONL/Parquet classification file into examples and stats.

  `labels` (raw label strings) maps labels to class ids; without it labels stay raw
  strings (used to derive a label list). A missing label column yields `labels=None`
  unless `require_labels`. Headerless files take `column_names` or integer columns.
  Rows are named 'file:line' (1-based, header included), Parquet rows 'file[row i]'
  (0-based, as in pandas and `datasets`). Bytes that are not UTF-8 make a bad row.
  """
  path = Path(path)
  fmt = _file_format(path, fmt)
  bad = BadRows(on_bad_row)
  c = _Collector(text_column, text_pair_column, label_column,
                 _LabelMapper(labels, is_regression), bad)
  has_labels = label_column is not None
  if fmt == 'jsonl':
    has_labels = _read_jsonl(path, c, has_labels, require_labels)
  elif fmt == 'parquet':
    has_labels = _read_parquet(path, c, has_labels, require_labels)
  else:
    has_labels = _read_delimited(path, fmt, c, has_labels, require_labels, has_header,
                                 column_names)
  stats = {'n_rows': c.n_rows, 'n_examples': len(c.texts), 'n_blank_lines': c.n_blank,
           **bad.stats()}
  if bad.counts:
    logging.warning('%s: skipped %d bad rows %s', path, stats['n_skipped'], dict(bad.counts))
  if require_labels and not c.texts:  # a split to train or evaluate on: never silently none
    raise InputError(no_rows_message(path, bad))
  examples = ClsExamples(c.texts, c.pairs if text_pair_column is not None else None,
                         c.ys if has_labels else None, c.sources)
  return examples, stats


def _read_jsonl(path: Path, c: _Collector, has_labels: bool, require_labels: bool) -> bool:
  """One JSON object per line into `c`; returns whether the file has labels."""
  first = True
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      where = f'{path}:{lineno}'
      if not line.strip():
        c.n_blank += 1
        continue
      c.n_rows += 1
      why = bad_bytes(line)
      if why is not None:
        c.bad(where, 'bad_encoding', why)
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        c.bad(where, 'bad_row', f'invalid JSON ({e.msg})')
        continue
      if not isinstance(row, dict):
        c.bad(where, 'bad_row', f'expected a JSON object, got {type(row).__name__}')
        continue
      if first and has_labels and c.label_column not in row and not require_labels:
        has_labels = False  # an unlabeled (test) file
        logging.info('%s: no %r key; reading without labels', path, c.label_column)
      first = False
      c.add_record(where, row, has_labels)
  return has_labels


def _read_parquet(path: Path, c: _Collector, has_labels: bool, require_labels: bool) -> bool:
  """A Parquet file (pyarrow) into `c`: columns checked against the schema, rows named
  'file[row i]'; returns whether the file has labels."""
  import pyarrow.parquet as pq
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001  (pyarrow raises ArrowInvalid and friends)
    raise InputError(f'{path}: not a readable Parquet file ({type(e).__name__}: {e})') from e
  columns = pf.schema_arrow.names
  for key, col in (('data.text_column', c.text_column),
                   ('data.text_pair_column', c.text_pair_column)):
    if col is not None and col not in columns:
      raise InputError(f'{path}: {key}={col!r} is not a column; columns are {columns}')
  if has_labels and c.label_column not in columns:
    if require_labels:
      raise InputError(f'{path}: data.label_column={c.label_column!r} is not a column; '
                       f'columns are {columns}')
    has_labels = False
    logging.info('%s: no %r column; reading without labels', path, c.label_column)
  wanted = [col for col in (c.text_column, c.text_pair_column,
                            c.label_column if has_labels else None) if col is not None]
  table = pf.read(columns=list(dict.fromkeys(wanted)))
  values = {col: table.column(col).to_pylist() for col in table.column_names}
  for i in range(table.num_rows):
    c.n_rows += 1
    c.add_record(f'{path}[row {i}]', {col: v[i] for col, v in values.items()}, has_labels)
  return has_labels


def _read_delimited(path: Path, fmt: str, c: _Collector, has_labels: bool,
                    require_labels: bool, has_header: bool, column_names) -> bool:
  """A TSV (no quoting) or CSV file into `c`; returns whether the file has labels."""
  kwargs = (dict(delimiter='\t', quoting=csv.QUOTE_NONE) if fmt == 'tsv' else
            dict(delimiter=','))
  with open_text(path, newline='') as f:
    reader = csv.reader(f, **kwargs)
    header = list(column_names) if column_names is not None else (
        _read_header(path, reader) if has_header else None)
    ncols, (ti, pi, li), has_labels = _columns(path, header, column_names is None, c,
                                               has_labels, require_labels)
    for row in reader:
      where = f'{path}:{reader.line_num}'
      if not row or (len(row) == 1 and not row[0].strip() and ncols != 1):
        c.n_blank += 1
        continue
      c.n_rows += 1
      if ncols is None:
        ncols = len(row)  # headerless without names: the first row sets the width
        for key, col in (('text_column', ti), ('text_pair_column', pi), ('label_column', li)):
          if col is not None and not -ncols <= col < ncols:
            raise InputError(f'{where}: data.{key}={col} is out of range for {ncols} columns')
      why = next((w for w in map(bad_bytes, row) if w is not None), None)
      if why is not None:
        c.bad(where, 'bad_encoding', why)
        continue
      if len(row) != ncols:
        c.bad(where, 'bad_columns', f'expected {ncols} columns, got {len(row)}'
              + (' (quote characters are literal in .tsv files)' if fmt == 'tsv' else ''))
        continue
      c.add(where, row[ti], None if pi is None else row[pi],
            row[li] if has_labels else None, has_labels)
  return has_labels


def _read_header(path: Path, reader) -> list[str]:
  try:
    header = [h.strip() for h in next(reader)]
  except StopIteration:
    raise InputError(f'{path}:1: empty file, expected a header row') from None
  why = next((w for w in map(bad_bytes, header) if w is not None), None)
  if why is not None:
    raise InputError(f'{path}:1: {why}')  # a header is not a row that can be skipped
  return header


def _columns(path: Path, header, from_file: bool, c: _Collector, has_labels: bool,
             require_labels: bool):
  """(ncols or None, (text, pair, label) column indices, has_labels) of a delimited file."""
  where0 = f'{path}:1' if header is not None and from_file else str(path)
  if header is None:  # integer columns only
    for key, col in (('text_column', c.text_column), ('label_column', c.label_column)):
      if col is not None and not isinstance(col, (int, np.integer)):
        raise InputError(f'{path}: {key}={col!r} needs a header or data.column_names')
    return None, (c.text_column, c.text_pair_column, c.label_column), has_labels
  ti = _column_index(header, c.text_column, where0, 'data.text_column')
  pi = _column_index(header, c.text_pair_column, where0, 'data.text_pair_column')
  if has_labels and c.label_column not in header and not isinstance(c.label_column, int):
    if require_labels:
      _column_index(header, c.label_column, where0, 'data.label_column')  # raises
    has_labels = False
    logging.info('%s: no %r column; reading without labels', path, c.label_column)
  li = _column_index(header, c.label_column, where0, 'data.label_column') if has_labels \
      else None
  return len(header), (ti, pi, li), has_labels


def read_cls_hf(dataset, *, text_column: str, text_pair_column: str | None = None,
                label_column: str | None = 'label', labels: Sequence[str] | None = None,
                is_regression: bool = False, on_bad_row: str = 'error',
                require_labels: bool = True, name: str = 'hf'
                ) -> tuple[ClsExamples, dict, list[str] | None]:
  """Reads a `datasets.Dataset`; returns (examples, stats, ClassLabel names or None).

  A `ClassLabel` label column keeps its integer ids (its names become the label names;
  -1 marks an unlabeled test row); other label columns are matched as strings against
  `labels`, like file labels. Rows are named '<name>[row i]' (0-based) in errors.
  """
  import datasets  # heavy; only this path needs it
  bad = BadRows(on_bad_row)
  columns = dataset.column_names
  for key, col in (('data.text_column', text_column),
                   ('data.text_pair_column', text_pair_column)):
    if col is not None and col not in columns:
      raise InputError(f'{name}: {key}={col!r} is not a column; columns are {columns}')
  has_labels = label_column is not None and label_column in columns
  if label_column is not None and not has_labels and require_labels:
    raise InputError(f'{name}: data.label_column={label_column!r} is not a column; '
                     f'columns are {columns}')
  feature = dataset.features[label_column] if has_labels else None
  class_label = isinstance(feature, datasets.ClassLabel)
  label_names = list(feature.names) if class_label else None
  if class_label and labels is not None and [str(x) for x in labels] != label_names \
      and list(map(str, labels)) != [str(i) for i in range(len(label_names))]:
    logging.warning('%s: ClassLabel names %s differ from data.labels %s; using the '
                    'integer ids', name, label_names, list(labels))
  raw_labels = hf_column(dataset, label_column) if has_labels else None
  if class_label and not require_labels and all(v == -1 for v in raw_labels):
    has_labels = False  # GLUE test splits: every label is -1
  mapper = _LabelMapper(labels, is_regression)
  text_col = hf_column(dataset, text_column)
  pair_col = hf_column(dataset, text_pair_column) if text_pair_column is not None else None
  texts, pairs, ys, sources = [], [], [], []
  for i, text in enumerate(text_col):
    where = f'{name}[row {i}]'
    pair = pair_col[i] if pair_col is not None else None
    if text is None or not str(text).strip():
      bad(where, 'empty_text', f'empty text in column {text_column!r}')
      continue
    if pair_col is not None and (pair is None or not str(pair).strip()):
      bad(where, 'empty_text', f'empty text in column {text_pair_column!r}')
      continue
    y = None
    if has_labels:
      raw = raw_labels[i]
      if class_label:
        if raw is None or not 0 <= raw < len(label_names):
          bad(where, 'bad_label', f'label id {raw} is outside 0..{len(label_names) - 1}')
          continue
        y = int(raw)
      else:
        y, why = mapper(raw)
        if why is not None:
          bad(where, 'bad_label', f'{why} (column {label_column!r})')
          continue
    texts.append(str(text).strip())
    pairs.append(None if pair_col is None else str(pair).strip())
    ys.append(y)
    sources.append(where)
  stats = {'n_rows': len(text_col), 'n_examples': len(texts), **bad.stats()}
  examples = ClsExamples(texts, pairs if pair_col is not None else None,
                         ys if has_labels else None, sources)
  return examples, stats, label_names


# ---------------------------------------------------------------- classification: encode
def encode_cls(examples: ClsExamples, tokenizer, *, max_len: int,
               truncation: str = 'truncate', is_regression: bool = False
               ) -> tuple[dict[str, np.ndarray], dict]:
  """Tokenizes examples into right-padded [N, max_len] arrays (+ labels [N]).

  Returns arrays `input_ids`, `attention_mask`, `token_type_ids` (tokenizers that use
  them, e.g. BERT), `labels` (class ids as int32, float32 for regression; absent when
  unlabeled), and stats (`n_truncated`, `n_too_long_skipped`, `keep` = kept indices).
  """
  check_truncation(truncation)
  is_pair = examples.pairs is not None
  min_len = tokenizer.num_special_tokens_to_add(pair=is_pair) + (2 if is_pair else 1)
  if max_len < min_len:
    raise ValueError(f'data.max_len={max_len} leaves no room for text (need >= {min_len})')
  tt = wants_token_types(tokenizer)
  kw = dict(add_special_tokens=True, return_attention_mask=False,
            return_token_type_ids=tt)
  n = len(examples)
  if n:
    enc = tokenizer(examples.texts, examples.pairs if is_pair else None,
                    truncation=False, **kw)
    ids_list, tt_list = list(enc['input_ids']), list(enc['token_type_ids']) if tt else None
  else:
    ids_list, tt_list = [], [] if tt else None
  too_long, keep = too_long_rows([len(ids) for ids in ids_list], max_len, truncation,
                             examples.sources, '{} tokens')
  if too_long and truncation == 'truncate':
    enc2 = tokenizer([examples.texts[i] for i in too_long],
                     [examples.pairs[i] for i in too_long] if is_pair else None,
                     truncation=True, max_length=max_len, **kw)
    for j, i in enumerate(too_long):
      ids_list[i] = enc2['input_ids'][j]
      if tt:
        tt_list[i] = enc2['token_type_ids'][j]
  rows = np.flatnonzero(keep)
  input_ids = np.full((len(rows), max_len), pad_id(tokenizer), np.int32)
  attention_mask = np.zeros((len(rows), max_len), np.int32)
  token_type_ids = np.zeros((len(rows), max_len), np.int32) if tt else None
  for r, i in enumerate(rows):
    ids = ids_list[i]
    input_ids[r, :len(ids)] = ids
    attention_mask[r, :len(ids)] = 1
    if tt:
      token_type_ids[r, :len(ids)] = tt_list[i]
  arrays = {'input_ids': input_ids, 'attention_mask': attention_mask}
  if tt:
    arrays['token_type_ids'] = token_type_ids
  if examples.labels is not None:
    ys = [examples.labels[i] for i in rows]
    arrays['labels'] = np.asarray(ys, np.float32 if is_regression else np.int32).reshape(-1)
  stats = {'n_truncated': len(too_long) if truncation == 'truncate' else 0,
           'n_too_long_skipped': len(too_long) if truncation == 'skip' else 0,
           'keep': rows}
  return arrays, stats


# ---------------------------------------------------------------- classification: entry

def cls_settings(data: ClsData) -> dict:
  """Columns, labels and format of a task: the data section over its GLUE preset."""
  task = get_glue_task(data.task)
  hf = data.source == 'hf'
  if hf:
    text_d = task.hf_text_column if task else 'sentence'
    pair_d = task.hf_text_pair_column if task else None
    label_d = 'label'
  else:
    text_d = task.text_column if task else None
    pair_d = task.text_pair_column if task else None
    label_d = task.label_column if task else None
  preset_labels = (list(task.label_values) or None) if task else None
  s = dict(
      task=task, hf=hf,
      text_column=data.text_column or text_d,
      text_pair_column=data.text_pair_column or pair_d,
      label_column=data.label_column or label_d or 'label',
      is_regression=bool(data.is_regression or (task.is_regression if task else False)),
      labels=list(data.labels) or preset_labels,
      on_bad_row=data.on_bad_row)
  if s['text_column'] is None:
    raise ValueError('data.text_column is not set (and data.task is not a GLUE task)')
  return s


def split_path(data: ClsData, split: str, task=None) -> Path:
  """The file of `split` (data.<split>_file under data.path, or the GLUE preset's)."""
  task = task or cls_settings(data)['task']
  default_files = dict(task.files) if task else {}
  return split_file(data, split, default_files, (task.dir_name, task.name) if task else ())


def read_cls_split(data: ClsData, s: dict, split: str, labels, require_labels: bool):
  """(examples, stats, hf_label_names or None) for one split under settings `s`."""
  task = s['task']
  common = dict(text_column=s['text_column'], text_pair_column=s['text_pair_column'],
                label_column=s['label_column'], labels=labels,
                is_regression=s['is_regression'], on_bad_row=s['on_bad_row'],
                require_labels=require_labels)
  if s['hf']:
    split_name = hf_split_name(data, split, task.hf_splits if task else None)
    ds, where = hf_load(data, split_name, 'glue', task.name if task else None)
    return read_cls_hf(ds, name=where, **common)
  path = split_path(data, split, task)
  column_names = data.column_names or None
  if column_names is None and task and split in task.headerless and data.has_header:
    column_names = task.headerless[split]
  ex, stats = read_cls_file(path, fmt=data.format, has_header=data.has_header,
                            column_names=column_names, **common)
  stats['file'] = str(path)
  return ex, stats, None


def load_cls_split(data: ClsData, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """Reads and tokenizes one split of a sentence(-pair) classification task.

  Returns (arrays, info): arrays as in `encode_cls` (+ `weights` for the train split
  with data.class_balance='weights'); info has task, label_names, label_values,
  num_labels (1 for regression), is_regression, metric_names, main_metric, has_labels,
  n_examples, sources ('file:line' per row) and stats.
  """
  split = normalize_split(split)
  s = cls_settings(data)
  task = s['task']
  labels = s['labels']
  if labels is None and not s['is_regression']:
    # The label list must be the same for every split: derive it from train
    # (an HF ClassLabel column brings its own names and ids instead).
    train_ex, _, train_names = read_cls_split(data, s, 'train', None, True)
    if train_names is None:
      labels = sort_labels(train_ex.labels)
      logging.info('label set derived from the train split: %s', labels)
  ex, stats, hf_names = read_cls_split(data, s, split, labels,
                                       require_labels=not split.startswith('test'))
  arrays, enc_stats = encode_cls(ex, tokenizer, max_len=int(data.max_len),
                                 truncation=data.truncation, is_regression=s['is_regression'])
  keep = enc_stats.pop('keep')
  stats.update(enc_stats)
  stats['n_examples'] = int(len(keep))
  if s['is_regression']:
    label_values, label_names = [], []
  elif hf_names is not None:
    label_values, label_names = list(hf_names), list(hf_names)
  else:
    label_values = list(labels)
    label_names = (list(task.label_names) if task and labels == list(task.label_values)
                   else list(labels))
  num_labels = 1 if s['is_regression'] else len(label_values)
  arrays = apply_balance(data, arrays, num_labels, split, stats)
  if 'labels' in arrays and not s['is_regression'] and arrays['labels'].size:
    stats['label_counts'] = np.bincount(arrays['labels'], minlength=num_labels).tolist()
  if task:
    metric_names, main = list(task.metrics), task.main_metric
  elif s['is_regression']:
    metric_names, main = ['pearson', 'spearman'], 'pearson'
  elif num_labels == 2:
    metric_names, main = ['accuracy', 'f1'], 'accuracy'
  else:
    metric_names, main = ['accuracy', 'f1_macro'], 'accuracy'
  info = dict(task=task.name if task else None, split=split, label_names=label_names,
              label_values=label_values, num_labels=num_labels,
              is_regression=s['is_regression'], metric_names=metric_names,
              main_metric=main, has_labels='labels' in arrays,
              n_examples=int(len(keep)), sources=[ex.sources[i] for i in keep],
              texts=[ex.texts[i] for i in keep],
              pairs=[ex.pairs[i] for i in keep] if ex.pairs is not None else None,
              stats=stats)
  logging.info('%s/%s: %d examples, stats %s', info['task'] or 'cls', split,
               info['n_examples'], {k: v for k, v in stats.items() if k != 'class_weights'})
  return arrays, info

