"""Stages `finetune_cls` (GLUE-style sequence classification / regression), `finetune_ner`
and `finetune_qa` (extractive question answering, SQuAD): one flow, the kind (jaxft.kinds)
says what differs.

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
from jaxft.data import qa as qa_data
from jaxft.data import loader as loader_lib
from jaxft.export import ExportSettings, OnnxMismatch, check_onnx
from jaxft.finetuning import (ExportPlan, export_trained, load_split, model_and_tokenizer,
                              test_hook, with_default_metric)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class QaSettings(ClsSettings):
  """finetune_qa: the config's keys."""
  data: qa_data.QaData

  kind = kinds.QA


Settings = ClsSettings | NerSettings | QaSettings
_BY_STAGE = {'finetune_ner': NerSettings, 'finetune_qa': QaSettings}


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
  source = sources.resolve_optional(s.init_from)
  mcfg, tokenizer = model_and_tokenizer(source, s.model, s.data.tokenizer, s.data.max_len)
  if mcfg.model_type not in s.kind.model_types:
    raise ValueError(f'{s.stage} supports model.type={"|".join(s.kind.model_types)}, got '
                     f'{mcfg.model_type!r}')
  train_arrays, info = load_split(s.kind, s.data, tokenizer, 'train')
  dev_arrays, dev_info = load_split(s.kind, s.data, tokenizer, 'dev')
  test_arrays, test_info = load_split(s.kind, s.data, tokenizer, 'test')
  plan = continual.plan(s.continual, s.kind, mcfg, s.data.max_len, s.seed)
  train, per_epoch = plan.resolve_steps(s.train, len(train_arrays['input_ids']))
  settings = dataclasses.replace(
      s.loop, train=with_default_metric(train, info if dev_arrays is not None else None))
  sources.save_tokenizer(tokenizer, workdir, mcfg.max_position_embeddings)
  sources.save_labels(workdir, sources.TaskInfo.of_data(s.kind.name, info, mcfg))
  sources.record_model(workdir, mcfg)

  num_labels = info['num_labels']
  start, report = plan.start(
      plan.model_def(mcfg, num_labels, s.seed), source, s.finetune, s.peft,
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
      exported = ExportPlan(s.peft, s.export, mcfg, s.kind.head, tokenizer,
                            init_from=s.init_from, label_names=info['label_names'],
                            max_len=s.data.max_len)
      onnx = export_trained(exported, params, plan.export_trainable(start.trainable),
                            plan.export_def(start.model_def, mcfg, num_labels), workdir)
    except OnnxMismatch as e:  # the run's results still go to results.json, with the check
      results['onnx'] = e.check
      write_results(workdir, results)
      raise
    if onnx:
      results['onnx'] = onnx
  write_results(workdir, results)
  return loop.Outcome(results, out.state)


def settings_class(cfg) -> type[Settings]:
  return _BY_STAGE.get(cfg.get('stage'), ClsSettings)
