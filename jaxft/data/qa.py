"""Extractive question answering data (SQuAD): readers, question + context windows with
their start/end labels, n-best post-processing of start/end logits back to answer text, and
the official SQuAD EM / F1 (see `splits` for what every downstream reader shares).

Inputs: SQuAD v1.1 JSON (`data[].title`, `paragraphs[].context`, `qas[].id`, `question`,
`answers[].text`, `answer_start`), JSON lines or CSV with columns `id, question, context,
answers` (+ optional `title`; `answers` as HF `squad` holds it, `{"text": [...],
"answer_start": [...]}`, or a list of `{"text", "answer_start"}`; JSON text in CSV), and HF
`datasets` with that flat schema (`data.source='hf'`, `data.hf_path='squad'`, a json/csv
builder with `data.hf_data_files`, or a save_to_disk folder).

Bad rows (an answer not at its answer_start, an empty question or context, a duplicate id,
bytes that are not UTF-8) raise `InputError` naming file (and line) and question id, or are
skipped and counted with data.on_bad_row='skip'. Unanswerable questions (empty answers) are an
error naming data.version_2_with_negative unless it is set; then they are kept, labelled
[CLS], and the null-score rule of `best_answers` may answer ''.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from absl import logging

from jaxft.data.splits import (BadRows, TaskData, bad_bytes, hf_column,
                               hf_load, hf_split_name, no_rows_message, normalize_split,
                               open_text, split_file, wants_token_types)
from jaxft.files import InputError

_FORMATS = ('auto', 'squad', 'jsonl', 'csv')
V2_HINT = 'set data.version_2_with_negative=True to keep unanswerable questions'


@dataclasses.dataclass(frozen=True)
class QaData(TaskData):
  """The `data` section of extractive question answering; '' = unset.

  dev_holdout_articles > 0 makes the dev split the held-out articles (SQuAD `title`) of the
  train file, drawn with `seed`, and the train split the rest: never split by question, so
  no paragraph sits on both sides. It excludes a dev_file."""
  max_len: int = 384                  # tokens per window: question + context + specials
  doc_stride: int = 128               # tokens shared by consecutive windows of one context
  max_query_len: int = 64             # question tokens kept (cut at a word boundary)
  max_answer_len: int = 30            # longest predicted answer, in tokens
  n_best: int = 20                    # start and end candidates per window
  dev_holdout_articles: float = 0.0   # articles held out of train as dev: a count or a fraction
  version_2_with_negative: bool = False  # keep unanswerable questions (label: [CLS])
  null_score_diff_threshold: float = 0.0  # v2: answer '' if null score - best span > this
  format: str = 'auto'                # auto (extension, content) | squad | jsonl | csv

  def __post_init__(self):
    super().__post_init__()
    if self.class_balance != 'none':
      raise ValueError("data.class_balance does not apply to question answering; use 'none'")
    if self.truncation != 'truncate':
      raise ValueError('data.truncation does not apply to question answering: every context '
                       'is read whole in windows (data.doc_stride) and questions are cut to '
                       "data.max_query_len tokens; leave it 'truncate'")
    for key in ('max_len', 'doc_stride', 'max_query_len', 'max_answer_len', 'n_best'):
      if int(getattr(self, key)) < 1:
        raise ValueError(f'data.{key} must be >= 1, got {getattr(self, key)}')
    if self.max_query_len + self.doc_stride + 4 > self.max_len:
      raise ValueError(f'data.max_query_len={self.max_query_len} + data.doc_stride='
                       f'{self.doc_stride} leave no new context tokens per window of '
                       f'data.max_len={self.max_len}: lower them or raise max_len')
    h = float(self.dev_holdout_articles)
    if h < 0 or (h >= 1 and h != int(h)):
      raise ValueError(f'data.dev_holdout_articles must be a count (>= 1), a fraction in '
                       f'(0, 1) or 0 (off), got {self.dev_holdout_articles}')
    if h and self.dev_file:
      raise ValueError('data.dev_holdout_articles and data.dev_file are both set: the dev split '
                       'is either held-out articles of train or a file, not both')
    if not math.isfinite(float(self.null_score_diff_threshold)):
      raise ValueError('data.null_score_diff_threshold must be finite')
    if self.format not in _FORMATS:
      raise ValueError(f'data.format must be one of {_FORMATS}, got {self.format!r}')


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass
class QaExamples:
  """Parallel lists of questions. `answer_texts[i]` / `answer_starts[i]` (character offsets
  into `contexts[i]`) are the references, [] for an unanswerable question; both are None for
  an unlabeled file. `sources` name file and question id."""
  ids: list[str]
  titles: list[str]
  questions: list[str]
  contexts: list[str]
  answer_texts: list[list[str]] | None
  answer_starts: list[list[int]] | None
  sources: list[str]

  def __len__(self):
    return len(self.ids)

  def subset(self, rows: Sequence[int]) -> 'QaExamples':
    pick = lambda xs: None if xs is None else [xs[i] for i in rows]
    return QaExamples(pick(self.ids), pick(self.titles), pick(self.questions),
                      pick(self.contexts), pick(self.answer_texts), pick(self.answer_starts),
                      pick(self.sources))

  def references(self) -> dict[str, list[str]]:
    """{id: reference texts} as `squad_metrics` takes them."""
    if self.answer_texts is None:
      raise ValueError('these examples have no answers')
    return dict(zip(self.ids, self.answer_texts))


class _Collector:
  """Rows -> QaExamples: every check of one question, problems to the bad-row policy."""

  def __init__(self, bad: BadRows, version_2: bool, require_answers: bool):
    self.bad, self.version_2, self.require_answers = bad, version_2, require_answers
    self.ex = QaExamples([], [], [], [], [], [], [])
    self.seen: set[str] = set()
    self.n_rows = self.n_unanswerable = 0
    self.has_answers: bool | None = None

  def add(self, where: str, qid, title, question, context, answers):
    """`answers`: a list of (text, start) pairs, or None when the row has no answers key."""
    self.n_rows += 1
    qid = '' if qid is None else str(qid).strip()
    where = f'{where} (question id {qid!r})' if qid else where
    if not qid:
      return self.bad(where, 'missing_id', 'no question id')
    if qid in self.seen:
      return self.bad(where, 'duplicate_id', f'question id {qid!r} appears twice')
    for name, value in (('question', question), ('context', context)):
      if not isinstance(value, str) or not value.strip():
        return self.bad(where, 'empty_text', f'empty {name}')
    for value in [question, context, str(title or '')] + [t for t, _ in answers or ()]:
      why = bad_bytes(value)
      if why is not None:
        return self.bad(where, 'bad_encoding', why)
    if answers is None:
      if self.require_answers:
        return self.bad(where, 'bad_row', 'no answers')
    else:
      for text, start in answers:
        if not text or context[start:start + len(text)] != text:
          found = context.find(text) if text else -1
          return self.bad(where, 'answer_mismatch',
                          f'answer {text!r} is not at answer_start={start} of the context '
                          f'(it reads {context[start:start + len(text)]!r}'
                          + (f'; the text is at {found})' if found >= 0 else ')'))
      if not answers:
        if not self.version_2:
          return self.bad(where, 'unanswerable', f'no answers (unanswerable); {V2_HINT}')
        self.n_unanswerable += 1
    if self.has_answers is None:
      self.has_answers = answers is not None
    elif self.has_answers != (answers is not None):
      return self.bad(where, 'bad_row', 'answers missing here but present in other rows'
                      if answers is None else 'answers here but missing in other rows')
    self.seen.add(qid)
    e = self.ex
    e.ids.append(qid)
    e.titles.append(str(title or ''))
    e.questions.append(question)
    e.contexts.append(context)
    e.answer_texts.append([t for t, _ in answers or ()])
    e.answer_starts.append([s for _, s in answers or ()])
    e.sources.append(where)

  def examples(self) -> QaExamples:
    e = self.ex
    if not self.has_answers:
      e.answer_texts = e.answer_starts = None
    return e


def parse_answers(value) -> list[tuple[str, int]] | str:
  """(text, start) pairs from a SQuAD list, an HF `{"text": [], "answer_start": []}` dict or
  JSON text of either; a str explains what is wrong."""
  if isinstance(value, str):
    try:
      value = json.loads(value) if value.strip() else []
    except json.JSONDecodeError as e:
      return f'answers is not JSON ({e.msg})'
  if isinstance(value, Mapping):
    texts, starts = value.get('text'), value.get('answer_start')
    if not isinstance(texts, (list, tuple)) or not isinstance(starts, (list, tuple)) or \
        len(texts) != len(starts):
      return 'answers needs lists `text` and `answer_start` of one length'
    pairs = list(zip(texts, starts))
  elif isinstance(value, (list, tuple)):
    if not all(isinstance(a, Mapping) and 'text' in a and 'answer_start' in a for a in value):
      return 'each answer needs `text` and `answer_start`'
    pairs = [(a['text'], a['answer_start']) for a in value]
  else:
    return f'answers must be a list or a dict, got {type(value).__name__}'
  out = []
  for text, start in pairs:
    if not isinstance(text, str) or isinstance(start, bool) or \
        not isinstance(start, (int, np.integer)) or start < 0:
      return f'bad answer {text!r} at {start!r} (text a string, answer_start an int >= 0)'
    out.append((text, int(start)))
  return out


def _add_record(c: _Collector, where: str, row: Mapping):
  missing = [k for k in ('id', 'question', 'context') if k not in row]
  if missing:
    c.n_rows += 1
    return c.bad(where, 'bad_row', f'missing key(s) {missing}')
  answers = None
  if 'answers' in row and row['answers'] is not None:
    answers = parse_answers(row['answers'])
    if isinstance(answers, str):
      c.n_rows += 1
      return c.bad(f'{where} (question id {row["id"]!r})', 'bad_answers', answers)
  c.add(where, row['id'], row.get('title'), row['question'], row['context'], answers)


def _read_squad(path: Path, c: _Collector):
  with open_text(path) as f:
    text = f.read()
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f'{path}:{e.lineno}: invalid JSON ({e.msg})') from e
  if not isinstance(doc, dict) or not isinstance(doc.get('data'), list):
    raise InputError(f'{path}: not SQuAD JSON (expected {{"data": [articles]}})')
  for a_i, article in enumerate(doc['data']):
    title = article.get('title', '') if isinstance(article, dict) else ''
    for p_i, para in enumerate(article.get('paragraphs', []) if isinstance(article, dict)
                               else []):
      where = f'{path} (data[{a_i}].paragraphs[{p_i}])'
      if not isinstance(para, dict) or not isinstance(para.get('qas'), list):
        c.bad(where, 'bad_row', 'a paragraph needs `context` and `qas`')
        continue
      for q in para['qas']:
        row = dict(q, title=title, context=para.get('context')) if isinstance(q, dict) else {}
        _add_record(c, str(path), row)


def _read_jsonl(path: Path, c: _Collector):
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        c.n_rows += 1
        c.bad(where, 'bad_row', f'invalid JSON ({e.msg})')
        continue
      if not isinstance(row, dict):
        c.n_rows += 1
        c.bad(where, 'bad_row', f'expected a JSON object, got {type(row).__name__}')
        continue
      _add_record(c, where, row)


def _read_csv(path: Path, c: _Collector):
  with open_text(path, newline='') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      return
    header = [h.strip() for h in header]
    for row in reader:
      where = f'{path}:{reader.line_num}'
      if not any(x.strip() for x in row):
        continue
      if len(row) != len(header):
        c.n_rows += 1
        c.bad(where, 'bad_columns', f'expected {len(header)} columns, got {len(row)}')
        continue
      _add_record(c, where, dict(zip(header, row)))


def file_format(path: Path, fmt: str = 'auto') -> str:
  """squad | jsonl | csv: `fmt`, else by extension (.json: SQuAD unless it is JSON lines)."""
  if fmt != 'auto':
    return fmt
  suffix = path.suffix.lower()
  if suffix in ('.jsonl', '.ndjson'):
    return 'jsonl'
  if suffix == '.csv':
    return 'csv'
  if suffix == '.json':  # one JSON document with `data` (SQuAD) or one object per line
    with open_text(path) as f:
      text = f.read()
    try:
      doc = json.loads(text)
    except json.JSONDecodeError as e:
      return 'jsonl' if e.msg == 'Extra data' else 'squad'  # squad: reports the JSON error
    return 'squad' if isinstance(doc, dict) and 'data' in doc else 'jsonl'
  raise InputError(f'{path}: cannot tell the format from the extension; set data.format '
                   f'(squad, jsonl or csv)')


def read_qa_file(path: str | os.PathLike, *, fmt: str = 'auto', on_bad_row: str = 'error',
                 version_2_with_negative: bool = False, require_answers: bool = True
                 ) -> tuple[QaExamples, dict]:
  """Reads a SQuAD JSON / JSON lines / CSV file into (examples, stats). Rows are named by
  file (and line, for JSON lines and CSV) and question id."""
  path = Path(path)
  fmt = file_format(path, fmt)
  c = _Collector(BadRows(on_bad_row), version_2_with_negative, require_answers)
  {'squad': _read_squad, 'jsonl': _read_jsonl, 'csv': _read_csv}[fmt](path, c)
  return _finish(c, str(path), fmt)


def read_qa_hf(dataset, *, on_bad_row: str = 'error', version_2_with_negative: bool = False,
               require_answers: bool = True, name: str = 'hf') -> tuple[QaExamples, dict]:
  """Reads a `datasets.Dataset` with the flat `squad` columns (id, question, context,
  answers; title optional); rows are named '<name>[row i]'."""
  columns = dataset.column_names
  missing = [k for k in ('id', 'question', 'context') if k not in columns]
  if missing:
    raise InputError(f'{name}: no column(s) {missing}; columns are {columns} (the flat `squad` '
                     f'schema: id, title, context, question, answers)')
  values = {k: hf_column(dataset, k) for k in ('id', 'title', 'question', 'context', 'answers')
            if k in columns}
  c = _Collector(BadRows(on_bad_row), version_2_with_negative, require_answers)
  for i in range(len(dataset)):
    _add_record(c, f'{name}[row {i}]', {k: v[i] for k, v in values.items()})
  return _finish(c, name, 'hf')


def _finish(c: _Collector, name: str, fmt: str) -> tuple[QaExamples, dict]:
  ex = c.examples()
  stats = {'file': name, 'format': fmt, 'n_rows': c.n_rows, 'n_examples': len(ex),
           'n_unanswerable': c.n_unanswerable, 'n_articles': len(set(ex.titles)),
           **c.bad.stats()}
  if c.bad.counts:
    logging.warning('%s: skipped %d bad rows %s', name, stats['n_skipped'], dict(c.bad.counts))
  if not len(ex):
    raise InputError(no_rows_message(name, c.bad).replace('a header at most', 'no questions'))
  return ex, stats


# ----------------------------------------------------------------------------- windows

def _cut_questions(questions: Sequence[str], tokenizer, max_query_len: int
                   ) -> tuple[list[str], int]:
  """Questions cut to at most `max_query_len` tokens at a word boundary (a cut inside a word
  could tokenize differently); leading spaces dropped (they only shift offsets)."""
  questions = [q.lstrip() for q in questions]
  enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
  out, n_cut = [], 0
  for i, q in enumerate(questions):
    if len(enc['input_ids'][i]) <= max_query_len:
      out.append(q)
      continue
    n_cut += 1
    words = enc.word_ids(i)
    first = max_query_len  # the first token that does not fit, moved back to its word's start
    while first > 0 and words[first] is not None and words[first - 1] == words[first]:
      first -= 1
    if first == 0:  # one word longer than max_query_len tokens: cut inside it
      first = max_query_len
    out.append(q[:enc['offset_mapping'][i][first][0]].rstrip())
  return out, n_cut


def encode_qa(examples: QaExamples, tokenizer, *, max_len: int = 384, doc_stride: int = 128,
              max_query_len: int = 64) -> tuple[dict[str, np.ndarray], dict]:
  """Question + context windows, as the reference (`run_qa.py`) builds them.

  Each question (cut to max_query_len tokens) is paired with windows of its context:
  `[CLS] question [SEP] context piece [SEP]`, max_len tokens padded, consecutive pieces
  sharing doc_stride tokens (the fast tokenizer's overflow with `stride`). Labels (when the
  examples have answers) are the first reference's token span in every window that holds it
  WHOLE; a window that holds none of it, or only part of it (an answer cut by the window's
  edge counts as outside that window), is labelled [CLS] (0) at both ends, as is an
  unanswerable (v2) question. An answer longer than doc_stride tokens can be cut in every
  window: such questions are counted in `n_answers_in_no_window`.

  Returns arrays (N windows): input_ids, attention_mask, token_type_ids (tokenizers that use
  them) [N, max_len] int32; start_positions, end_positions [N] int32 (labeled examples);
  example_index [N] int32 (window -> example); offsets [N, max_len, 2] int32 (character span of
  each context token in its context, (-1, -1) for question, special and pad tokens); and
  stats.
  """
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError('question answering needs a fast tokenizer (offset mappings)')
  if tokenizer.cls_token_id is None:
    raise ValueError('question answering needs a tokenizer with a [CLS] token (the no-answer '
                     'position)')
  questions, n_cut = _cut_questions(examples.questions, tokenizer, max_query_len)
  tt = wants_token_types(tokenizer)
  enc = tokenizer(questions, examples.contexts, truncation='only_second', max_length=max_len,
                  stride=doc_stride, return_overflowing_tokens=True,
                  return_offsets_mapping=True, padding='max_length',
                  return_token_type_ids=tt, return_attention_mask=True)
  input_ids = np.asarray(enc['input_ids'], np.int32).reshape(-1, max_len)
  if len(input_ids) and (input_ids[:, 0] != tokenizer.cls_token_id).any():
    raise ValueError('the tokenizer does not put [CLS] first; QA labels no-answer at 0')
  n_windows = len(input_ids)
  example_index = np.asarray(enc['overflow_to_sample_mapping'], np.int32)
  offsets = np.asarray(enc['offset_mapping'], np.int32).reshape(n_windows, max_len, 2)
  is_context = np.array([[s == 1 for s in enc.sequence_ids(w)] for w in range(n_windows)],
                        bool).reshape(n_windows, max_len)
  offsets[~is_context] = -1
  arrays = {'input_ids': input_ids,
            'attention_mask': np.asarray(enc['attention_mask'], np.int32).reshape(-1, max_len)}
  if tt:
    arrays['token_type_ids'] = np.asarray(enc['token_type_ids'], np.int32).reshape(-1, max_len)
  per_example = np.bincount(example_index, minlength=len(examples))
  stats = {'n_windows': int(n_windows), 'n_questions_truncated': n_cut,
           'windows_per_example_mean': float(per_example.mean()) if len(examples) else 0.0,
           'windows_per_example_max': int(per_example.max()) if len(examples) else 0}
  if examples.answer_texts is not None:
    start, end = label_windows(offsets, example_index, examples)
    arrays['start_positions'], arrays['end_positions'] = start, end
    answered = np.array([bool(a) for a in examples.answer_texts], bool)
    held = np.bincount(example_index[start > 0], minlength=len(examples)) > 0
    stats.update(n_windows_with_answer=int((start > 0).sum()),
                 n_answers_in_no_window=int((answered & ~held).sum()))
    if stats['n_answers_in_no_window']:
      logging.warning('%d answers lie in no window whole (longer than doc_stride=%d tokens and '
                      'cut by every window edge): those questions train on [CLS] only',
                      stats['n_answers_in_no_window'], doc_stride)
  arrays['example_index'] = example_index
  arrays['offsets'] = offsets
  return arrays, stats


def label_windows(offsets: np.ndarray, example_index: np.ndarray, examples: QaExamples
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(start_positions, end_positions) [N] int32: the first reference's tokens in each window
  that holds its characters whole, else 0 ([CLS]). Start: the first context token ending
  after the answer's first character; end: the last context token starting before its end."""
  n = len(example_index)
  start_pos = np.zeros(n, np.int32)
  end_pos = np.zeros(n, np.int32)
  for w in range(n):
    i = int(example_index[w])
    if not examples.answer_texts[i]:
      continue
    a_start = examples.answer_starts[i][0]
    a_end = a_start + len(examples.answer_texts[i][0])
    ctx = np.flatnonzero(offsets[w, :, 0] >= 0)
    tok_start, tok_end = offsets[w, ctx, 0], offsets[w, ctx, 1]
    if not len(ctx) or tok_start[0] > a_start or tok_end[-1] < a_end:
      continue
    first = np.flatnonzero(tok_end > a_start)
    last = np.flatnonzero(tok_start < a_end)
    if not len(first) or not len(last) or last[-1] < first[0]:
      continue  # the answer is whitespace between tokens (never in a valid file)
    start_pos[w], end_pos[w] = ctx[first[0]], ctx[last[-1]]
  return start_pos, end_pos


