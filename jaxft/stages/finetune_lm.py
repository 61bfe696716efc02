"""Stage `finetune_lm`: causal-LM fine-tuning of GPT-2 on (prompt, completion) pairs.

  python -m jaxft.main --config configs/finetune_lm.py:e2e --workdir w/e2e

Data, loss and packing: `jaxft.data.completion` and `jaxft.objectives.completion`. Starts
from `init_from` (a jaxft workdir or an HF GPT-2 directory) or from random init; any PEFT
method (`peft.method`). Validation: the loss on the dev rows and, with `generate.method`
set, decoding of every distinct dev prompt inside the eval step, scored with BLEU / chrF /
ROUGE-L against all its completions; early stopping on any of them
(`train.early_stopping.metric`: bleu, chrf, rouge_l or loss). At the end the best
parameters generate for the dev prompts once more -> WORKDIR/generations.jsonl.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxft import config as config_lib
from jaxft import generation, sources
from jaxft.data import completion as lm_data
from jaxft.data import loader as loader_lib
from jaxft.data.splits import pad_id as pad_id_of
from jaxft.export import ExportSettings
from jaxft.finetuning import (ExportPlan, export_trained, init_trainable, model_and_tokenizer,
                              resolve_steps)
from jaxft.generation import DecodingSection
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.objectives.completion import completion_objective
from jaxft.peft import PeftConfig
from jaxft.train import loop
from jaxft.train.metrics import GENERATION_METRICS, write_results
from jaxft.train.optimizer import FreezeSettings
from jaxft.train.state import ModelDef

@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(loop.RunSettings):
  """finetune_lm: the config's keys."""
  init_from: str = ''
  model: ModelConfig  # the architecture when there is no init_from; its runtime fields always
  data: lm_data.CompletionData
  generate: DecodingSection  # validation decoding ('' method: loss only)
  finetune: FreezeSettings
  peft: PeftConfig
  export: ExportSettings

  def __post_init__(self):
    object.__setattr__(self, 'peft', dataclasses.replace(self.peft, seed=self.seed))
    if not self.init_from and self.model.model_type != 'gpt2':
      raise config_lib.ConfigError(f'finetune_lm needs a GPT-2 model, got model.type='
                                   f'{self.model.model_type!r}')
    if not self.init_from and self.data.max_len > self.model.max_position_embeddings:
      raise config_lib.ConfigError(f'data.max_len={self.data.max_len} exceeds model.'
                                   f'max_position_embeddings={self.model.max_position_embeddings}')
    if self.data.packing and 'prompt' in self.peft.methods:
      raise config_lib.ConfigError('data.packing=True cannot be combined with peft.method='
                                   'prompt (the soft prompt is prepended per row, not per packed '
                                   'example)')
    metric = self.train.early_stopping.metric.removeprefix('eval/')
    if metric in GENERATION_METRICS and not self.generate.method:
      raise config_lib.ConfigError(f'train.early_stopping.metric={metric!r} is a generation '
                                   "metric: it needs generate.method ('greedy', 'beam' or "
                                   "'sample')")


def run(s: Settings, workdir: str) -> dict:
  return finetune_lm(s, workdir).results


@dataclasses.dataclass
class _Dev:
  """The validation side: loss rows, and the distinct prompts to decode with their
  references (None without decoding)."""
  arrays: dict | None = None
  prompts: list | None = None
  references: list | None = None
  prompt_rows: dict | None = None


def _rows(d: lm_data.CompletionData, tokenizer, pairs, packing: bool, seed: int | None = None):
  enc, stats = lm_data.encode_pairs(pairs, tokenizer, template=d.template,
                                    completion_prefix=d.completion_prefix,
                                    append_eos=d.append_eos, max_len=d.max_len,
                                    truncation=d.truncation, delexicalize=d.delexicalize)
  if packing and seed is not None:  # a seeded order, so packed rows mix prompts
    order = np.random.RandomState(seed).permutation(len(enc))
    enc = [enc[i] for i in order]
  return lm_data.build_rows(enc, max_len=d.max_len, pad_id=pad_id_of(tokenizer),
                            loss_on_prompt=d.loss_on_prompt, packing=packing), stats


def _dev(d: lm_data.CompletionData, tokenizer, dev_pairs, decode, bs: int, mcfg) -> _Dev:
  if dev_pairs is None or not len(dev_pairs):
    return _Dev()
  dev = _Dev(arrays=lm_data.pad_rows(_rows(d, tokenizer, dev_pairs, False)[0], bs))
  dev.prompts, dev.references, sources_ = lm_data.group_by_prompt(dev_pairs)
  if decode is not None:
    prompt_ids = lm_data.encode_prompts(dev.prompts, tokenizer, d.template, d.delexicalize)
    generation.check_room(prompt_ids, decode, mcfg.max_position_embeddings, sources_)
    dev.prompt_rows = lm_data.prompt_arrays(prompt_ids, pad_id_of(tokenizer), bs)
  return dev


