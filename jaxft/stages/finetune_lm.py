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

import json
import math
import os

import jax
import numpy as np
from absl import logging

from jaxft import peft
from jaxft.data import completion as lm_data
from jaxft.data import loader as loader_lib
from jaxft.data.splits import pad_id as pad_id_of
from jaxft.models import build_model
from jaxft.models.decoding import DecodeSettings, strip
from jaxft.objectives.completion import completion_objective
from jaxft.train import init as init_lib
from jaxft.train import loop
from jaxft.train import metrics as metrics_lib
from jaxft.train.finetune import resolve_model_config, resolve_tokenizer, trainable_mask
from jaxft.train.state import ModelDef

DECODE_KEYS = ('method', 'max_new_tokens', 'num_beams', 'length_penalty', 'early_stopping',
               'temperature', 'top_k', 'top_p')


def decode_settings(gen_cfg, tokenizer) -> DecodeSettings | None:
  """DecodeSettings from a `generate` config section (None when generate.method is '')."""
  if gen_cfg is None or not gen_cfg.get('method', ''):
    return None
  eos = tokenizer.eos_token_id
  return DecodeSettings.from_dict({k: gen_cfg[k] for k in DECODE_KEYS if k in gen_cfg},
                                  eos_token_id=None if eos is None else int(eos),
                                  pad_token_id=pad_id_of(tokenizer))


def completion_texts(tokenizer, tokens, length, eos_id) -> list[str]:
  """Generated ids -> completion texts (EOS and what follows dropped, outer spaces stripped)."""
  out = []
  for ids in strip(tokens, length):
    if eos_id is not None and ids and ids[-1] == eos_id:
      ids = ids[:-1]
    out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
  return out


def ordered_valid(per: dict) -> dict:
  order = np.argsort(per['index'], kind='stable')
  keep = per['valid'][order] > 0
  return {k: v[order][keep] for k, v in per.items()}


def summarizer(tokenizer, references, eos_id, keep: dict | None = None):
  """(sums, per_example) -> eval metrics: loss, perplexity, and with generations BLEU, chrF,
  ROUGE-L against `references` (one list per distinct dev prompt, in prompt order)."""
  def summarize(sums, per):
    w = max(sums.get('weight', 0.0), 1e-9)
    out = {}
    if 'loss_sum' in sums:
      out.update(loss=sums['loss_sum'] / w, perplexity=math.exp(min(sums['loss_sum'] / w, 50.0)),
                 accuracy=sums['correct'] / w)
    if per:
      per = ordered_valid(per)
      texts = completion_texts(tokenizer, per['tokens'], per['length'], eos_id)
      out.update(metrics_lib.generation_metrics(texts, references))
      out['gen_length'] = float(np.mean(per['length']))
      if keep is not None:
        keep['texts'] = texts
    return out
  return summarize


def _loader(arrays, bs):
  return loader_lib.make_loader(arrays, global_batch_size=bs, seed=0, shuffle=False,
                                num_epochs=1, drop_remainder=True)