# ----------------------------------------------------------------------- post-processing

def _top_k(logits: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions, logits) [N, k] of each row's k largest valid logits, ties to the earlier
  position; invalid slots (fewer than k valid) hold -inf."""
  masked = np.where(valid, logits.astype(np.float64), -np.inf)
  order = np.argsort(-masked, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(masked, order, axis=1)


_BLOCK = 2048  # windows post-processed at once


def _window_best(start_logits, end_logits, valid, k: int, max_answer_len: int):
  """(score, start, end) [W] of each window's best valid span among its k best starts and
  k best ends; ties: earliest start, then shortest. Score -inf: no valid span."""
  n = len(start_logits)
  start_idx, start_val = _top_k(start_logits, valid, k)
  end_idx, end_val = _top_k(end_logits, valid, k)
  score = start_val[:, :, None] + end_val[:, None, :]                     # [W, k, k]
  span = end_idx[:, None, :] - start_idx[:, :, None]
  ok = np.isfinite(score) & (span >= 0) & (span < max_answer_len)
  score = np.where(ok, score, -np.inf)
  best = score.reshape(n, -1).max(axis=1)
  tie = ok & (score == best[:, None, None])
  big = np.iinfo(np.int64).max
  starts = np.broadcast_to(start_idx[:, :, None], score.shape)
  ends = np.broadcast_to(end_idx[:, None, :], score.shape)
  w_start = np.where(tie, starts, big).reshape(n, -1).min(axis=1)
  w_end = np.where(tie & (starts == w_start[:, None, None]), ends, big).reshape(n, -1).min(1)
  return best, w_start, w_end


def best_answers(start_logits, end_logits, offsets, example_index, examples: QaExamples, *,
                 n_best: int = 20, max_answer_len: int = 30,
                 version_2_with_negative: bool = False,
                 null_score_diff_threshold: float = 0.0) -> list[dict]:
  """The best answer of every example from its windows' logits, as `run_qa`'s post-processing
  chooses it, vectorised over windows.

  start_logits, end_logits: [N, S]; offsets: [N, S, 2] (or the arrays of `encode_qa`);
  example_index: [N]. Per window the n_best start and n_best end positions (valid ones only:
  context tokens, offsets != -1) make candidate spans; a span is valid when end >= start and
  it is at most max_answer_len tokens; its score is start_logit + end_logit. The best over all
  windows of an example wins; ties go to the earliest window, then the earliest start, then
  the shortest span. The answer is cut from the ORIGINAL context by character offsets.
  v2: the null score is the smallest [CLS] (position 0) start + end over the example's
  windows; the answer is '' when null score - best span score > null_score_diff_threshold.
  Returns, in example order, {id, answer, score, start, end}: `start`/`end` character offsets
  into the context (end exclusive; -1 for ''), `score` the chosen span's (the null score for
  '' under v2; None when no valid span exists).
  """
  if isinstance(offsets, Mapping):
    offsets = offsets['offsets']
  start_logits = np.asarray(start_logits)
  end_logits = np.asarray(end_logits)
  offsets = np.asarray(offsets)
  example_index = np.asarray(example_index)
  n, s = start_logits.shape
  if end_logits.shape != (n, s) or offsets.shape != (n, s, 2) or example_index.shape != (n,):
    raise ValueError(f'shapes differ: start {start_logits.shape}, end {end_logits.shape}, '
                     f'offsets {offsets.shape}, example_index {example_index.shape}')
  if n and not 0 <= example_index.min() <= example_index.max() < len(examples):
    raise ValueError(f'example_index outside 0..{len(examples) - 1}: windows of other examples')
  k = min(int(n_best), s)
  valid = offsets[:, :, 0] >= 0
  best = np.zeros(n)
  w_start = np.zeros(n, np.int64)
  w_end = np.zeros(n, np.int64)
  for lo in range(0, n, _BLOCK):  # blocks bound the [windows, k, k] candidate arrays
    hi = min(n, lo + _BLOCK)
    best[lo:hi], w_start[lo:hi], w_end[lo:hi] = _window_best(
        start_logits[lo:hi], end_logits[lo:hi], valid[lo:hi], k, int(max_answer_len))
  # Across windows: best score, then the earliest window.
  order = np.lexsort((np.arange(n), -best, example_index))
  first = np.ones(n, bool)
  first[1:] = example_index[order][1:] != example_index[order][:-1]
  chosen = {int(example_index[w]): int(w) for w in order[first]}
  null = np.full(len(examples), np.inf)
  if version_2_with_negative:  # the [CLS] span of every window, the smallest per example
    np.minimum.at(null, example_index, start_logits[:, 0].astype(np.float64) + end_logits[:, 0])
  out = []
  for i, qid in enumerate(examples.ids):
    w = chosen.get(i)
    pred = {'id': qid, 'answer': '', 'score': None, 'start': -1, 'end': -1}
    if w is not None and np.isfinite(best[w]):
      a, b = int(offsets[w, w_start[w], 0]), int(offsets[w, w_end[w], 1])
      pred.update(answer=examples.contexts[i][a:b], score=float(best[w]), start=a, end=b)
    if version_2_with_negative and w is not None and (
        pred['score'] is None or null[i] - pred['score'] > null_score_diff_threshold):
      pred.update(answer='', score=float(null[i]), start=-1, end=-1)
    out.append(pred)
  return out


# ----------------------------------------------------------------------------- metrics

def normalize_answer(text: str) -> str:
  """The official SQuAD normalisation: lower case, punctuation and a/an/the removed,
  whitespace collapsed."""
  text = _ARTICLES.sub(' ', text.lower().translate(_NO_PUNCTUATION))
  return ' '.join(text.split())


_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def _f1(pred: list[str], ref: list[str], no_answer: bool) -> float:
  """Token-bag F1 of normalised token lists (official v1.1; v2's rule for no-answer)."""
  if no_answer:  # v2's rule for an unanswerable question
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
                  ) -> dict[str, float]:
  """Official SQuAD EM and F1 (x100): each question's best over its references, averaged over
  the references' questions (a question without a prediction scores 0, as in the official
  script). A question whose references are empty (or normalise to nothing) is unanswerable
  (v2 rule): correct iff the prediction is empty."""
  if not references:
    raise ValueError('no references to score')
  em = f1 = 0.0
  for qid, refs in references.items():
    if qid not in predictions:
      continue
    refs = [normalize_answer(r) for r in refs]
    no_answer = not any(refs)
    refs = [''] if no_answer else refs
    pred = normalize_answer(predictions[qid])
    em += max(float(pred == r) for r in refs)
    f1 += max(_f1(pred.split(), r.split(), no_answer) for r in refs)
  missing = sum(qid not in predictions for qid in references)
  if missing:
    logging.warning('%d of %d questions have no prediction (scored 0)', missing,
                    len(references))
  return {'exact_match': 100.0 * em / len(references), 'f1': 100.0 * f1 / len(references)}


