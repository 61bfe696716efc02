"""The kinds of fine-tuned model (sequence classification, NER): what differs between them
wherever a stage handles one. A stage picks the kind once (from its stage name, or from a
workdir's labels.json) and calls it; nothing compares kind names along the way. A new kind
(question answering) is one more class here.
"""
from __future__ import annotations

import os

import numpy as np

from jaxft.data import classification, ner
from jaxft.data.splits import read_text_lines
from jaxft.objectives import classification as objectives
from jaxft.train import metrics as metrics_lib
from jaxft.train.step import Objective


class Kind:
  """One kind's data, objective, eval summary and predictions (the interface)."""
  name: str        # what labels.json records
  head: str        # the model head it trains
  data_class: type  # its `data` section
  label_key: str   # labels.json's list the data's `labels` setting holds
  split_files: str  # why a file is no data file of its kind, for messages

  def objective(self, num_labels: int, is_regression: bool, label_smoothing: float) -> Objective:
    raise NotImplementedError

  def load_split(self, data, tokenizer, split: str):
    """(arrays, info) of a split of its data (MissingSplitError when there is none)."""
    raise NotImplementedError

  def summary(self, info: dict, arrays: dict):
    """The eval summarizer: (sums, per-example outputs) -> metrics."""
    raise NotImplementedError

  def split_path(self, data, split: str) -> str:
    raise NotImplementedError

  def is_data_file(self, path: str) -> bool:
    raise NotImplementedError

  def reads_lines(self, path: str) -> bool:
    """Whether predict reads `path` as one input per line (a .txt file of texts)."""
    return path.endswith('.txt')

  def inputs(self, data, tokenizer, split: str) -> tuple[dict, dict]:
    """(arrays, examples) of a split, for predict."""
    raise NotImplementedError

  def line_inputs(self, path: str, data, tokenizer, labels: dict) -> tuple[dict, dict]:
    raise NotImplementedError

  def probabilities(self, labels: dict) -> bool:
    """Whether predict's scores are softmax probabilities (else raw logits / scores)."""
    return False

  def records(self, ex: dict, scores: np.ndarray, arrays: dict, labels: dict) -> list[dict]:
    raise NotImplementedError

  def metrics(self, scores: np.ndarray, arrays: dict, ex: dict, labels: dict) -> dict:
    """The task's metrics on a labelled input (predict as an eval-only run)."""
    raise NotImplementedError


class SequenceClassification(Kind):
  name, head, data_class, label_key = 'cls', 'cls', classification.ClsData, 'label_values'
  split_files = '.tsv/.csv/.jsonl/.json/.txt'
  SUFFIXES = ('.tsv', '.csv', '.jsonl', '.json', '.txt')

  def objective(self, num_labels, is_regression, label_smoothing):
    return objectives.cls(num_labels, is_regression, label_smoothing=label_smoothing)

  def load_split(self, data, tokenizer, split):
    return classification.load_cls_split(data, tokenizer, split)

  def summary(self, info, arrays):
    return objectives.cls_summary(info)

  def split_path(self, data, split):
    return classification.split_path(data, split)

  def is_data_file(self, path):
    return os.path.splitext(path)[1].lower() in self.SUFFIXES

  def inputs(self, data, tokenizer, split):
    arrays, info = self.load_split(data, tokenizer, split)
    return arrays, {'texts': info['texts'], 'pairs': info['pairs'], 'gold': arrays.get('labels'),
                    'sources': info['sources']}

  def line_inputs(self, path, data, tokenizer, labels):
    rows, _ = read_text_lines(path, data.on_bad_row)
    ex = classification.ClsExamples([t for _, t in rows], None, None, [s for s, _ in rows])
    arrays, st = classification.encode_cls(ex, tokenizer, max_len=data.max_len,
                                           truncation=data.truncation,
                                           is_regression=bool(labels.get('is_regression')))
    keep = st['keep']
    return arrays, {'texts': [ex.texts[i] for i in keep], 'pairs': None, 'gold': None,
                    'sources': [ex.sources[i] for i in keep]}

  def probabilities(self, labels):
    return not labels.get('is_regression') and len(labels['label_names']) > 1

  def records(self, ex, scores, arrays, labels):
    names = labels['label_names']
    out = []
    for i in range(len(scores)):
      rec = {'source': ex['sources'][i]}
      if ex.get('texts'):
        rec['text'] = ex['texts'][i]
      if ex.get('pairs'):
        rec['text_pair'] = ex['pairs'][i]
      if labels.get('is_regression'):
        rec['score'] = float(scores[i][0])
      else:
        k = int(np.argmax(scores[i]))
        rec['label'] = names[k]
        rec['probs'] = {names[j]: float(scores[i][j]) for j in range(len(names))}
        if ex['gold'] is not None:
          rec['gold'] = names[int(ex['gold'][i])]
      out.append(rec)
    return out

  def metrics(self, scores, arrays, ex, labels):
    preds = scores[:, 0] if labels.get('is_regression') else scores
    return metrics_lib.glue_metrics(labels['metric_names'], preds, np.asarray(ex['gold']))


