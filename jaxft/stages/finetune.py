"""Stages `finetune_cls` (GLUE-style sequence classification / regression) and `finetune_ner`.

Init from a jaxft workdir (its best, else latest checkpoint) or a Hugging Face directory:
architecture and tokenizer come from there, training-time settings (dropout, dtypes) from
this config. The loop validates every `train.eval_every` steps and at each epoch end, keeps
the best checkpoints by the data's main metric, stops early with patience, and at the end
scores the best parameters on the test split when it has labels.
"""
from __future__ import annotations

import dataclasses


from jaxft import config as config_lib
from jaxft import continual, kinds, sources
from jaxft.data import classification, ner
from jaxft.data import loader as loader_lib
from jaxft.export import ExportSettings, OnnxMismatch, check_onnx
from jaxft.finetuning import (export_trained, load_split, model_and_tokenizer, test_hook,
                              with_default_metric)
from jaxft.models.config import ModelConfig
from jaxft.peft import PeftConfig
from jaxft.train import loop
from jaxft.train.metrics import write_results
from jaxft.train.optimizer import FreezeSettings

@dataclasses.dataclass(frozen=True, kw_only=True)
class ClsSettings(loop.RunSettings):
  """finetune_cls: the config's keys."""
  init_from: str = ''
  model: ModelConfig  # the architecture when there is no init_from; its runtime fields always
  data: classification.ClsData
  finetune: FreezeSettings
  peft: PeftConfig
  export: ExportSettings
  continual: continual.ContinualSettings

  kind = kinds.CLS

  def __post_init__(self):
    check_onnx(self.export)
    # The prompt's random init draws from the run's seed; a continual run starts from the
    # previous task's workdir (its encoder, tokenizer and head).
    object.__setattr__(self, 'peft', dataclasses.replace(self.peft, seed=self.seed))
    if self.continual.enabled:
      _continual_checks(self)
      object.__setattr__(self, 'init_from', self.continual.previous)
    if not self.init_from and self.data.max_len > self.model.max_position_embeddings:
      raise config_lib.ConfigError(f'data.max_len={self.data.max_len} exceeds model.'
                                   f'max_position_embeddings={self.model.max_position_embeddings}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class NerSettings(ClsSettings):
  """finetune_ner: the config's keys."""
  data: ner.NerData

  kind = kinds.NER


Settings = ClsSettings | NerSettings


def _continual_checks(s: Settings) -> None:
  """continual.previous: a finetune_cls workdir, its tokenizer, no PEFT."""
  if s.kind is not kinds.CLS or s.peft.enabled:
    raise config_lib.ConfigError('continual.previous is for finetune_cls without peft.*')
  try:
    continual.check_previous(s.continual, s.init_from, s.data.tokenizer)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


# ----------------------------------------------------------------------------- the stage

def run(s: Settings, workdir: str) -> dict:
  return finetune(s, workdir).results


def finetune(s: Settings, workdir: str) -> loop.Outcome:
  """The stage, returning the state it ends with (on device) beside the results."""
  mcfg, tokenizer = model_and_tokenizer(s.init_from, s.model, s.data.tokenizer, s.data.max_len)
  if s.kind is kinds.NER and mcfg.model_type != 'bert':
    raise ValueError('finetune_ner supports model.type=bert')
  train_arrays, info = load_split(s.data, tokenizer, 'train')
  dev_arrays, dev_info = load_split(s.data, tokenizer, 'dev')
  test_arrays, test_info = load_split(s.data, tokenizer, 'test')
  plan = continual.plan(s.continual, s.kind, mcfg, s.data.max_len, s.seed)
  train, per_epoch = plan.resolve_steps(s.train, len(train_arrays['input_ids']))
  settings = dataclasses.replace(
      s.loop, train=with_default_metric(train, info if dev_arrays is not None else None))
  sources.save_tokenizer(tokenizer, workdir, mcfg.max_position_embeddings)
  sources.save_labels(workdir, s.kind.name, info, mcfg)
  sources.record_model(workdir, mcfg)

  num_labels = info['num_labels']
  start, report = plan.start(
      plan.model_def(mcfg, num_labels, s.seed), s.init_from, s.finetune, s.peft,
      max_len=s.data.max_len, num_layers=mcfg.num_layers)
  objective = plan.objective(num_labels, info.get('is_regression', False),
                             float(s.finetune.label_smoothing or 0.0))
  bs = settings.train.batch_size
  data = loop.Data(
      train_iter=plan.train_iter(tokenizer, train_arrays, bs, s.seed),
      eval_batches=loader_lib.eval_batches(dev_arrays, bs),
      summarize=s.kind.summary(dev_info, dev_arrays) if dev_arrays is not None else None,
      steps_per_epoch=per_epoch)
  hooks = test_hook(s.kind, test_arrays, test_info, bs) + plan.hooks(start.model_def,
                                                                      tokenizer, bs)
  out = loop.train(settings, workdir, start, objective, data, constants=plan.constants(s.mesh),
                   hooks=hooks)
  results = {**out.results, 'labels': info['label_names'], 'init_report': report,
             'steps_per_epoch': per_epoch}
  params = plan.finish(results, out.params, workdir, tokenizer)
  if not results['preempted']:
    try:
      onnx = _export(s, params, plan.export_trainable(start.trainable), mcfg, tokenizer,
                     workdir, info['label_names'],
                     plan.export_def(start.model_def, mcfg, num_labels))
    except OnnxMismatch as e:  # the run's results still go to results.json, with the check
      results['onnx'] = e.check
      write_results(workdir, results)
      raise
    if onnx:
      results['onnx'] = onnx
  write_results(workdir, results)
  return loop.Outcome(results, out.state)


def _export(s: Settings, params, trainable, mcfg, tokenizer, workdir, label_names,
            model_def) -> dict | None:
  id2label = dict(enumerate(label_names)) if label_names else None
  return export_trained(s.peft, s.export, params, trainable, mcfg, s.kind.head, workdir, tokenizer,
                        init_from=s.init_from, id2label=id2label, extra={'labels': label_names},
                        model_def=model_def, max_len=s.data.max_len)


def settings_class(cfg) -> type[Settings]:
  return NerSettings if cfg.get('stage') == 'finetune_ner' else ClsSettings
