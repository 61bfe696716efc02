"""Stage `cloze`: PET-style classification with a pretrained MLM head (jaxft.objectives.cloze).

  python -m jaxft.main --config configs/peft_cloze.py:sst2 --config.init_from=MLM_DIR \\
      --workdir /tmp/cloze [--config.cloze.num_shots=16] [--config.peft.method=lora]

Zero-shot cloze evaluation of init_from, then (cloze.num_shots > 0) few-shot training of it
on that many examples per class, full or PEFT, evaluated the same way. `init_from` must
carry a pretrained MLM head (a jaxft pretrain_mlm workdir or an HF BertForMaskedLM
directory): a missing head would make the zero-shot scores random.
"""
from __future__ import annotations

import dataclasses
import os

from absl import logging

from jaxft import config as config_lib
from jaxft import finetuning, sources
from jaxft import peft as peft_lib
from jaxft.data import loader as loader_lib
from jaxft.data.classification import ClsData
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.objectives import cloze as cloze_lib
from jaxft.peft import PeftConfig
from jaxft.train import loop
from jaxft.train import metrics as metrics_lib
from jaxft.train.metrics import write_results
from jaxft.train.state import ModelDef

@dataclasses.dataclass(frozen=True)
class ClozeSettings:
  """The `cloze` config section."""
  template: str = '{text} It was [MASK].'  # {text} / {pair}: the example; one [MASK]
  verbalizer: str = ''   # 'label:word,word;label:word' (label names or raw values)
  eval_split: str = 'dev'
  max_eval: int = 0      # > 0: score only the first N eval examples
  num_shots: int = 0     # > 0: also train on N examples per class (PET) and re-evaluate


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(loop.RunSettings):
  """cloze: the config's keys."""
  init_from: str = ''
  cloze: ClozeSettings
  model: ModelConfig
  data: ClsData
  peft: PeftConfig

  def __post_init__(self):
    object.__setattr__(self, 'peft', dataclasses.replace(self.peft, seed=self.seed))
    if not self.init_from:
      raise config_lib.ConfigError('cloze needs init_from: a pretrained MLM (jaxft workdir or '
                                   'HF directory)')


def _summary(metric_names, with_predictions: bool):
  def summarize(sums, per):
    per = loader_lib.ordered(per)
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)}
    out.update(metrics_lib.glue_metrics(metric_names, per['logits'], per['labels']))
    if with_predictions:
      out['predictions'] = per['logits'].argmax(-1).astype(int).tolist()
    return out
  return summarize


def run(s: Settings, workdir: str) -> dict:
  c = s.cloze
  source = sources.resolve_optional(s.init_from)
  mcfg, tokenizer = finetuning.model_and_tokenizer(source, s.model, s.data.tokenizer,
                                                   s.data.max_len)
  if mcfg.model_type != 'bert':
    raise ValueError(f'cloze needs a BERT masked LM, got model type {mcfg.model_type!r}')
  texts, pairs, labels, names, values = cloze_lib.read_split(s.data, c.eval_split)
  verbalizer = cloze_lib.parse_verbalizer(c.verbalizer, names, values)
  ids = cloze_lib.verbalizer_ids(verbalizer, tokenizer)
  if c.max_eval:
    texts, labels = texts[:c.max_eval], labels[:c.max_eval]
    pairs = pairs[:c.max_eval] if pairs is not None else None
  dev = cloze_lib.encode(texts, c.template, tokenizer, s.data.max_len, pairs)
  dev['labels'] = labels
  metric_names = ['accuracy', 'f1'] if len(names) == 2 else ['accuracy', 'f1_macro']

  model_def = ModelDef.create(lambda: build_model(mcfg, 'mlm', seed=s.loop.seed))
  init_params, report = source.load_init(model_def)
  head_missing = [n for n in report['missing'] if n.startswith(cloze_lib.MLM_HEAD)]
  if head_missing:
    raise ValueError(f'init_from={s.init_from!r} has no pretrained MLM head (missing '
                     f'{head_missing}): cloze scoring would be random. Use a pretrain_mlm '
                     'workdir or a BertForMaskedLM checkpoint')
  objective = cloze_lib.cloze(ids)
  results = {'template': c.template, 'verbalizer': dict(zip(names, map(list, verbalizer))),
             'labels': names, 'n_eval': len(texts)}
  results['zero_shot'] = _zero_shot(s, model_def, init_params, objective, dev, metric_names)
  if c.num_shots:
    results['few_shot'] = _few_shot(s, workdir, tokenizer, model_def, init_params, report,
                                    objective, dev, metric_names)
  write_results(workdir, results)
  for k in ('zero_shot', 'few_shot'):
    if k in results and loop.is_main():
      print(f'cloze {k}: ' + ', '.join(f'{m}={v:.4f}' for m, v in results[k].items()
                                       if isinstance(v, float)))
  return results


def _zero_shot(s: Settings, model_def, init_params, objective, dev, metric_names) -> dict:
  model = loop.place(s.mesh, model_def, init_params)
  zs = model.evaluate(objective, loader_lib.eval_batches(dev, s.train.batch_size)(),
                      _summary(metric_names, True))
  logging.info('cloze zero-shot on %s: %s', s.cloze.eval_split,
               {k: v for k, v in zs.items() if k != 'predictions'})
  return zs


def _few_shot(s: Settings, workdir, tokenizer, model_def, init_params, report, objective, dev,
              metric_names) -> dict:
  c, bs = s.cloze, s.loop.train.batch_size
  tr_texts, tr_pairs, tr_labels, _, _ = cloze_lib.read_split(s.data, 'train')
  idx = cloze_lib.few_shot_indices(tr_labels, c.num_shots, s.loop.seed)
  train = cloze_lib.encode([tr_texts[i] for i in idx], c.template, tokenizer, s.data.max_len,
                           [tr_pairs[i] for i in idx] if tr_pairs is not None else None)
  train['labels'] = tr_labels[idx]
  if len(idx) < bs:
    raise ValueError(f'{len(idx)} few-shot examples < train.batch_size={bs}')
  parts = peft_lib.setup(s.peft, model_def, init_params, None, fresh=report['missing'],
                         max_len=s.data.max_len)
  fdef, finit, trainable = parts if parts else (model_def, init_params, None)
  data = loop.Data(train_iter=loader_lib.make_loader(train, global_batch_size=bs, seed=s.loop.seed),
                   eval_batches=loader_lib.eval_batches(dev, bs),
                   summarize=_summary(metric_names, False))
  few_dir = os.path.join(workdir, 'few_shot')
  out = loop.train(s.loop, few_dir, loop.Start(fdef, finit, trainable), objective, data)
  write_results(few_dir, out.results)
  fs = out.results
  if parts is not None:
    peft_lib.save_checkpoint(s.peft, out.params, trainable, few_dir)
  return {'shots_per_class': c.num_shots, 'n_train': int(len(idx)),
          'peft': '+'.join(s.peft.methods) or 'none', 'trainable_params': fs['trainable_params'],
          'trainable_percent': fs['trainable_percent'],
          **{k.removeprefix('eval/'): v for k, v in fs['final'].items()}}
