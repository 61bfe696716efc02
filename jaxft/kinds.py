"""The kinds of fine-tuned model (sequence classification, NER, extractive question
answering): what differs between them wherever a stage handles one. A stage picks the kind
once (from its stage name, or from a workdir's labels.json) and calls it; nothing compares
kind names along the way. A new kind is one more class here.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxft import config as config_lib
from jaxft.data import classification, ner
from jaxft.data import qa as qa_data
from jaxft.data.splits import read_text_lines, split_file
from jaxft.sources import Source, TaskInfo
from jaxft.objectives import classification as objectives
from jaxft.objectives import qa as qa_objectives
from jaxft.train import metrics as metrics_lib
from jaxft.train.step import Objective


class Kind:
  """One kind's data, objective, eval summary and predictions (the interface)."""
  name: str        # what labels.json records
  head: str        # the model head it trains
  data_class: type  # its `data` section
  label_key: str   # labels.json's list the data's `labels` setting holds
  split_files: str  # why a file is no data file of its kind, for messages
  model_types = ('bert', 'gpt2')  # the architectures with its head

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

  def trained_data(self, src: Source):
    """The `data` section `src` (a workdir) was trained with, as this kind's settings (keys
    of older versions ignored)."""
    known = {f.name for f in dataclasses.fields(self.data_class)}
    return config_lib.section(self.data_class, {k: v for k, v in src.trained_data.items()
                                                if k in known}, 'data')

  def num_labels(self, task: TaskInfo) -> int | None:
    """The head's width for `build_model` (None: the head has its own)."""
    return task.num_labels

  def prediction_data(self, data, task: TaskInfo):
    """The trained data settings as predict reads them: every row once, in file order
    (resampling would reorder the rows under their sources), the trained label order."""
    return dataclasses.replace(data, class_balance='none', labels=() if task.is_regression
                               else tuple(getattr(task, self.label_key)))

  def explained_rows(self, arrays: dict, ex: dict, scores: np.ndarray) -> dict:
    """The model rows `predict.explain` attributes, one per record."""
    return arrays

  def reads_lines(self, path: str) -> bool:
    """Whether predict reads `path` as one input per line (a .txt file of texts)."""
    return path.endswith('.txt')

  def inputs(self, data, tokenizer, split: str) -> tuple[dict, dict]:
    """(arrays, examples) of a split, for predict."""
    raise NotImplementedError

  def line_inputs(self, path: str, data, tokenizer, task: TaskInfo) -> tuple[dict, dict]:
    raise NotImplementedError

  def probabilities(self, task: TaskInfo) -> bool:
    """Whether predict's scores are softmax probabilities (else raw logits / scores)."""
    return False

  def records(self, ex: dict, scores: np.ndarray, arrays: dict, task: TaskInfo) -> list[dict]:
    raise NotImplementedError

  def metrics(self, scores: np.ndarray, arrays: dict, ex: dict, task: TaskInfo) -> dict:
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

  def line_inputs(self, path, data, tokenizer, task):
    rows, _ = read_text_lines(path, data.on_bad_row)
    ex = classification.ClsExamples([t for _, t in rows], None, None, [s for s, _ in rows])
    arrays, st = classification.encode_cls(ex, tokenizer, max_len=data.max_len,
                                           truncation=data.truncation,
                                           is_regression=task.is_regression)
    keep = st['keep']
    return arrays, {'texts': [ex.texts[i] for i in keep], 'pairs': None, 'gold': None,
                    'sources': [ex.sources[i] for i in keep]}

  def probabilities(self, task):
    return not task.is_regression and len(task.label_names) > 1

  def records(self, ex, scores, arrays, task):
    names = task.label_names
    out = []
    for i in range(len(scores)):
      rec = {'source': ex['sources'][i]}
      if ex.get('texts'):
        rec['text'] = ex['texts'][i]
      if ex.get('pairs'):
        rec['text_pair'] = ex['pairs'][i]
      if task.is_regression:
        rec['score'] = float(scores[i][0])
      else:
        k = int(np.argmax(scores[i]))
        rec['label'] = names[k]
        rec['probs'] = {names[j]: float(scores[i][j]) for j in range(len(names))}
        if ex['gold'] is not None:
          rec['gold'] = names[int(ex['gold'][i])]
      out.append(rec)
    return out

  def metrics(self, scores, arrays, ex, task):
    preds = scores[:, 0] if task.is_regression else scores
    return metrics_lib.glue_metrics(list(task.metric_names), preds, np.asarray(ex['gold']))