# --------------------------------------------------------------------------- the splits

def held_out_articles(titles: Sequence[str], holdout: float, seed: int) -> set[str]:
  """The articles of the dev split: `holdout` of them (a count, or a fraction of the
  articles, at least one), drawn with `seed` from the articles in order of appearance."""
  articles = list(dict.fromkeys(titles))
  n = int(holdout) if holdout >= 1 else max(1, round(holdout * len(articles)))
  if n >= len(articles):
    raise InputError(f'data.dev_holdout_articles={holdout:g} holds out {n} of '
                     f'{len(articles)} articles, leaving none to train on')
  pick = np.random.default_rng(seed).permutation(len(articles))[:n]
  return {articles[j] for j in pick}


def read_qa_split(data: QaData, split: str, require_answers: bool
                  ) -> tuple[QaExamples, dict]:
  """(examples, stats) of one split: a file, an HF split, or (dev_holdout_articles) the
  held-out articles of train (dev) / the rest (train)."""
  holdout = float(data.dev_holdout_articles)
  source_split = 'train' if holdout and split == 'dev' else split
  kw = dict(on_bad_row=data.on_bad_row, version_2_with_negative=data.version_2_with_negative,
            require_answers=require_answers)
  if data.source == 'hf':
    ds, where = hf_load(data, hf_split_name(data, source_split, None), 'squad', None)
    ex, stats = read_qa_hf(ds, name=where, **kw)
  else:
    path = split_file(data, source_split, {})
    ex, stats = read_qa_file(path, fmt=data.format, **kw)
  if holdout and split in ('train', 'dev'):
    if not all(ex.titles):
      logging.warning('%s: rows without a title: each such context is its own article',
                      stats['file'])
    articles = [t or f'\0{c}' for t, c in zip(ex.titles, ex.contexts)]
    dev = held_out_articles(articles, holdout, int(data.seed))
    rows = [i for i, a in enumerate(articles) if (a in dev) == (split == 'dev')]
    ex = ex.subset(rows)
    stats.update(n_examples=len(ex), n_articles=len(set(a for a in articles
                                                        if (a in dev) == (split == 'dev'))),
                 held_out_articles=sorted(a for a in dev if not a.startswith('\0')))
  return ex, stats


