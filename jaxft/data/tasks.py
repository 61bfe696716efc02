"""Downstream-task data: GLUE-style classification and CoNLL-style NER.

Readers turn local files (TSV/CSV/JSONL, CoNLL) or Hugging Face datasets into examples,
then encoders turn examples into fixed-length numpy arrays for `loader.make_loader`.
Bad input is never turned into a silently wrong label: every problem names file and
line (1-based, header included) and either raises `ValueError` or, with
`data.on_bad_row='skip'`, is skipped and counted in the returned stats.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

IGNORE_INDEX = -100  # label of positions the loss and metrics ignore (HF convention)
_MAX_LOGGED = 10  # skipped rows logged one by one before only counting
_REPO_ROOT = Path(__file__).resolve().parents[2]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # GLUE parse-tree columns are long


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

# Config keys read by `load_cls_task` / `load_ner_task` and their defaults. None means
# "from the GLUE preset, else the reader's own default" (see each key's use).
CLS_DATA_DEFAULTS = dict(
    task=None, source='files', path=None, train_file=None, dev_file=None, test_file=None,
    format='auto', text_column=None, text_pair_column=None, label_column=None, labels=None,
    is_regression=None, has_header=None, column_names=None, max_len=128,
    truncation='truncate', on_bad_row='error', class_balance='none', seed=0,
    hf_path='glue', hf_name=None, hf_data_files=None, hf_cache_dir=None, hf_kwargs=None)
NER_DATA_DEFAULTS = dict(
    source='files', path=None, train_file='train.txt', dev_file='valid.txt',
    test_file='test.txt', token_column=0, tag_column=-1, tag_scheme='iob2', labels=None,
    max_len=128, truncation='truncate', on_bad_row='error', class_balance='none', seed=0,
    hf_path='conll2003', hf_name=None, hf_data_files=None, hf_cache_dir=None, hf_kwargs=None,
    hf_tokens_column='tokens', hf_tags_column='ner_tags')

_SPLIT_ALIASES = {'validation': 'dev', 'valid': 'dev', 'eval': 'dev', 'val': 'dev',
                  'validation_matched': 'dev', 'validation_mismatched': 'dev_mismatched'}


def get_glue_task(name: str | None) -> GlueTask | None:
  if name is None:
    return None
  key = name.lower().replace('-', '')
  if key not in GLUE_TASKS:
    raise ValueError(f'data.task={name!r} is not a GLUE task; known: {sorted(GLUE_TASKS)}')
  return GLUE_TASKS[key]


def normalize_split(split: str) -> str:
  return _SPLIT_ALIASES.get(split, split)


# ----------------------------------------------------------------------------- bad rows

class _BadRows:
  """Applies `on_bad_row` ('error' | 'skip'): raise with location, or count and log."""

  def __init__(self, on_bad_row: str):
    if on_bad_row not in ('error', 'skip'):
      raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    self.skip = on_bad_row == 'skip'
    self.counts: collections.Counter = collections.Counter()

  def __call__(self, where: str, reason: str, message: str):
    msg = f'{where}: {message}'
    if not self.skip:
      raise ValueError(msg + " (set data.on_bad_row='skip' to skip and count such rows)")
    self.counts[reason] += 1
    total = sum(self.counts.values())
    if total <= _MAX_LOGGED:
      logging.warning('skipping bad input %s', msg)
    elif total == _MAX_LOGGED + 1:
      logging.warning('more bad input rows are skipped; see the stats for counts')

  def stats(self) -> dict:
    return {'n_skipped': int(sum(self.counts.values())), 'skipped': dict(self.counts)}


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


def _sort_labels(values: Iterable[str]) -> list[str]:
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
      raise ValueError(f'{where}: {key}={column} is out of range for {len(header)} columns')
    return int(column) % len(header)
  if column not in header:
    raise ValueError(f'{where}: {key}={column!r} is not a column; columns are {list(header)}')
  return list(header).index(column)


def _file_format(path: Path, fmt: str) -> str:
  if fmt != 'auto':
    if fmt not in ('tsv', 'csv', 'jsonl'):
      raise ValueError(f"data.format must be 'auto', 'tsv', 'csv' or 'jsonl', got {fmt!r}")
    return fmt
  suffix = path.suffix.lower()
  if suffix in ('.tsv', '.txt'):
    return 'tsv'
  if suffix == '.csv':
    return 'csv'
  if suffix in ('.jsonl', '.json', '.ndjson'):
    return 'jsonl'
  raise ValueError(f'{path}: cannot tell the format from the extension; set data.format')


def read_cls_file(path: str | os.PathLike, *, text_column: str | int,
                  text_pair_column: str | int | None = None,
                  label_column: str | int | None = None,
                  labels: Sequence[str] | None = None, is_regression: bool = False,
                  fmt: str = 'auto', has_header: bool = True,
                  column_names: Sequence[str] | None = None, on_bad_row: str = 'error',
                  require_labels: bool = True) -> tuple[ClsExamples, dict]:
  """Reads a TSV/CSV/JSONL classification file into examples and stats.

  `labels` (raw label strings) maps labels to class ids; without it labels stay raw
  strings (used to derive a label list). A missing label column yields `labels=None`
  unless `require_labels`. Headerless files take `column_names` or integer columns.
  """
  path = Path(path)
  fmt = _file_format(path, fmt)
  bad = _BadRows(on_bad_row)
  mapper = _LabelMapper(labels, is_regression)
  texts, pairs, ys, sources = [], [], [], []
  n_rows = n_blank = 0
  has_labels = label_column is not None

  def add(where, text, pair, raw_label):
    if text is None or not str(text).strip():
      return bad(where, 'empty_text', f'empty text in column {text_column!r}')
    if text_pair_column is not None and (pair is None or not str(pair).strip()):
      return bad(where, 'empty_text', f'empty text in column {text_pair_column!r}')
    y = None
    if has_labels:
      y, why = mapper(raw_label)
      if why is not None:
        return bad(where, 'bad_label', f'{why} (column {label_column!r})')
    texts.append(str(text).strip())
    pairs.append(None if text_pair_column is None else str(pair).strip())
    ys.append(y)
    sources.append(where)

  if fmt == 'jsonl':
    with open(path, encoding='utf-8-sig') as f:
      first = True
      for lineno, line in enumerate(f, 1):
        where = f'{path}:{lineno}'
        if not line.strip():
          n_blank += 1
          continue
        n_rows += 1
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          bad(where, 'bad_row', f'invalid JSON ({e.msg})')
          continue
        if not isinstance(row, dict):
          bad(where, 'bad_row', f'expected a JSON object, got {type(row).__name__}')
          continue
        if first and has_labels and label_column not in row and not require_labels:
          has_labels = False  # an unlabeled (test) file
          logging.info('%s: no %r key; reading without labels', path, label_column)
        first = False
        missing = [c for c in (text_column, text_pair_column,
                               label_column if has_labels else None)
                   if c is not None and c not in row]
        if missing:
          bad(where, 'bad_row', f'missing key(s) {missing}')
          continue
        add(where, row[text_column],
            None if text_pair_column is None else row[text_pair_column],
            row[label_column] if has_labels else None)
  else:
    kwargs = (dict(delimiter='\t', quoting=csv.QUOTE_NONE) if fmt == 'tsv' else
              dict(delimiter=','))
    with open(path, encoding='utf-8-sig', newline='') as f:
      reader = csv.reader(f, **kwargs)
      if column_names is not None:
        header = list(column_names)
      elif has_header:
        try:
          header = [h.strip() for h in next(reader)]
        except StopIteration:
          raise ValueError(f'{path}:1: empty file, expected a header row') from None
      else:
        header = None
      where0 = f'{path}:1' if header is not None and column_names is None else str(path)
      if header is None:  # integer columns only
        for key, col in (('text_column', text_column), ('label_column', label_column)):
          if col is not None and not isinstance(col, (int, np.integer)):
            raise ValueError(f'{path}: {key}={col!r} needs a header or data.column_names')
        ncols = None
      else:
        ncols = len(header)
      ti = pi = li = None
      if header is not None:
        ti = _column_index(header, text_column, where0, 'data.text_column')
        pi = _column_index(header, text_pair_column, where0, 'data.text_pair_column')
        if has_labels and label_column not in header and not isinstance(label_column, int):
          if require_labels:
            _column_index(header, label_column, where0, 'data.label_column')  # raises
          has_labels = False
          logging.info('%s: no %r column; reading without labels', path, label_column)
        li = _column_index(header, label_column, where0, 'data.label_column') \
            if has_labels else None
      else:
        ti, pi, li = text_column, text_pair_column, label_column
      for row in reader:
        where = f'{path}:{reader.line_num}'
        if not row or (len(row) == 1 and not row[0].strip() and ncols != 1):
          n_blank += 1
          continue
        n_rows += 1
        if ncols is None:
          ncols = len(row)  # headerless without names: the first row sets the width
          for key, col in (('text_column', ti), ('text_pair_column', pi),
                           ('label_column', li)):
            if col is not None and not -ncols <= col < ncols:
              raise ValueError(f'{where}: data.{key}={col} is out of range for '
                               f'{ncols} columns')
        if len(row) != ncols:
          bad(where, 'bad_columns', f'expected {ncols} columns, got {len(row)}'
              + (' (quote characters are literal in .tsv files)' if fmt == 'tsv' else ''))
          continue
        add(where, row[ti], None if pi is None else row[pi],
            row[li] if has_labels else None)
  stats = {'n_rows': n_rows, 'n_examples': len(texts), 'n_blank_lines': n_blank,
           **bad.stats()}
  if bad.counts:
    logging.warning('%s: skipped %d bad rows %s', path, stats['n_skipped'], dict(bad.counts))
  examples = ClsExamples(texts, pairs if text_pair_column is not None else None,
                         ys if has_labels else None, sources)
  return examples, stats


def _hf_column(dataset, column: str) -> list:
  """A column as a python list in one arrow conversion (per-row access is slow)."""
  return dataset[column][:]


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
  bad = _BadRows(on_bad_row)
  columns = dataset.column_names
  for key, col in (('data.text_column', text_column),
                   ('data.text_pair_column', text_pair_column)):
    if col is not None and col not in columns:
      raise ValueError(f'{name}: {key}={col!r} is not a column; columns are {columns}')
  has_labels = label_column is not None and label_column in columns
  if label_column is not None and not has_labels and require_labels:
    raise ValueError(f'{name}: data.label_column={label_column!r} is not a column; '
                     f'columns are {columns}')
  feature = dataset.features[label_column] if has_labels else None
  class_label = isinstance(feature, datasets.ClassLabel)
  label_names = list(feature.names) if class_label else None
  if class_label and labels is not None and [str(x) for x in labels] != label_names \
      and list(map(str, labels)) != [str(i) for i in range(len(label_names))]:
    logging.warning('%s: ClassLabel names %s differ from data.labels %s; using the '
                    'integer ids', name, label_names, list(labels))
  raw_labels = _hf_column(dataset, label_column) if has_labels else None
  if class_label and not require_labels and all(v == -1 for v in raw_labels):
    has_labels = False  # GLUE test splits: every label is -1
  mapper = _LabelMapper(labels, is_regression)
  text_col = _hf_column(dataset, text_column)
  pair_col = _hf_column(dataset, text_pair_column) if text_pair_column is not None else None
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

def _pad_id(tokenizer) -> int:
  """Pad with the tokenizer's pad token, else EOS (GPT-2); masked out either way."""
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  if tokenizer.eos_token_id is not None:
    return int(tokenizer.eos_token_id)
  raise ValueError('the tokenizer has neither a pad nor an eos token to pad with')


