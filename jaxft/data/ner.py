"""CoNLL-style token classification (NER) data: IOB1/IOB2 tags, CoNLL files or HF
`datasets`, sub-token label alignment (see `splits` for what every reader shares)."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from jaxft.data.splits import (IGNORE_INDEX, BadRows, TaskData, apply_balance, bad_bytes,
                               check_truncation, hf_column, hf_load, hf_split_name,
                               normalize_split, open_text, pad_id, split_file, too_long_rows,
                               wants_token_types)
from jaxft.files import InputError

@dataclasses.dataclass(frozen=True)
class NerData(TaskData):
  """The `data` section of CoNLL-style token classification; '' / () = unset."""
  train_file: str = 'train.txt'
  dev_file: str = 'valid.txt'
  test_file: str = 'test.txt'
  token_column: int = 0
  tag_column: int = -1
  tag_scheme: str = 'iob2'            # of the files: iob1 | iob2 (stored as IOB2)
  labels: tuple[str, ...] = ()        # tag list; () = 'O' + sorted B-/I- tags of train
  hf_tokens_column: str = 'tokens'
  hf_tags_column: str = 'ner_tags'

  def __post_init__(self):
    super().__post_init__()
    if self.tag_scheme not in ('iob1', 'iob2'):
      raise ValueError(f"data.tag_scheme must be 'iob1' or 'iob2', got {self.tag_scheme!r}")
    labels = self.labels.split(',') if isinstance(self.labels, str) else self.labels or ()
    object.__setattr__(self, 'labels', tuple(str(x).strip() for x in labels))


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


def looks_like_conll(path: str | os.PathLike, sample: int = 200) -> bool:
  """True when a file reads as CoNLL (`token ... tag` lines: at least two columns, the last an
  IOB tag) rather than one whitespace-tokenized sentence per line, whatever its name."""
  tagged = lines = 0
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      parts = line.split()
      if not parts or parts[0] == '-DOCSTART-':
        continue
      lines += 1
      tagged += len(parts) >= 2 and bool(_TAG_RE.match(parts[-1]))
      if lines >= sample:
        break
  return lines > 0 and tagged / lines >= 0.9


def read_conll(path: str | os.PathLike, *, token_column: int = 0, tag_column: int = -1,
               tag_scheme: str = 'iob2', labels: Sequence[str] | None = None,
               on_bad_row: str = 'error', require_tags: bool = True
               ) -> tuple[NerExamples, dict]:
  """Reads a CoNLL-2003 style file: one `token ... tag` line per word, blank-line
  separated sentences, `-DOCSTART-` lines ignored. Tags are validated under
  `tag_scheme` and returned as IOB2. A file with one column is read without tags
  (allowed unless `require_tags`). A line with bytes that are not UTF-8 makes its sentence
  a bad row (named by file, line and byte).
  """
  path = Path(path)
  tag_error([], tag_scheme)  # validates the scheme name
  bad = BadRows(on_bad_row)
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

  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        flush()
        continue
      if parts[0] == '-DOCSTART-':
        flush()
        n_docstart += 1
        continue
      why = bad_bytes(line)
      if why is not None and cur_bad is None:
        cur_bad = (lineno, 'bad_encoding', why)
      if ncols is None:
        ncols = len(parts)
        if ncols == 1 and require_tags:
          raise InputError(f'{path}:{lineno}: one column per line, but tags are required '
                           f'(expected `token ... tag`)')
        for key, col in (('token_column', token_column), ('tag_column', tag_column)):
          if ncols > 1 and not -ncols <= col < ncols:
            raise InputError(f'{path}:{lineno}: data.{key}={col} is out of range for '
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
  bad = BadRows(on_bad_row)
  tag_error([], tag_scheme)
  columns = dataset.column_names
  if tokens_column not in columns:
    raise InputError(f'{name}: data.hf_tokens_column={tokens_column!r} is not a column; '
                     f'columns are {columns}')
  has_tags = tags_column in columns
  if not has_tags and require_tags:
    raise InputError(f'{name}: data.hf_tags_column={tags_column!r} is not a column; '
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
  tok_col = hf_column(dataset, tokens_column)
  tag_col = hf_column(dataset, tags_column) if has_tags else None
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
          raise InputError(f'{name}: integer tags without ClassLabel names; set data.labels '
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

def _aligned_rows(examples: NerExamples, rows, ids_list, wid_list, tt_list, label_names,
                  max_len: int, pad: int) -> dict[str, np.ndarray]:
  """[len(rows), max_len] arrays of the kept sentences: ids, mask, (types), word ids and
  each word's label on its first sub-token (-100 elsewhere)."""
  m = len(rows)
  label_index = {t: i for i, t in enumerate(label_names)}
  input_ids = np.full((m, max_len), pad, np.int32)
  attention_mask = np.zeros((m, max_len), np.int32)
  word_ids = np.full((m, max_len), -1, np.int32)
  token_type_ids = np.zeros((m, max_len), np.int32) if tt_list is not None else None
  labeled = examples.tags is not None
  labels = np.full((m, max_len), IGNORE_INDEX, np.int32) if labeled else None
  for r, i in enumerate(rows):
    ids, wids = ids_list[i], wid_list[i]
    input_ids[r, :len(ids)] = ids
    attention_mask[r, :len(ids)] = 1
    if token_type_ids is not None:
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
  if token_type_ids is not None:
    arrays['token_type_ids'] = token_type_ids
  if labeled:
    arrays['labels'] = labels
  arrays['word_ids'] = word_ids
  return arrays