def load_qa_split(data: QaData, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """Reads and windows one split of an extractive QA task.

  Returns (arrays, info): arrays as in `encode_qa` (start/end positions when the split has
  answers); info has split, examples (QaExamples, for `best_answers` and the references),
  n_examples, n_windows, has_labels, metric_names ['exact_match', 'f1'], main_metric 'f1',
  version_2_with_negative, and stats (the reader's and `encode_qa`'s: windows per example,
  windows holding the answer, skipped rows). A dev / test split that does not exist raises
  MissingSplitError.
  """
  split = normalize_split(split)
  ex, stats = read_qa_split(data, split, require_answers=not split.startswith('test'))
  arrays, enc_stats = encode_qa(ex, tokenizer, max_len=int(data.max_len),
                                doc_stride=int(data.doc_stride),
                                max_query_len=int(data.max_query_len))
  stats.update(enc_stats)
  info = dict(split=split, examples=ex, n_examples=len(ex), n_windows=enc_stats['n_windows'],
              has_labels='start_positions' in arrays, metric_names=['exact_match', 'f1'],
              main_metric='f1', version_2_with_negative=bool(data.version_2_with_negative),
              stats=stats)
  logging.info('qa/%s: %d questions, %d windows, stats %s', split, len(ex),
               enc_stats['n_windows'], stats)
  return arrays, info