class TokenClassification(Kind):
  name, head, data_class, label_key = 'ner', 'token_cls', ner.NerData, 'label_names'
  model_types = ('bert',)
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

  def line_inputs(self, path, data, tokenizer, task):
    rows, _ = read_text_lines(path, data.on_bad_row)
    ex = ner.NerExamples([t.split() for _, t in rows], None, [s for s, _ in rows])
    arrays, st = ner.encode_ner(ex, tokenizer, list(task.label_names), max_len=data.max_len,
                                truncation=data.truncation)
    words = [ex.words[i] for i in st['keep']]
    return arrays, {'words': words, 'num_words': [len(w) for w in words], 'gold': None,
                    'sources': [ex.sources[i] for i in st['keep']]}

  def records(self, ex, scores, arrays, task):
    tags = ner.predictions_to_tags(scores.argmax(-1), arrays['word_ids'],
                                   list(task.label_names), ex['num_words'])
    out = []
    for i in range(len(tags)):
      rec = {'source': ex['sources'][i], 'tokens': ex['words'][i], 'tags': tags[i],
             'entities': entities(ex['words'][i], tags[i])}
      if ex['gold'] is not None:
        rec['gold'] = ex['gold'][i]
      out.append(rec)
    return out

  def metrics(self, scores, arrays, ex, task):
    tags = ner.predictions_to_tags(scores.argmax(-1), arrays['word_ids'],
                                   list(task.label_names), ex['num_words'])
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


class QuestionAnswering(Kind):
  """Extractive QA: a model row is a window of question + context; a question's answer is
  chosen over all its windows (`objectives.qa`). The windows' character offsets and
  example index stay on the host (info['windows']): the device sees model inputs and labels."""
  name, head, data_class, label_key = 'qa', 'qa', qa_data.QaData, 'label_names'
  model_types = ('bert',)
  split_files = 'SQuAD .json/.jsonl/.csv'
  SUFFIXES = ('.json', '.jsonl', '.csv')
  HOST_KEYS = ('offsets', 'example_index')

  def objective(self, num_labels, is_regression, label_smoothing):
    del num_labels, is_regression
    if label_smoothing:
      raise ValueError('finetune.label_smoothing does not apply to question answering')
    return qa_objectives.span()

  def load_split(self, data, tokenizer, split):
    arrays, info = qa_data.load_qa_split(data, tokenizer, split)
    info.update(windows={k: arrays.pop(k) for k in self.HOST_KEYS}, settings=data,
                label_names=[], num_labels=2, is_regression=False)
    return arrays, info

  def summary(self, info, arrays):
    return qa_objectives.summary(info)

  def split_path(self, data, split):
    return str(split_file(data, 'train' if data.dev_holdout_articles and split == 'dev'
                          else split, {}))

  def is_data_file(self, path):
    return os.path.splitext(path)[1].lower() in self.SUFFIXES

  def reads_lines(self, path):
    return False

  def prediction_data(self, data, task):
    return data

  def num_labels(self, task):
    return None  # a start and an end score per token

  def explained_rows(self, arrays, ex, scores):
    """Per question, the window its answer was read from, with the answer's first and last
    token as the explained target (the [CLS] position for an empty answer)."""
    found = self._answers(ex, scores)
    offsets, owner = ex['windows']['offsets'], ex['windows']['example_index']
    rows, targets = [], []
    for i, a in enumerate(found):
      windows = np.flatnonzero(owner == i)
      row, target = int(windows[0]), (0, 0)
      for w in windows:
        starts = np.flatnonzero(offsets[w, :, 0] == a['start'])
        ends = np.flatnonzero(offsets[w, :, 1] == a['end'])
        if a['start'] >= 0 and len(starts) and len(ends) and ends[-1] >= starts[0]:
          row, target = int(w), (int(starts[0]), int(ends[-1]))
          break
      rows.append(row)
      targets.append(target)
    out = {k: v[rows] for k, v in arrays.items()}
    out['target'] = np.asarray(targets, np.int32).reshape(-1, 2)
    mask = np.zeros(out['input_ids'].shape, np.int32)
    mask[np.arange(len(rows))[:, None], out['target']] = 1
    out['target_mask'] = mask
    return out

  def inputs(self, data, tokenizer, split):
    arrays, info = self.load_split(data, tokenizer, split)
    ex = info['examples']
    return arrays, {'examples': ex, 'windows': info['windows'], 'settings': data,
                    'gold': ex.references() if ex.answer_texts is not None else None,
                    'sources': ex.sources}

  def records(self, ex, scores, arrays, task):
    found = self._answers(ex, scores)
    examples, gold = ex['examples'], ex['gold']
    out = []
    for i, a in enumerate(found):
      rec = {'id': a['id'], 'source': examples.sources[i], 'question': examples.questions[i],
             'answer': a['answer'], 'score': a['score'], 'start': a['start'], 'end': a['end']}
      if gold is not None:
        rec['gold'] = gold[a['id']]
      out.append(rec)
    return out

  def metrics(self, scores, arrays, ex, task):
    return qa_objectives.scores(self._answers(ex, scores), ex['examples'])

  @staticmethod
  def _answers(ex, scores):
    """The questions' answers, post-processed once per prediction: records, metrics and the
    explained rows all read them."""
    if 'answers' not in ex:
      ex['answers'] = qa_objectives.answers(scores[..., 0], scores[..., 1], ex['windows'],
                                            ex['examples'], ex['settings'])
    return ex['answers']


CLS, NER, QA = SequenceClassification(), TokenClassification(), QuestionAnswering()
KINDS = {k.name: k for k in (CLS, NER, QA)}


def of(name: str) -> Kind:
  """The kind a workdir's labels.json records."""
  if name not in KINDS:
    raise ValueError(f'kind {name!r} is not one jaxft fine-tunes ({sorted(KINDS)})')
  return KINDS[name]