def _check_truncation(truncation: str):
  if truncation not in ('truncate', 'skip', 'error'):
    raise ValueError(f"data.truncation must be 'truncate', 'skip' or 'error', "
                     f"got {truncation!r}")


def _too_long(lengths, max_len: int, truncation: str, sources, length_text: str):
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


def _wants_token_types(tokenizer) -> bool:
  return 'token_type_ids' in getattr(tokenizer, 'model_input_names', ())


def encode_cls(examples: ClsExamples, tokenizer, *, max_len: int,
               truncation: str = 'truncate', is_regression: bool = False
               ) -> tuple[dict[str, np.ndarray], dict]:
  """Tokenizes examples into right-padded [N, max_len] arrays (+ labels [N]).

  Returns arrays `input_ids`, `attention_mask`, `token_type_ids` (tokenizers that use
  them, e.g. BERT), `labels` (class ids as int32, float32 for regression; absent when
  unlabeled), and stats (`n_truncated`, `n_too_long_skipped`, `keep` = kept indices).
  """
  _check_truncation(truncation)
  is_pair = examples.pairs is not None
  min_len = tokenizer.num_special_tokens_to_add(pair=is_pair) + (2 if is_pair else 1)
  if max_len < min_len:
    raise ValueError(f'data.max_len={max_len} leaves no room for text (need >= {min_len})')
  tt = _wants_token_types(tokenizer)
  kw = dict(add_special_tokens=True, return_attention_mask=False,
            return_token_type_ids=tt)
  n = len(examples)
  if n:
    enc = tokenizer(examples.texts, examples.pairs if is_pair else None,
                    truncation=False, **kw)
    ids_list, tt_list = list(enc['input_ids']), list(enc['token_type_ids']) if tt else None
  else:
    ids_list, tt_list = [], [] if tt else None
  too_long, keep = _too_long([len(ids) for ids in ids_list], max_len, truncation,
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
  input_ids = np.full((len(rows), max_len), _pad_id(tokenizer), np.int32)
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


# ---------------------------------------------------------------------- config helpers

class MissingSplitError(FileNotFoundError):
  """A split has no file / HF split: callers may treat dev and test as optional."""


def _cfg(cfg, key: str, default=None):
  """cfg.key or default when absent or None (works for ConfigDict, dict, None)."""
  if cfg is None:
    return default
  try:
    v = cfg.get(key, None)
  except (AttributeError, TypeError):
    v = getattr(cfg, key, None)
  return default if v is None else v


def _resolve_dir(path: str | os.PathLike) -> Path:
  """Relative paths: the working directory first, then the repository root."""
  p = Path(path).expanduser()
  if p.is_absolute() or p.exists() or not (_REPO_ROOT / p).exists():
    return p
  return _REPO_ROOT / p


def _split_file(cfg, split: str, default_files: Mapping[str, str],
                subdirs: Sequence[str] = ()) -> Path:
  """The file for `split`: data.<split>_file (absolute or under data.path) or preset."""
  name = _cfg(cfg, f'{split}_file', default_files.get(split))
  if name is None:
    raise MissingSplitError(f'no file for split {split!r}: set data.{split}_file')
  p = Path(name).expanduser()
  if p.is_absolute():
    return p
  root = _cfg(cfg, 'path')
  if root is None:
    if p.exists():
      return p
    raise MissingSplitError(f'{name} does not exist and data.path is not set (split '
                            f'{split!r})')
  root = _resolve_dir(root)
  for cand in [root / p] + [root / d / p for d in subdirs]:
    if cand.exists():
      return cand
  raise MissingSplitError(f'{root / p} does not exist (split {split!r}, data.path={root})')


def _hf_load(cfg, split_name: str, default_path: str, default_name: str | None):
  """A `datasets.Dataset` for one split: a save_to_disk folder or `load_dataset`."""
  import datasets
  path = _cfg(cfg, 'hf_path', default_path)
  # The GLUE task is the hub config name; local builders (csv, json) take none.
  is_default = path == default_path or str(path).endswith('/' + default_path)
  name = _cfg(cfg, 'hf_name', default_name if is_default else None)
  data_files = _cfg(cfg, 'hf_data_files')
  if data_files is not None and hasattr(data_files, 'to_dict'):
    data_files = data_files.to_dict()
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
    kwargs = _cfg(cfg, 'hf_kwargs', {})  # builder options, e.g. csv sep='\t', quoting=3
    kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
    ds = datasets.load_dataset(path, name, data_files=data_files, split=split_name,
                               cache_dir=_cfg(cfg, 'hf_cache_dir'), **kwargs)
    where = f'{path}' + (f'/{name}' if name else '') + f'[{split_name}]'
  return ds, where


def _hf_split_name(cfg, split: str, preset_splits: Mapping[str, str] | None) -> str:
  data_files = _cfg(cfg, 'hf_data_files')
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


def _apply_balance(cfg, arrays: dict, num_classes: int, split: str, stats: dict) -> dict:
  """data.class_balance on the train split: 'weights' adds `weights`, 'resample' resamples."""
  mode = _cfg(cfg, 'class_balance', 'none')
  if mode not in ('none', 'weights', 'resample'):
    raise ValueError(f"data.class_balance must be 'none', 'weights' or 'resample', "
                     f"got {mode!r}")
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
  idx = balanced_resample_indices(labels, seed=int(_cfg(cfg, 'seed', 0)))
  stats['resampled_from'] = int(len(labels))
  return {k: v[idx] for k, v in arrays.items()}


# ---------------------------------------------------------------- classification: entry

def _cls_settings(cfg):
  task = get_glue_task(_cfg(cfg, 'task'))
  source = _cfg(cfg, 'source', 'files')
  if source not in ('files', 'hf'):
    raise ValueError(f"data.source must be 'files' or 'hf', got {source!r}")
  hf = source == 'hf'
  if hf:
    text_d = task.hf_text_column if task else 'sentence'
    pair_d = task.hf_text_pair_column if task else None
    label_d = 'label'
  else:
    text_d = task.text_column if task else None
    pair_d = task.text_pair_column if task else None
    label_d = task.label_column if task else None
  s = dict(
      task=task, hf=hf,
      text_column=_cfg(cfg, 'text_column', text_d),
      text_pair_column=_cfg(cfg, 'text_pair_column', pair_d),
      label_column=_cfg(cfg, 'label_column', label_d),
      is_regression=bool(_cfg(cfg, 'is_regression', task.is_regression if task else False)),
      labels=_cfg(cfg, 'labels', (list(task.label_values) or None) if task else None),
      on_bad_row=_cfg(cfg, 'on_bad_row', 'error'))
  if s['text_column'] is None:
    raise ValueError('data.text_column is not set (and data.task is not a GLUE task)')
  if s['label_column'] is None:
    s['label_column'] = 'label'
  if s['labels'] is not None:
    s['labels'] = [str(x) for x in s['labels']]
  return s


def _read_cls_split(cfg, s: dict, split: str, labels, require_labels: bool):
  """(examples, stats, hf_label_names or None) for one split under settings `s`."""
  task = s['task']
  common = dict(text_column=s['text_column'], text_pair_column=s['text_pair_column'],
                label_column=s['label_column'], labels=labels,
                is_regression=s['is_regression'], on_bad_row=s['on_bad_row'],
                require_labels=require_labels)
  if s['hf']:
    split_name = _hf_split_name(cfg, split, task.hf_splits if task else None)
    ds, where = _hf_load(cfg, split_name, 'glue', task.name if task else None)
    return read_cls_hf(ds, name=where, **common)
  default_files = dict(task.files) if task else {}
  path = _split_file(cfg, split, default_files,
                     (task.dir_name, task.name) if task else ())
  column_names = _cfg(cfg, 'column_names')
  has_header = _cfg(cfg, 'has_header')
  if column_names is None and task and split in task.headerless and has_header is None:
    column_names = task.headerless[split]
  has_header = True if has_header is None else bool(has_header)
  ex, stats = read_cls_file(path, fmt=_cfg(cfg, 'format', 'auto'), has_header=has_header,
                            column_names=column_names, **common)
  stats['file'] = str(path)
  return ex, stats, None


def load_cls_task(data_cfg, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """Reads and tokenizes one split of a sentence(-pair) classification task.

  Returns (arrays, info): arrays as in `encode_cls` (+ `weights` for the train split
  with data.class_balance='weights'); info has task, label_names, label_values,
  num_labels (1 for regression), is_regression, metric_names, main_metric, has_labels,
  n_examples, sources ('file:line' per row) and stats.
  """
  split = normalize_split(split)
  s = _cls_settings(data_cfg)
  task = s['task']
  labels = s['labels']
  if labels is None and not s['is_regression']:
    # The label list must be the same for every split: derive it from train
    # (an HF ClassLabel column brings its own names and ids instead).
    train_ex, _, train_names = _read_cls_split(data_cfg, s, 'train', None, True)
    if train_names is None:
      labels = _sort_labels(train_ex.labels)
      logging.info('label set derived from the train split: %s', labels)
  ex, stats, hf_names = _read_cls_split(data_cfg, s, split, labels,
                                        require_labels=not split.startswith('test'))
  arrays, enc_stats = encode_cls(ex, tokenizer, max_len=int(_cfg(data_cfg, 'max_len', 128)),
                                 truncation=_cfg(data_cfg, 'truncation', 'truncate'),
                                 is_regression=s['is_regression'])
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
  arrays = _apply_balance(data_cfg, arrays, num_labels, split, stats)
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


# ------------------------------------------------------------------------ NER: tags

_TAG_RE = re.compile(r'^(O|[BI]-\S+)$')


def tag_error(tags: Sequence[str], scheme: str) -> tuple[int, str] | None:
  """(position, reason) of the first tag that is invalid under `scheme`, else None.

  iob2 (strict): I-X must follow B-X or I-X. iob1 (strict): B-X appears only right after
  a B-X/I-X chunk, to split adjacent same-type entities.
  """
  if scheme not in ('iob1', 'iob2'):
    raise ValueError(f"data.tag_scheme must be 'iob1' or 'iob2', got {scheme!r}")
  prev = 'O'
  for i, t in enumerate(tags):
    if not _TAG_RE.match(t):
      return i, f'tag {t!r} is not O, B-<type> or I-<type>'
    same = prev != 'O' and prev[2:] == t[2:]
    if scheme == 'iob2' and t.startswith('I-') and not same:
      return i, f'{t} after {prev} is invalid IOB2 (an entity must start with B-)'
    if scheme == 'iob1' and t.startswith('B-') and not same:
      return i, (f'{t} after {prev} is invalid IOB1 (B- only splits adjacent '
                 f'same-type entities; is the file IOB2? set data.tag_scheme)')
    prev = t
  return None


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
  """IOB1 -> IOB2: an I-X that starts an entity becomes B-X."""
  out, prev = [], 'O'
  for t in tags:
    if t.startswith('I-') and (prev == 'O' or prev[2:] != t[2:]):
      t = 'B-' + t[2:]
    out.append(t)
    prev = t
  return out


def derive_tag_labels(tag_seqs: Iterable[Sequence[str]]) -> list[str]:
  """'O' then sorted B-/I- tags; both B-X and I-X for every type X seen."""
  types = {t[2:] for seq in tag_seqs for t in seq if t != 'O'}
  return ['O'] + sorted([f'B-{x}' for x in types] + [f'I-{x}' for x in types])


@dataclasses.dataclass
class NerExamples:
  """Word-level sentences; `tags` are IOB2 strings (None when unlabeled)."""
  words: list[list[str]]
  tags: list[list[str]] | None
  sources: list[str]  # 'file:line' of each sentence's first token

  def __len__(self):
    return len(self.words)


def _check_sentence(tags, lines, scheme, label_set):
  """(problem, None) with problem = (line, reason, message), or (None, IOB2 tags)."""
  if tags is None:
    return None, None
  err = tag_error(tags, scheme)
  if err is not None:
    i, why = err
    return (lines[i], 'bad_tags', why), None
  conv = iob1_to_iob2(tags) if scheme == 'iob1' else list(tags)
  if label_set is not None:
    for i, t in enumerate(conv):
      if t not in label_set:
        return (lines[i], 'bad_label', f'tag {t!r} is not in the label set '
                f'{sorted(label_set)}'), None
  return None, conv


def read_conll(path: str | os.PathLike, *, token_column: int = 0, tag_column: int = -1,
               tag_scheme: str = 'iob2', labels: Sequence[str] | None = None,
               on_bad_row: str = 'error', require_tags: bool = True
               ) -> tuple[NerExamples, dict]:
  """Reads a CoNLL-2003 style file: one `token ... tag` line per word, blank-line
  separated sentences, `-DOCSTART-` lines ignored. Tags are validated under
  `tag_scheme` and returned as IOB2. A file with one column is read without tags
  (allowed unless `require_tags`).
  """
  path = Path(path)
  tag_error([], tag_scheme)  # validates the scheme name
  bad = _BadRows(on_bad_row)
  label_set = None if labels is None else set(labels)
  words_out, tags_out, sources = [], [], []
  ncols = None
  n_docstart = n_tokens = n_converted = n_sentences = 0
  cur_words, cur_tags, cur_lines, cur_bad = [], [], [], None

  def flush():
    nonlocal cur_words, cur_tags, cur_lines, cur_bad, n_converted, n_sentences
    if cur_words:
      n_sentences += 1
      problem, conv = cur_bad, None
      if problem is None:
        problem, conv = _check_sentence(cur_tags if ncols > 1 else None, cur_lines,
                                        tag_scheme, label_set)
      if problem is not None:
        line, reason, msg = problem
        bad(f'{path}:{line}', reason, msg + f' (sentence starting at line {cur_lines[0]})')
      else:
        words_out.append(cur_words)
        if conv is not None:
          n_converted += sum(a != b for a, b in zip(cur_tags, conv))
          tags_out.append(conv)
        sources.append(f'{path}:{cur_lines[0]}')
    cur_words, cur_tags, cur_lines, cur_bad = [], [], [], None

  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        flush()
        continue
      if parts[0] == '-DOCSTART-':
        flush()
        n_docstart += 1
        continue
      if ncols is None:
        ncols = len(parts)
        if ncols == 1 and require_tags:
          raise ValueError(f'{path}:{lineno}: one column per line, but tags are required '
                           f'(expected `token ... tag`)')
        for key, col in (('token_column', token_column), ('tag_column', tag_column)):
          if ncols > 1 and not -ncols <= col < ncols:
            raise ValueError(f'{path}:{lineno}: data.{key}={col} is out of range for '
                             f'{ncols} columns')
      n_tokens += 1
      cur_lines.append(lineno)
      if len(parts) != ncols:
        if cur_bad is None:
          cur_bad = (lineno, 'bad_columns', f'expected {ncols} columns, got {len(parts)}')
        cur_words.append(parts[0])
        cur_tags.append('O')
        continue
      cur_words.append(parts[token_column] if ncols > 1 else parts[0])
      cur_tags.append(parts[tag_column] if ncols > 1 else 'O')
    flush()
  stats = {'n_sentences': n_sentences, 'n_tokens': n_tokens, 'n_docstart': n_docstart,
           'n_examples': len(words_out), 'n_tags_converted': n_converted, 'file': str(path),
           **bad.stats()}
  if bad.counts:
    logging.warning('%s: skipped %d bad sentences %s', path, stats['n_skipped'],
                    dict(bad.counts))
  has_tags = ncols is not None and ncols > 1
  return NerExamples(words_out, tags_out if has_tags or ncols is None else None,
                     sources), stats


def read_ner_hf(dataset, *, tokens_column: str = 'tokens', tags_column: str = 'ner_tags',
                tag_names: Sequence[str] | None = None, tag_scheme: str = 'iob2',
                labels: Sequence[str] | None = None, on_bad_row: str = 'error',
                require_tags: bool = True, name: str = 'hf'
                ) -> tuple[NerExamples, dict, list[str] | None]:
  """Reads a `datasets.Dataset` of word lists and integer (ClassLabel) or string tags.

  Integer tags are named by the feature's ClassLabel names (or `tag_names`); returns
  (examples, stats, feature tag names or None).
  """
  import datasets
  bad = _BadRows(on_bad_row)
  tag_error([], tag_scheme)
  columns = dataset.column_names
  if tokens_column not in columns:
    raise ValueError(f'{name}: data.hf_tokens_column={tokens_column!r} is not a column; '
                     f'columns are {columns}')
  has_tags = tags_column in columns
  if not has_tags and require_tags:
    raise ValueError(f'{name}: data.hf_tags_column={tags_column!r} is not a column; '
                     f'columns are {columns}')
  feat_names = None
  if has_tags:
    feat = dataset.features[tags_column]
    inner = getattr(feat, 'feature', None)
    if inner is None and isinstance(feat, list) and feat:
      inner = feat[0]
    if isinstance(inner, datasets.ClassLabel):
      feat_names = list(inner.names)
  names = list(tag_names) if tag_names is not None else feat_names
  label_set = None if labels is None else set(labels)
  words_out, tags_out, sources = [], [], []
  n_converted = 0
  tok_col = _hf_column(dataset, tokens_column)
  tag_col = _hf_column(dataset, tags_column) if has_tags else None
  for i, words in enumerate(tok_col):
    where = f'{name}[row {i}]'
    words = [str(w) for w in words]
    if not words:
      bad(where, 'empty_text', 'empty sentence')
      continue
    tags = None
    if has_tags:
      raw = list(tag_col[i])
      if len(raw) != len(words):
        bad(where, 'bad_columns', f'{len(words)} tokens but {len(raw)} tags')
        continue
      if raw and isinstance(raw[0], (int, np.integer)):
        if names is None:
          raise ValueError(f'{name}: integer tags without ClassLabel names; set data.labels '
                           'to the tag names in id order')
        if any(not 0 <= t < len(names) for t in raw):
          bad(where, 'bad_label', f'tag id outside 0..{len(names) - 1}: {raw}')
          continue
        raw = [names[t] for t in raw]
      err = tag_error(raw, tag_scheme)
      if err is not None:
        bad(where, 'bad_tags', f'token {err[0]}: {err[1]}')
        continue
      tags = iob1_to_iob2(raw) if tag_scheme == 'iob1' else raw
      n_converted += sum(a != b for a, b in zip(raw, tags))
      if label_set is not None and any(t not in label_set for t in tags):
        bad(where, 'bad_label', f'tags {sorted(set(tags) - label_set)} are not in the '
            f'label set {sorted(label_set)}')
        continue
    words_out.append(words)
    if tags is not None:
      tags_out.append(tags)
    sources.append(where)
  stats = {'n_sentences': len(tok_col), 'n_examples': len(words_out),
           'n_tags_converted': n_converted, **bad.stats()}
  return NerExamples(words_out, tags_out if has_tags else None, sources), stats, feat_names


# ------------------------------------------------------------------------ NER: encode

def encode_ner(examples: NerExamples, tokenizer, label_names: Sequence[str], *,
               max_len: int, truncation: str = 'truncate'
               ) -> tuple[dict[str, np.ndarray], dict]:
  """Sub-token alignment: each word's label on its first sub-token, -100 elsewhere.

  Returns arrays `input_ids`, `attention_mask`, (`token_type_ids`), `labels` [N, L]
  int32 (absent when unlabeled) and `word_ids` [N, L] int32 (word index of every
  sub-token, -1 for special and pad tokens), and stats (`keep`, `n_truncated`,
  `n_words_truncated`, `n_too_long_skipped`, `n_words_without_subtokens`).
  """
  _check_truncation(truncation)
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError('token classification needs a fast tokenizer (word_ids())')
  min_len = tokenizer.num_special_tokens_to_add(pair=False) + 1
  if max_len < min_len:
    raise ValueError(f'data.max_len={max_len} leaves no room for text (need >= {min_len})')
  tt = _wants_token_types(tokenizer)
  kw = dict(is_split_into_words=True, add_special_tokens=True, return_attention_mask=False,
            return_token_type_ids=tt)
  label_index = {t: i for i, t in enumerate(label_names)}
  n = len(examples)

  def tokenize(words_list, **extra):
    try:
      return tokenizer(words_list, **kw, **extra)
    except (ValueError, AssertionError) as e:
      if 'add_prefix_space' in str(e):
        raise ValueError('this tokenizer needs add_prefix_space=True for pre-split words '
                         '(e.g. GPT2TokenizerFast.from_pretrained(..., '
                         'add_prefix_space=True))') from e
      raise

  ids_list, wid_list, tt_list = [], [], []
  if n:
    enc = tokenize(examples.words, truncation=False)
    for i in range(n):
      ids_list.append(enc['input_ids'][i])
      wid_list.append(enc.word_ids(i))
      if tt:
        tt_list.append(enc['token_type_ids'][i])
  no_sub = sum(len(examples.words[i]) - len({w for w in wid_list[i] if w is not None})
               for i in range(n))
  if no_sub:
    logging.warning('%d words produce no sub-tokens (their prediction defaults to O)',
                    no_sub)
  too_long, keep = _too_long([len(ids) for ids in ids_list], max_len, truncation,
                             examples.sources, 'sentence has {} sub-tokens')
  n_words_cut = 0
  if too_long and truncation == 'truncate':
    enc2 = tokenize([examples.words[i] for i in too_long], truncation=True,
                    max_length=max_len)
    for j, i in enumerate(too_long):
      before = {w for w in wid_list[i] if w is not None}
      ids_list[i] = enc2['input_ids'][j]
      wid_list[i] = enc2.word_ids(j)
      if tt:
        tt_list[i] = enc2['token_type_ids'][j]
      n_words_cut += len(before - {w for w in wid_list[i] if w is not None})
  rows = np.flatnonzero(keep)
  m = len(rows)
  input_ids = np.full((m, max_len), _pad_id(tokenizer), np.int32)
  attention_mask = np.zeros((m, max_len), np.int32)
  word_ids = np.full((m, max_len), -1, np.int32)
  token_type_ids = np.zeros((m, max_len), np.int32) if tt else None
  labeled = examples.tags is not None
  labels = np.full((m, max_len), IGNORE_INDEX, np.int32) if labeled else None
  for r, i in enumerate(rows):
    ids, wids = ids_list[i], wid_list[i]
    input_ids[r, :len(ids)] = ids
    attention_mask[r, :len(ids)] = 1
    if tt:
      token_type_ids[r, :len(ids)] = tt_list[i]
    prev = None
    for j, w in enumerate(wids):
      if w is None:
        prev = None
        continue
      word_ids[r, j] = w
      if labeled and w != prev:
        tag = examples.tags[i][w]
        if tag not in label_index:
          raise ValueError(f'{examples.sources[i]}: tag {tag!r} (word {w}) is not in the '
                           f'label list {list(label_names)}')
        labels[r, j] = label_index[tag]
      prev = w
  arrays = {'input_ids': input_ids, 'attention_mask': attention_mask}
  if tt:
    arrays['token_type_ids'] = token_type_ids
  if labeled:
    arrays['labels'] = labels
  arrays['word_ids'] = word_ids
  stats = {'keep': rows, 'n_truncated': len(too_long) if truncation == 'truncate' else 0,
           'n_words_truncated': n_words_cut,
           'n_too_long_skipped': len(too_long) if truncation == 'skip' else 0,
           'n_words_without_subtokens': int(no_sub)}
  return arrays, stats


def predictions_to_tags(predictions: np.ndarray, word_ids: np.ndarray,
                        label_names: Sequence[str], num_words: Sequence[int],
                        default: str = 'O') -> list[list[str]]:
  """Maps sub-token predictions ([N, L] ids or [N, L, C] logits) back to word tags.

  A word takes the prediction at its first sub-token; words without one (truncated,
  or no sub-tokens) get `default`, so sequences match the gold words for seqeval.
  """
  pred = np.asarray(predictions)
  if pred.ndim == 3:
    pred = pred.argmax(-1)
  word_ids = np.asarray(word_ids)
  if pred.shape != word_ids.shape or len(num_words) != len(pred):
    raise ValueError(f'shapes differ: predictions {pred.shape}, word_ids {word_ids.shape}, '
                     f'{len(num_words)} sentences')
  out = []
  for i, nw in enumerate(num_words):
    tags = [default] * int(nw)
    seen = set()
    for j in np.flatnonzero(word_ids[i] >= 0):
      w = int(word_ids[i, j])
      if w not in seen and w < nw:
        seen.add(w)
        tags[w] = label_names[int(pred[i, j])]
    out.append(tags)
  return out


# --------------------------------------------------------------------------- NER: entry

def _read_ner_split(cfg, split: str, labels, require_tags: bool):
  scheme = _cfg(cfg, 'tag_scheme', 'iob2')
  on_bad = _cfg(cfg, 'on_bad_row', 'error')
  source = _cfg(cfg, 'source', 'files')
  if source == 'hf':
    split_name = _hf_split_name(cfg, split, None)
    ds, where = _hf_load(cfg, split_name, 'conll2003', None)
    return read_ner_hf(ds, tokens_column=_cfg(cfg, 'hf_tokens_column', 'tokens'),
                       tags_column=_cfg(cfg, 'hf_tags_column', 'ner_tags'),
                       tag_scheme=scheme, labels=labels, on_bad_row=on_bad,
                       require_tags=require_tags, name=where)
  if source != 'files':
    raise ValueError(f"data.source must be 'files' or 'hf', got {source!r}")
  defaults = {k: NER_DATA_DEFAULTS[f'{k}_file'] for k in ('train', 'dev', 'test')}
  path = _split_file(cfg, split, defaults)
  ex, stats = read_conll(path, token_column=int(_cfg(cfg, 'token_column', 0)),
                         tag_column=int(_cfg(cfg, 'tag_column', -1)), tag_scheme=scheme,
                         labels=labels, on_bad_row=on_bad, require_tags=require_tags)
  return ex, stats, None


def load_ner_task(data_cfg, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """Reads and tokenizes one split of a CoNLL-style NER task.

  Returns (arrays, info): arrays as in `encode_ner` (+ token `weights` for the train
  split with data.class_balance='weights'); info has label_names, num_labels,
  tag_scheme, words and tags (IOB2, per kept sentence; tags None if unlabeled),
  num_words, sources, metric_names, main_metric ('f1'), has_labels and stats.
  """
  split = normalize_split(split)
  labels = _cfg(data_cfg, 'labels')
  labels = None if labels is None else [str(x) for x in labels]
  hf_names = None
  if labels is None:
    if _cfg(data_cfg, 'source', 'files') == 'hf':
      train_ex, _, hf_names = _read_ner_split(data_cfg, 'train', None, True)
      labels = hf_names if hf_names is not None else derive_tag_labels(train_ex.tags)
    else:
      train_ex, _, _ = _read_ner_split(data_cfg, 'train', None, True)
      labels = derive_tag_labels(train_ex.tags)
    logging.info('NER label list: %s', labels)
  ex, stats, _ = _read_ner_split(data_cfg, split, labels,
                                 require_tags=not split.startswith('test'))
  arrays, enc_stats = encode_ner(ex, tokenizer, labels,
                                 max_len=int(_cfg(data_cfg, 'max_len', 128)),
                                 truncation=_cfg(data_cfg, 'truncation', 'truncate'))
  keep = enc_stats.pop('keep')
  stats.update(enc_stats)
  stats['n_examples'] = int(len(keep))
  arrays = _apply_balance(data_cfg, arrays, len(labels), split, stats)
  words = [ex.words[i] for i in keep]
  info = dict(split=split, label_names=list(labels), num_labels=len(labels),
              tag_scheme=_cfg(data_cfg, 'tag_scheme', 'iob2'), words=words,
              tags=None if ex.tags is None else [ex.tags[i] for i in keep],
              num_words=[len(w) for w in words], sources=[ex.sources[i] for i in keep],
              metric_names=['precision', 'recall', 'f1'], main_metric='f1',
              has_labels='labels' in arrays, n_examples=int(len(keep)), stats=stats)
  logging.info('ner/%s: %d sentences, stats %s', split, info['n_examples'],
               {k: v for k, v in stats.items() if k != 'class_weights'})
  return arrays, info
