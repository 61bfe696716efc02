"""Stage `generate`: a fine-tuned GPT-2 (a `finetune_lm` workdir or an HF directory) completes
every distinct prompt of a file -> WORKDIR/generations.jsonl, scored when it has references.

  python -m jaxft.main --config configs/generate.py --config.init_from=FINETUNE_LM_WORKDIR \
      --config.generate.input=data/e2e/devset-slice.csv --workdir out

The input is a csv / tsv / jsonl file of the kind the model was trained on, or a txt file
with one prompt per line. The prompt column, completion column, template and completion
prefix come from the workdir's config (`data.*` here overrides them; for an HF directory
they are taken from `data.*`). Rows sharing a prompt give one output, scored against all
their completions (BLEU, chrF, ROUGE-L in results.json). Decoding: `generate.*`
(docs/generation.md), batched and jitted with a KV cache; prompts are left-padded to the
longest one, so a single compile serves the file and each output is what that prompt gives
alone (sampling draws from a key per input, fold_in(seed, index)).
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxft import peft
from jaxft.data import completion as lm_data
from jaxft.data.splits import pad_id as pad_id_of
from jaxft.models import build_model
from jaxft.models.decoding import decode
from jaxft.stages.finetune_lm import completion_texts, decode_settings, write_generations
from jaxft.train import init as init_lib
from jaxft.train import metrics as metrics_lib
from jaxft.train.finetune import resolve_model_config, resolve_tokenizer
from jaxft.train.state import ModelDef

TEXT_KEYS = ('prompt_column', 'completion_column', 'template', 'completion_prefix', 'format')


def load_lm(cfg):
  """(model_def, params, mcfg, tokenizer, trained data config) of init_from; a PEFT workdir
  is rebuilt with its PEFT modules. A source that lacks any tensor of the model is refused:
  generating from freshly initialised weights would be a silent wrong result."""
  src = cfg.init_from
  if not src:
    raise ValueError('generate needs init_from: a finetune_lm workdir or an HF GPT-2 directory')
  tokenizer = resolve_tokenizer(cfg)
  mcfg = resolve_model_config(cfg, tokenizer)
  if mcfg.model_type != 'gpt2':
    raise ValueError(f'generate needs a GPT-2 model; {src} holds {mcfg.model_type!r}')
  model_def = ModelDef.create(lambda: build_model(mcfg, 'clm'))
  trained = {}
  if init_lib.is_jaxft_workdir(src):
    wcfg = ml_collections.ConfigDict(init_lib.workdir_config(src))
    trained = wcfg.get('data', {}).to_dict() if 'data' in wcfg else {}
    if 'peft' in wcfg and peft.enabled(wcfg):
      model_def = peft.setup(wcfg, model_def)[0]
  params, report = init_lib.load_init(src, model_def, which=cfg.generate.checkpoint)
  if report['missing']:
    raise ValueError(f'{src} lacks {len(report["missing"])} tensors of a GPT-2 LM (e.g. '
                     f'{report["missing"][:3]}): not a causal-LM checkpoint')
  return model_def, params, mcfg, tokenizer, trained


def text_settings(cfg, trained: dict) -> dict:
  """data.* here when set, else the trained run's, else the defaults."""
  out = {}
  for k in TEXT_KEYS:
    mine = cfg.data.get(k, '') if 'data' in cfg else ''
    out[k] = mine if mine else trained.get(k) or lm_data.DEFAULTS[k]
  return out


def read_inputs(path: str, ts: dict):
  """(distinct prompts, their references or None, first source of each)."""
  pairs = lm_data.read_pairs_file(path, prompt_column=ts['prompt_column'],
                                  completion_column=ts['completion_column'] or None,
                                  fmt=ts['format'], require_completion=False)
  prompts, refs, sources = lm_data.group_by_prompt(pairs)
  return prompts, (refs if pairs.completions is not None else None), sources


def generate_ids(model_def, params, prompt_ids, settings, *, batch_size: int, pad_id: int,
                 seed: int):
  """Decode `prompt_ids` (token lists) in fixed-shape batches: [(tokens, length)] per prompt."""
  length = max(len(p) for p in prompt_ids)
  fn = jax.jit(lambda p, ids, mask, keys: decode(model_def.merge(p), ids, mask, settings, keys))
  params = jax.device_put(params)  # once, not with every batch
  base = jax.random.key(seed)
  tokens, lengths = [], []
  for start in tqdm(range(0, len(prompt_ids), batch_size), desc='generate', unit='batch',
                    disable=jax.process_index() != 0):
    arr = lm_data.prompt_arrays(prompt_ids[start:start + batch_size], pad_id, batch_size, length)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(arr['index'] + start)
    out = jax.device_get(fn(params, arr['prompt_ids'], arr['prompt_mask'], keys))
    n = int(arr['valid'].sum())
    tokens.append(np.asarray(out['tokens'])[:n])
    lengths.append(np.asarray(out['length'])[:n])
  return np.concatenate(tokens), np.concatenate(lengths)


def run(cfg, workdir: str) -> dict:
  t0 = time.time()
  g = cfg.generate
  if not g.input:
    raise ValueError('set generate.input: a csv / tsv / jsonl / txt file of prompts')
  model_def, params, mcfg, tokenizer, trained = load_lm(cfg)
  ts = text_settings(cfg, trained)
  settings = decode_settings(g, tokenizer)
  if settings is None:
    raise ValueError("generate.method is empty; choose 'greedy', 'beam' or 'sample'")
  prompts, refs, sources = read_inputs(g.input, ts)
  if not prompts:
    raise ValueError(f'{g.input}: no prompts')
  prompt_ids = lm_data.encode_prompts(prompts, tokenizer, ts['template'])
  room = mcfg.max_position_embeddings - settings.max_new_tokens
  too_long = [i for i, p in enumerate(prompt_ids) if len(p) > room]
  if too_long:
    i = too_long[0]
    raise ValueError(f'{sources[i]}: the prompt has {len(prompt_ids[i])} tokens; with '
                     f'generate.max_new_tokens={settings.max_new_tokens} at most {room} fit the '
                     f'model ({len(too_long)} such prompts)')
  t1 = time.time()
  tokens, lengths = generate_ids(model_def, params, prompt_ids, settings,
                                 batch_size=int(g.batch_size), pad_id=pad_id_of(tokenizer),
                                 seed=int(cfg.seed))
  dt = time.time() - t1
  texts = completion_texts(tokenizer, tokens, lengths, tokenizer.eos_token_id)
  results = {'stage': 'generate', 'init_from': cfg.init_from, 'input': g.input,
             'n_inputs': len(prompts), 'decoding': settings.__dict__,
             'new_tokens': int(lengths.sum()), 'decode_sec': dt,
             'tokens_per_sec': float(lengths.sum() / max(dt, 1e-9)),
             'wall_time_sec': time.time() - t0}
  if refs is not None:
    results['scores'] = metrics_lib.generation_metrics(texts, refs)
  out = g.output or os.path.join(workdir, 'generations.jsonl')
  write_generations(out, prompts, texts, results.get('scores'))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
    s = results.get('scores')
    print(f'generate: {len(prompts)} inputs -> {out}'
          + (f"; BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f}, ROUGE-L {s['rouge_l']:.2f}"
             if s else ''))
  return results