def encode_ner(examples: NerExamples, tokenizer, label_names: Sequence[str], *,
               max_len: int, truncation: str = 'truncate'
               ) -> tuple[dict[str, np.ndarray], dict]:
  """Sub-token alignment: each word's label on its first sub-token, -100 elsewhere.

  Returns arrays `input_ids`, `attention_mask`, (`token_type_ids`), `labels` [N, L]
  int32 (absent when unlabeled) and `word_ids` [N, L] int32 (word index of every
  sub-token, -1 for special and pad tokens), and stats (`keep`, `n_truncated`,
  `n_words_truncated`, `n_too_long_skipped`, `n_words_without_subtokens`).
  """
  check_truncation(truncation)
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError('token classification needs a fast tokenizer (word_ids())')
  min_len = tokenizer.num_special_tokens_to_add(pair=False) + 1
  if max_len < min_len:
    raise ValueError(f'data.max_len={max_len} leaves no room for text (need >= {min_len})')
  tt = wants_token_types(tokenizer)
  kw = dict(is_split_into_words=True, add_special_tokens=True, return_attention_mask=False,
            return_token_type_ids=tt)
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
  too_long, keep = too_long_rows([len(ids) for ids in ids_list], max_len, truncation,
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
  arrays = _aligned_rows(examples, rows, ids_list, wid_list, tt_list if tt else None,
                         label_names, max_len, pad_id(tokenizer))
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

def split_path(data: NerData, split: str) -> Path:
  """The file of `split` (data.<split>_file, under data.path when relative)."""
  defaults = {k: getattr(NerData, f'{k}_file') for k in ('train', 'dev', 'test')}
  return split_file(data, split, defaults)


def read_ner_split(data: NerData, split: str, labels, require_tags: bool):
  if data.source == 'hf':
    split_name = hf_split_name(data, split, None)
    ds, where = hf_load(data, split_name, 'conll2003', None)
    return read_ner_hf(ds, tokens_column=data.hf_tokens_column, tags_column=data.hf_tags_column,
                       tag_scheme=data.tag_scheme, labels=labels, on_bad_row=data.on_bad_row,
                       require_tags=require_tags, name=where)
  path = split_path(data, split)
  ex, stats = read_conll(path, token_column=int(data.token_column),
                         tag_column=int(data.tag_column), tag_scheme=data.tag_scheme,
                         labels=labels, on_bad_row=data.on_bad_row, require_tags=require_tags)
  return ex, stats, None


def load_ner_split(data: NerData, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """Reads and tokenizes one split of a CoNLL-style NER task.

  Returns (arrays, info): arrays as in `encode_ner` (+ token `weights` for the train
  split with data.class_balance='weights'); info has label_names, num_labels,
  tag_scheme, words and tags (IOB2, per kept sentence; tags None if unlabeled),
  num_words, sources, metric_names, main_metric ('f1'), has_labels and stats.
  """
  split = normalize_split(split)
  labels = list(data.labels) or None
  hf_names = None
  if labels is None:
    if data.source == 'hf':
      train_ex, _, hf_names = read_ner_split(data, 'train', None, True)
      labels = hf_names if hf_names is not None else derive_tag_labels(train_ex.tags)
    else:
      train_ex, _, _ = read_ner_split(data, 'train', None, True)
      labels = derive_tag_labels(train_ex.tags)
    logging.info('NER label list: %s', labels)
  ex, stats, _ = read_ner_split(data, split, labels, require_tags=not split.startswith('test'))
  arrays, enc_stats = encode_ner(ex, tokenizer, labels, max_len=int(data.max_len),
                                 truncation=data.truncation)
  keep = enc_stats.pop('keep')
  stats.update(enc_stats)
  stats['n_examples'] = int(len(keep))
  arrays = apply_balance(data, arrays, len(labels), split, stats)
  words = [ex.words[i] for i in keep]
  info = dict(split=split, label_names=list(labels), num_labels=len(labels),
              tag_scheme=data.tag_scheme, words=words,
              tags=None if ex.tags is None else [ex.tags[i] for i in keep],
              num_words=[len(w) for w in words], sources=[ex.sources[i] for i in keep],
              metric_names=['precision', 'recall', 'f1'], main_metric='f1',
              has_labels='labels' in arrays, n_examples=int(len(keep)), stats=stats)
  logging.info('ner/%s: %d sentences, stats %s', split, info['n_examples'],
               {k: v for k, v in stats.items() if k != 'class_weights'})
  return arrays, info