def write_generations(path: str, prompts, texts, scores: dict | None = None):
  """One JSON line per distinct prompt: {"input": prompt, "text": completion}."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for p, t in zip(prompts, texts):
      f.write(json.dumps({'input': p, 'text': t}, ensure_ascii=False) + '\n')
  logging.info('wrote %d generations to %s%s', len(texts), path,
               f' ({scores})' if scores else '')


def run(cfg, workdir: str) -> dict:
  tokenizer = resolve_tokenizer(cfg)
  mcfg = resolve_model_config(cfg, tokenizer)
  d = cfg.data
  max_len = int(d.max_len)
  if mcfg.model_type != 'gpt2':
    raise ValueError(f'finetune_lm needs a GPT-2 model, got model.type={mcfg.model_type!r}')
  if max_len > mcfg.max_position_embeddings:
    raise ValueError(f"data.max_len={max_len} exceeds the model's max_position_embeddings="
                     f'{mcfg.max_position_embeddings}')
  if len(tokenizer) > mcfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but the model vocabulary has '
                     f'{mcfg.vocab_size}: use the tokenizer the model was trained with')
  if bool(d.packing) and peft.enabled(cfg) and 'prompt' in peft.config(cfg).methods:
    raise ValueError('data.packing=True cannot be combined with peft.method=prompt (the soft '
                     'prompt is prepended per row, not per packed example)')
  pad = pad_id_of(tokenizer)
  enc = dict(template=d.template, completion_prefix=d.completion_prefix,
             append_eos=bool(d.append_eos), max_len=max_len, truncation=d.truncation)
  rows = dict(max_len=max_len, pad_id=pad, loss_on_prompt=bool(d.loss_on_prompt))

  train_pairs, dev_pairs, data_info = lm_data.load_splits(d)
  train_ex, train_stats = lm_data.encode_pairs(train_pairs, tokenizer, **enc)
  if bool(d.packing):  # a seeded order, so packed rows mix prompts
    order = np.random.RandomState(int(d.split_seed)).permutation(len(train_ex))
    train_ex = [train_ex[i] for i in order]
  train_arrays = lm_data.build_rows(train_ex, packing=bool(d.packing), **rows)
  bs = int(cfg.train.batch_size)
  n_rows = len(train_arrays['input_ids'])
  if n_rows < bs:
    raise ValueError(f'{n_rows} training rows < train.batch_size={bs}')
  steps_per_epoch = max(n_rows // bs, 1)
  if int(cfg.train.get('num_epochs', 0) or 0):
    cfg.train.num_steps = int(cfg.train.num_epochs) * steps_per_epoch
    logging.info('train.num_epochs=%d x %d steps per epoch -> %d steps', int(cfg.train.num_epochs),
                 steps_per_epoch, cfg.train.num_steps)

  settings = decode_settings(cfg.get('generate', None), tokenizer)
  dev_arrays = dev_prompts = references = prompt_rows = None
  if dev_pairs is not None and len(dev_pairs):
    dev_arrays = lm_data.pad_rows(lm_data.build_rows(
        lm_data.encode_pairs(dev_pairs, tokenizer, **enc)[0], packing=False, **rows), bs)
    dev_prompts, references, _ = lm_data.group_by_prompt(dev_pairs)
    if settings is not None:
      prompt_ids = lm_data.encode_prompts(dev_prompts, tokenizer, d.template)
      longest = max(len(p) for p in prompt_ids)
      if longest + settings.max_new_tokens > mcfg.max_position_embeddings:
        raise ValueError(f'the longest dev prompt ({longest} tokens) + generate.max_new_tokens='
                         f'{settings.max_new_tokens} exceeds max_position_embeddings='
                         f'{mcfg.max_position_embeddings}')
      prompt_rows = lm_data.prompt_arrays(prompt_ids, pad, bs)
  n_targets = lm_data.max_targets(train_arrays, dev_arrays)
  n_targets = min(n_targets, max_len)

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save_pretrained(os.path.join(workdir, 'tokenizer'))
  model_def = ModelDef.create(lambda: build_model(mcfg, 'clm', seed=int(cfg.seed)))
  init_params, report = None, None
  if cfg.init_from:
    init_params, report = init_lib.load_init(cfg.init_from, model_def)
    logging.info('init_from %s: %d tensors loaded; new: %s; dropped: %s', cfg.init_from,
                 report['loaded'], report['missing'], report['unused'])
  trainable = trainable_mask(cfg, model_def.abstract_params)
  peft_parts = peft.setup(cfg, model_def, init_params, trainable,
                          fresh=report['missing'] if report else ())
  if peft_parts is not None:
    model_def, init_params, trainable = peft_parts

  objective = completion_objective(max_targets=n_targets, decode_settings=settings,
                                   label_smoothing=float(cfg.get('finetune', {}).get(
                                       'label_smoothing', 0.0) or 0.0))
  es = cfg.train.early_stopping
  if not es.metric and dev_arrays is not None:
    es.metric, es.mode = ('bleu', 'max') if settings is not None else ('loss', 'min')
  if es.metric in metrics_lib.GENERATION_METRICS and settings is None:
    raise ValueError(f'train.early_stopping.metric={es.metric!r} is a generation metric: it '
                     "needs generate.method ('greedy', 'beam' or 'sample')")
  eos = tokenizer.eos_token_id
  last = {}

  def eval_batches():
    yield from _loader(dev_arrays, bs)
    if prompt_rows is not None:
      yield from _loader(prompt_rows, bs)

  data = loop.Data(
      train_iter=loader_lib.make_loader(train_arrays, global_batch_size=bs, seed=int(cfg.seed)),
      eval_batches=eval_batches if dev_arrays is not None else None,
      summarize=summarizer(tokenizer, references, eos, last) if dev_arrays is not None else None,
      steps_per_epoch=0)  # validation every train.eval_every steps (decoding is not free)

  def on_end(state, eval_step, mesh, rules):
    out = {'init_report': report, 'steps_per_epoch': steps_per_epoch, 'data': data_info,
           'train_encoding': train_stats, 'max_targets': n_targets}
    if prompt_rows is not None:  # the kept (best) parameters on every dev prompt
      keep = {}
      scores = loop.evaluate(eval_step, state['params'], _loader(prompt_rows, bs), mesh, rules,
                             summarizer(tokenizer, references, eos, keep))
      out['dev_generation'] = scores
      write_generations(os.path.join(workdir, 'generations.jsonl'), dev_prompts, keep['texts'],
                        scores)
    return out

  results = loop.train(cfg, workdir, model_def, objective, data, init_params=init_params,
                       trainable=trainable, on_end=on_end)
  if jax.process_index() == 0 and 'dev_generation' in results:
    g = results['dev_generation']
    print(f"finetune_lm: dev BLEU {g['bleu']:.2f}, chrF {g['chrf']:.2f}, ROUGE-L "
          f"{g['rouge_l']:.2f} on {len(dev_prompts)} prompts (step {results['step']}"
          f"{', best ' + str(results['best'].get('restored_step')) if 'best' in results else ''})")
  _export(cfg, workdir, results, peft_parts, trainable, mcfg, tokenizer)
  return results


def _export(cfg, workdir, results, peft_parts, trainable, mcfg, tokenizer):
  if results['preempted']:
    return
  params = results['state']['params']
  if peft_parts is not None:
    out = peft.save_checkpoint(cfg, params, trainable, workdir,
                               extra={'init_from': cfg.init_from, 'head': 'clm',
                                      'model': mcfg.to_dict()})
    logging.info('saved the PEFT weights to %s', out)
  if not cfg.export.hf:
    return
  from jaxft.train.pretrain import export_hf
  if peft_parts is not None and not peft.exportable(cfg):
    logging.warning('peft.method=%s cannot be merged into a plain Hugging Face model: no '
                    'export/ (the run is in checkpoints/, the PEFT weights in %s)',
                    cfg.peft.method, peft.checkpoint_dir(workdir, peft.config(cfg)))
    return
  if peft_parts is not None:
    params = peft.merged_params(cfg, params)
  export_hf(params, mcfg, 'clm', workdir, tokenizer)