def _default_metric(train: loop.TrainSettings, has_dev: bool, decodes: bool):
  """Early stopping on BLEU with decoding, else on the loss, unless a metric is set."""
  if train.early_stopping.metric or not has_dev:
    return train
  metric, mode = ('bleu', 'max') if decodes else ('loss', 'min')
  es = dataclasses.replace(train.early_stopping, metric=metric, mode=mode)
  return dataclasses.replace(train, early_stopping=es)


def _loader(arrays, bs):
  return loader_lib.make_loader(arrays, global_batch_size=bs, seed=0, shuffle=False,
                                num_epochs=1, drop_remainder=True)


def _eval_batches(dev: _Dev, bs: int):
  def batches():
    yield from _loader(dev.arrays, bs)
    if dev.prompt_rows is not None:
      yield from _loader(dev.prompt_rows, bs)
  return batches


def _generation_hook(dev: _Dev, tokenizer, bs: int, workdir: str,
                     score_kw: dict) -> list[loop.Hook]:
  """At the end, the kept (best) parameters decode every dev prompt once more ->
  WORKDIR/generations.jsonl; the scores are results['dev_generation']."""
  if dev.prompt_rows is None:
    return []

  def generate(trained: loop.Trained) -> dict:
    keep = {}
    scores = trained.evaluate(_loader(dev.prompt_rows, bs),
                              generation.summarizer(tokenizer, dev.references, keep, **score_kw))
    generation.write_slot_errors(workdir, dev.prompts, keep['texts'], keep['failing'], scores)
    generation.write_generations(os.path.join(workdir, generation.GENERATIONS), dev.prompts,
                                 keep['texts'], scores)
    return scores

  return [loop.Hook('dev_generation', generate)]


def _init(s: Settings, source, mcfg, workdir: str, tokenizer):
  """(the loop's Start, the init report), PEFT applied."""
  sources.save_tokenizer(tokenizer, workdir, mcfg.max_position_embeddings)
  sources.record_model(workdir, mcfg)
  model_def = ModelDef.create(lambda: build_model(mcfg, 'clm', seed=s.loop.seed))
  return init_trainable(model_def, source, s.finetune, s.peft, max_len=s.data.max_len,
                        num_layers=mcfg.num_layers)


def finetune_lm(s: Settings, workdir: str) -> loop.Outcome:
  """The stage, returning the state it ends with (on device) beside the results."""
  d = s.data
  source = sources.resolve_optional(s.init_from)
  mcfg, tokenizer = model_and_tokenizer(source, s.model, d.tokenizer, d.max_len)
  if mcfg.model_type != 'gpt2':
    raise ValueError(f'finetune_lm needs a GPT-2 model; {s.init_from} holds '
                     f'{mcfg.model_type!r}')
  decode = generation.decode_settings(s.generate, tokenizer)
  train_pairs, dev_pairs, data_info = lm_data.load_splits(d)
  train_arrays, train_stats = _rows(d, tokenizer, train_pairs, d.packing, d.split_seed)
  train, per_epoch = resolve_steps(s.loop.train, len(train_arrays['input_ids']))
  train = _default_metric(train, dev_pairs is not None and len(dev_pairs) > 0,
                          decode is not None)
  bs = train.batch_size
  dev = _dev(d, tokenizer, dev_pairs, decode, bs, mcfg)
  n_targets = min(lm_data.max_targets(train_arrays, dev.arrays), d.max_len)
  start, report = _init(s, source, mcfg, workdir, tokenizer)
  objective = completion_objective(max_targets=n_targets, decode_settings=decode,
                                   label_smoothing=float(s.finetune.label_smoothing or 0.0))
  score_kw = dict(prompts=dev.prompts, delexicalize=d.delexicalize, rerank=s.generate.rerank,
                  known_prompts=train_pairs.prompts)  # slot errors (jaxft.train.slot_errors)
  data = loop.Data(
      train_iter=loader_lib.make_loader(train_arrays, global_batch_size=bs, seed=s.loop.seed),
      eval_batches=_eval_batches(dev, bs) if dev.arrays is not None else None,
      summarize=(generation.summarizer(tokenizer, dev.references, **score_kw)
                 if dev.arrays is not None else None),
      steps_per_epoch=0)  # validation every train.eval_every steps (decoding is not free)
  out = loop.train(dataclasses.replace(s.loop, train=train), workdir, start, objective, data,
                   hooks=_generation_hook(dev, tokenizer, bs, workdir, score_kw))
  results = {**out.results, 'init_report': report, 'steps_per_epoch': per_epoch,
             'data': data_info, 'train_encoding': train_stats, 'max_targets': n_targets}
  g = results.get('dev_generation')
  if g and loop.is_main():
    print(f"finetune_lm: dev BLEU {g['bleu']:.2f}, chrF {g['chrf']:.2f}, ROUGE-L "
          f"{g['rouge_l']:.2f}{generation.ser_text(g)} on {len(dev.prompts)} prompts (step "
          f"{results['step']}, kept step "
          f"{results.get('best', {}).get('restored_step', results['step'])})")
  if not results['preempted']:
    plan = ExportPlan(s.peft, s.export, mcfg, 'clm', tokenizer, init_from=s.init_from)
    export_trained(plan, out.params, start.trainable, None, workdir)
  write_results(workdir, results)
  return loop.Outcome(results, out.state)

