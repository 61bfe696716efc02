"""What every fine-tuning stage shares (finetune, finetune_lm, distill, cloze): the model and
tokenizer from init_from, a downstream split, epochs -> steps, the default early-stopping
metric, the eval summary, the test-split hook and the export of the trained model."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging

from jaxft import peft as peft_lib
from jaxft import kinds, sources
from jaxft.data import loader as loader_lib
from jaxft.data.splits import MissingSplitError
from jaxft.export import ExportSettings, export_hf, export_onnx, jax_logits
from jaxft.models.config import ModelConfig
from jaxft.peft import PeftConfig
from jaxft.train import loop
from jaxft.train import optimizer as optim
from jaxft.train.optimizer import FreezeSettings
from jaxft.train.state import ModelDef


def model_and_tokenizer(source: sources.Source | None, model: ModelConfig, tokenizer_path: str,
                        max_len: int):
  """(ModelConfig, tokenizer): the init_from source's architecture and tokenizer when given
  (with this config's runtime fields), else the config's model and data.tokenizer; checked
  together."""
  tokenizer, mcfg = sources.tokenizer_and_config(source, tokenizer_path, model)
  if max_len > mcfg.max_position_embeddings:
    raise ValueError(f"data.max_len={max_len} exceeds the model's max_position_embeddings="
                     f'{mcfg.max_position_embeddings}')
  if len(tokenizer) > mcfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but the model vocabulary has '
                     f'{mcfg.vocab_size}: use the tokenizer the model was trained with')
  return mcfg, tokenizer


def load_split(kind: kinds.Kind, data, tokenizer, split: str):
  """(arrays, info) of one split of `kind`'s data, or (None, None) when a dev/test split is
  absent."""
  try:
    return kind.load_split(data, tokenizer, split)
  except MissingSplitError:
    if split == 'train':
      raise
    return None, None


def init_trainable(model_def: ModelDef, source: sources.Source | None, freeze: FreezeSettings,
                   pcfg: PeftConfig, *, max_len: int, num_layers: int):
  """(the loop's Start, the init report) of a fine-tune: weights from `source` (logged),
  then freezing and PEFT (which may re-hang the model, its parameters and the mask) and the
  layer-wise learning-rate scale."""
  init_params, report = source.load_init(model_def) if source else (None, None)
  if report:
    logging.info('init_from %s: %d tensors loaded; new (freshly initialised): %s; dropped: %s',
                 source.path, report['loaded'], report['missing'], report['unused'])
  trainable = optim.trainable_mask(freeze, model_def.abstract_params)
  peft_parts = peft_lib.setup(pcfg, model_def, init_params, trainable,
                              fresh=report['missing'] if report else (), max_len=max_len)
  if peft_parts is not None:
    model_def, init_params, trainable = peft_parts
  lr_scale = optim.layerwise_lr_scale(freeze, model_def.abstract_params, num_layers)
  return loop.Start(model_def, init_params, trainable, lr_scale), report


def resolve_steps(train: loop.TrainSettings, n_train: int) -> tuple[loop.TrainSettings, int]:
  """(train settings with num_steps resolved, steps per epoch). train.num_steps > 0 is the
  count (it wins over num_epochs: an explicit --config.train.num_steps=N is never overridden
  by a preset's epochs); num_steps = 0 means num_epochs whole epochs."""
  bs = train.batch_size
  if n_train < bs:
    raise ValueError(f'{n_train} training examples < train.batch_size={bs}')
  per_epoch = max(n_train // bs, 1)
  if train.num_steps:
    if train.num_epochs:
      logging.info('train.num_steps=%d is set: %d steps (train.num_epochs=%d is ignored; '
                   '%d steps per epoch)', train.num_steps, train.num_steps, train.num_epochs,
                   per_epoch)
    return train, per_epoch
  if not train.num_epochs:
    raise ValueError('train.num_steps=0 and train.num_epochs=0: set one of them')
  train = dataclasses.replace(train, num_steps=train.num_epochs * per_epoch)
  logging.info('train.num_epochs=%d x %d steps per epoch -> %d steps (train.num_steps=0; '
               'config.json keeps the requested config)', train.num_epochs, per_epoch,
               train.num_steps)
  return train, per_epoch


def with_default_metric(train: loop.TrainSettings, info: dict | None) -> loop.TrainSettings:
  """Early stopping (and the best checkpoint) on the data's main metric unless one is set."""
  if train.early_stopping.metric or info is None:
    return train
  main = info['main_metric']
  es = dataclasses.replace(train.early_stopping, metric=main,
                           mode='min' if main == 'loss' else 'max')
  return dataclasses.replace(train, early_stopping=es)


def test_hook(kind: kinds.Kind, test_arrays, test_info, batch_size: int) -> list[loop.Hook]:
  """Score the final (best) parameters on a labelled test split."""
  if test_arrays is None or not test_info.get('has_labels'):
    return []

  def test(trained: loop.Trained) -> dict:
    metrics = trained.evaluate(loader_lib.eval_batches(test_arrays, batch_size)(),
                               kind.summary(test_info, test_arrays))
    logging.info('test: %s', metrics)
    return metrics

  return [loop.Hook('test', test)]


@dataclasses.dataclass(frozen=True)
class ExportPlan:
  """What a fine-tune exports and how: the run's PEFT and export settings, and what the
  exported model is (architecture, head, tokenizer, class names, input length)."""
  peft: PeftConfig
  export: ExportSettings
  mcfg: ModelConfig
  head: str
  tokenizer: Any
  init_from: str = ''
  label_names: list | None = None  # a fine-tune's classes (recorded in the export)
  max_len: int = 0    # the ONNX check's longest input

  @property
  def id2label(self) -> dict | None:
    return dict(enumerate(self.label_names)) if self.label_names else None


def export_trained(plan: ExportPlan, params, trainable, model_def: ModelDef | None,
                   workdir: str) -> dict | None:
  """The PEFT tensors alone (workdir/<method>/, a PEFT run) and workdir/export: a Hugging
  Face directory, and for a PEFT run every form its method allows (jaxft.peft.export);
  with `export.onnx`, export/model.onnx checked against `model_def`'s logits on inputs of
  up to `max_len` tokens (returns that check's {path, max_abs_diff, tol})."""
  pcfg, export, mcfg, head = plan.peft, plan.export, plan.mcfg, plan.head
  tokenizer, id2label = plan.tokenizer, plan.id2label
  extra = {'init_from': plan.init_from}
  if plan.label_names is not None:
    extra['labels'] = plan.label_names
  if pcfg.enabled:
    out = peft_lib.save_checkpoint(pcfg, params, trainable, workdir,
                                   extra={**extra, 'head': head, 'model': mcfg.to_dict()})
    logging.info('saved the PEFT weights to %s', out)
  if not export.hf:
    return None
  if pcfg.enabled:
    peft_lib.export_peft(pcfg, params, trainable, mcfg, head, os.path.join(workdir, 'export'),
                         tokenizer=tokenizer, id2label=id2label, extra=extra)
  else:
    export_hf(params, mcfg, head, workdir, tokenizer, id2label=id2label)
  if not export.onnx:
    return None
  reference = jax_logits(model_def, params)  # every process gathers; process 0 exports
  if jax.process_index() != 0:
    return None
  return export_onnx(os.path.join(workdir, 'export'), head, reference, max_len=plan.max_len)
