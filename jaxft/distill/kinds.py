"""What differs between the kinds of distillation (`distill.kind`): a GLUE-style classifier
(`cls`: the task's splits, labels, a test split), DistilBERT-style MLM pretraining (`mlm`:
packed rows of the token store, masking inside the step) and extractive QA (`qa`: SQuAD
windows, start / end distributions). The stage
picks one once and calls it; nothing compares the kind's name along the way.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxft import finetuning, kinds, sources
from jaxft.data import loader as loader_lib
from jaxft.data import pretrain as lm_data
from jaxft.objectives import classification as cls_objectives
from jaxft.objectives import distill as distill_objectives
from jaxft.objectives import lm
from jaxft.objectives import qa as qa_objectives
from jaxft.train import loop


@dataclasses.dataclass
class Data:
  """A distillation run's data, and its training settings with num_steps resolved."""
  train: Any             # cls: arrays; mlm: a PackedRows source over the token store
  dev: dict | None
  train_settings: loop.TrainSettings
  info: dict | None = None       # cls: labels and metrics of the task
  dev_info: dict | None = None
  test: dict | None = None
  test_info: dict | None = None
  stats: dict | None = None      # mlm: the corpus statistics
  steps_per_epoch: int = 0

  def train_source(self):
    """What the loader reads: the arrays without word_ids (cls), or the packed rows (mlm)."""
    if isinstance(self.train, dict):
      return {k: v for k, v in self.train.items() if k != 'word_ids'}
    return self.train


class Classifier:
  """distill.kind=cls: a fine-tuned teacher's soft targets on a task's splits."""
  head = 'cls'
  task_kind = kinds.CLS  # the fine-tuning kind whose splits, summary and test split it uses

  def load(self, data_settings, tokenizer, workdir: str, train: loop.TrainSettings) -> Data:
    del workdir
    kind = self.task_kind
    arrays, info = finetuning.load_split(kind, data_settings, tokenizer, 'train')
    dev, dev_info = finetuning.load_split(kind, data_settings, tokenizer, 'dev')
    test, test_info = finetuning.load_split(kind, data_settings, tokenizer, 'test')
    train, per_epoch = finetuning.resolve_steps(train, len(arrays['input_ids']))
    train = finetuning.with_default_metric(train, info if dev is not None else None)
    return Data(arrays, dev, train, info, dev_info, test, test_info, None, per_epoch)

  def teacher_labels(self, data: Data) -> dict:
    """What load_teacher checks the teacher's head against."""
    info = data.info
    labelled = not info['is_regression']
    return {'num_labels': info['num_labels'],
            'label_values': info['label_values'] if labelled else None,
            'label_names': info['label_names'] if labelled else None}

  def eval_parts(self, data: Data, tokenizer, masking, batch_size: int, seed: int):
    """(objective, eval batches, summarize, the per-example output a forward gives)."""
    del tokenizer, masking, seed
    info = data.info
    return (cls_objectives.cls(info['num_labels'], info['is_regression']),
            loader_lib.eval_batches(data.dev, batch_size),
            cls_objectives.cls_summary(data.dev_info) if data.dev is not None else None, 'logits')

  def objective(self, data: Data, tokenizer, masking, spec, teacher_def, cached: bool):
    del tokenizer, masking
    return distill_objectives.cls(data.info['num_labels'], data.info['is_regression'], spec,
                                  teacher_def, cached=cached)

  def record(self, data: Data, workdir: str, mcfg) -> None:
    sources.save_labels(workdir, sources.TaskInfo.of_data(self.task_kind.name, data.info, mcfg))

  def hooks(self, data: Data, batch_size: int) -> list[loop.Hook]:
    return finetuning.test_hook(self.task_kind, data.test, data.test_info, batch_size)

  def results(self, data: Data) -> dict:
    return {'labels': data.info['label_names']}

  def id2label(self, data: Data) -> dict | None:
    names = data.info['label_names']
    return dict(enumerate(names)) if names else None


class MaskedLM:
  """distill.kind=mlm: an MLM teacher's predictions at the masked positions of the corpus."""
  head = 'mlm'

  def load(self, data_settings, tokenizer, workdir, train):
    rows, dev, stats = lm_data.build_lm_data(data_settings, tokenizer, workdir, 'bert')
    return Data(rows, dev, train, stats={k: v for k, v in stats.items() if 'path' not in k})

  def teacher_labels(self, data):
    return {'num_labels': None, 'label_values': None, 'label_names': None}

  def eval_parts(self, data, tokenizer, masking, batch_size, seed):
    return (lm.mlm(tokenizer, masking), loader_lib.lm_eval_batches(data.dev, batch_size, seed),
            lm.summarize, 'last_hidden_state')

  def objective(self, data, tokenizer, masking, spec, teacher_def, cached):
    del data, cached
    return distill_objectives.mlm(tokenizer, masking, spec, teacher_def)

  def record(self, data, workdir, mcfg):
    pass

  def hooks(self, data, batch_size):
    return []

  def results(self, data):
    return {'data': data.stats}

  def id2label(self, data):
    return None


class QuestionAnswering(Classifier):
  """distill.kind=qa: a QA teacher's start / end distributions on a SQuAD-style task's
  windows (the splits, dev EM / F1 and test split as finetune_qa reads them)."""
  head = 'qa'
  task_kind = kinds.QA

  def teacher_labels(self, data):
    return {'num_labels': None, 'label_values': None, 'label_names': None}

  def eval_parts(self, data, tokenizer, masking, batch_size, seed):
    del tokenizer, masking, seed
    return (qa_objectives.span(), loader_lib.eval_batches(data.dev, batch_size),
            kinds.QA.summary(data.dev_info, data.dev) if data.dev is not None else None,
            'logits')

  def objective(self, data, tokenizer, masking, spec, teacher_def, cached):
    del data, tokenizer, masking, cached  # cache_teacher is classification's (settings check)
    return distill_objectives.span(spec, teacher_def)

  def results(self, data):
    return {}

  def id2label(self, data):
    return None


KINDS = {'cls': Classifier(), 'mlm': MaskedLM(), 'qa': QuestionAnswering()}