class TokenClassification(Kind):
  name, head, data_class, label_key = 'ner', 'token_cls', ner.NerData, 'label_names'
  split_files = 'not CoNLL'

  def objective(self, num_labels, is_regression, label_smoothing):
    return objectives.ner(num_labels, label_smoothing=label_smoothing)

  def load_split(self, data, tokenizer, split):
    return ner.load_ner_split(data, tokenizer, split)

  def summary(self, info, arrays):
    return objectives.ner_summary(info, arrays['word_ids'])

  def split_path(self, data, split):
    return ner.split_path(data, split)

  def is_data_file(self, path):
    return ner.looks_like_conll(path)

  def reads_lines(self, path):  # a CoNLL file is CoNLL whatever its name
    return path.endswith('.txt') and not ner.looks_like_conll(path)

  def inputs(self, data, tokenizer, split):
    arrays, info = self.load_split(data, tokenizer, split)
    return arrays, {'words': info['words'], 'num_words': info['num_words'], 'gold': info['tags'],
                    'sources': info['sources']}

  def line_inputs(self, path, data, tokenizer, labels):
    rows, _ = read_text_lines(path, data.on_bad_row)
    ex = ner.NerExamples([t.split() for _, t in rows], None, [s for s, _ in rows])
    arrays, st = ner.encode_ner(ex, tokenizer, labels['label_names'], max_len=data.max_len,
                                truncation=data.truncation)
    words = [ex.words[i] for i in st['keep']]
    return arrays, {'words': words, 'num_words': [len(w) for w in words], 'gold': None,
                    'sources': [ex.sources[i] for i in st['keep']]}

  def records(self, ex, scores, arrays, labels):
    tags = ner.predictions_to_tags(scores.argmax(-1), arrays['word_ids'],
                                   labels['label_names'], ex['num_words'])
    out = []
    for i in range(len(tags)):
      rec = {'source': ex['sources'][i], 'tokens': ex['words'][i], 'tags': tags[i],
             'entities': entities(ex['words'][i], tags[i])}
      if ex['gold'] is not None:
        rec['gold'] = ex['gold'][i]
      out.append(rec)
    return out

  def metrics(self, scores, arrays, ex, labels):
    tags = ner.predictions_to_tags(scores.argmax(-1), arrays['word_ids'],
                                   labels['label_names'], ex['num_words'])
    m = metrics_lib.ner_metrics(tags, ex['gold'])
    return {k: m[k] for k in ('precision', 'recall', 'f1', 'accuracy')}


def entities(words, tags):
  """[(type, start, end_exclusive, text)] spans of IOB2 tags."""
  out, cur = [], None
  for i, t in enumerate(list(tags) + ['O']):
    if cur is not None and (t == 'O' or t.startswith('B-') or t[2:] != cur[0]):
      out.append({'type': cur[0], 'start': cur[1], 'end': i,
                  'text': ' '.join(words[cur[1]:i])})
      cur = None
    if t.startswith('B-') or (t.startswith('I-') and cur is None):
      cur = (t[2:], i)
  return out


CLS, NER = SequenceClassification(), TokenClassification()
KINDS = {k.name: k for k in (CLS, NER)}


def of(name: str) -> Kind:
  """The kind a workdir's labels.json records."""
  if name not in KINDS:
    raise ValueError(f'kind {name!r} is not one jaxft fine-tunes ({sorted(KINDS)})')
  return KINDS[name]
