"""The Hugging Face `peft` adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Written here without importing `peft` or `torch` (neither is a runtime dependency), under
the names `peft` itself saves (checked against peft 0.21: tests/test_peft_export.py loads
each export with `peft.PeftModel.from_pretrained`, saves it back with `save_pretrained`
and compares the two files). Module names come from the same table that exports the base
model (`hf.hf_slots`), so the adapter names exactly the modules of the `base/` export.

What peft can hold, and what it cannot (`NotRepresentable` says which and why):
- LoRA alone (any targets; the trained task head and any other trained module that carries
  no LoRA go to `modules_to_save`). GPT-2's q, k, v are one fused `c_attn` Conv1D in HF:
  LoRA on n of them becomes one LoRA of rank n*r on c_attn, A = [A_q; A_v] and a block
  B with zero rows for the untouched part, alpha n*alpha (the same alpha/r scale).
- LoRA on BERT question answering (head 'qa') with task_type null, not QUESTION_ANS: peft's
  QA model drops token_type_ids (QA_NOTE).
- Prompt tuning alone on GPT-2 (prompt before every token in jaxft and in peft). BERT
  prompts are not: jaxft inserts them after [CLS] so the pooler still reads [CLS]; peft
  prepends them, which would pool a virtual token instead.
- Not: Houlsby adapters (peft has no bottleneck adapter), BitFit (no peft method; the merged
  plain model is exact), or combinations (a peft adapter is one method), nor LoRA whose
  adapted module also has a trained bias or kernel (peft cannot both wrap and save one).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from jaxft.models import flat_params, hf
from jaxft.peft.checkpoint import is_peft_name, strip_peft
from jaxft.peft.config import PeftConfig

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
# No 'qa': QUESTION_ANS (peft 0.22) makes PeftModelForQuestionAnswering, whose forward does
# not pass token_type_ids (nor position_ids) to the model, so a BERT question + context pair
# would run with every token in segment 0: other logits, silently. task_type None gives the
# plain PeftModel, which passes every input (QA_NOTE; tests/test_qa_model.py).
TASK_TYPES = {'cls': 'SEQ_CLS', 'token_cls': 'TOKEN_CLS', 'clm': 'CAUSAL_LM'}
QA_NOTE = ('the adapter\'s task_type is null, not QUESTION_ANS: peft\'s '
           'PeftModelForQuestionAnswering drops token_type_ids (the question / context segments), '
           'so it would compute other start / end logits; PeftModel.from_pretrained on an '
           'AutoModelForQuestionAnswering gives the plain PeftModel, which passes every input '
           '(its output has start_logits and end_logits)')
HEAD_MODULES = ('classifier', 'score')  # peft adds these to modules_to_save for SEQ/TOKEN_CLS


class NotRepresentable(ValueError):
  """The run's PEFT model has no exact form as a Hugging Face peft adapter (message: why)."""


def why_not(pcfg: PeftConfig, model_type: str, head: str) -> str | None:
  methods = set(pcfg.methods)
  if len(methods) > 1:
    return (f'peft.method={"+".join(pcfg.methods)}: a Hugging Face peft adapter holds one '
            'method; use the merged model (LoRA+BitFit) or the jaxft-peft checkpoint')
  if methods == {'adapter'}:
    return ('Houlsby adapters (y + up(act(down(y))) after a sub-layer): Hugging Face peft '
            'has no bottleneck adapter method, and the adapter is non-linear so it cannot be '
            'merged into a plain transformers model either')
  if methods == {'bitfit'}:
    return 'BitFit has no peft method; the merged plain model holds it exactly'
  if methods == {'prompt'} and model_type != 'gpt2':
    return ('prompt tuning on BERT: jaxft inserts the soft prompt after [CLS] (the pooler and '
            'the heads still read [CLS]); peft prepends it before [CLS], so its pooler would '
            'read a virtual token: a different model')
  if methods == {'prompt'} and head not in ('clm', 'cls'):
    return f'prompt tuning with head {head!r}: peft inserts prompts only in its task models'
  return None


def _hf_modules(sd: dict) -> set[str]:
  """Every module path of an HF model (all proper prefixes of its tensor names)."""
  out = set()
  for name in sd:
    parts = name.split('.')
    out.update('.'.join(parts[:i]) for i in range(1, len(parts)))
  return out


def _peft_matches(targets: list[str], modules: set[str]) -> set[str]:
  """The modules peft's list form of target_modules selects (exact name or '.'+suffix)."""
  return {m for m in modules if any(m == t or m.endswith('.' + t) for t in targets)}


def target_modules(adapted: set[str], modules: set[str]) -> list[str]:
  """The shortest target_modules list that selects exactly `adapted` among `modules`: leaf
  names ('query', 'value'), then names inside a layer ('attention.output.dense'), then
  full paths."""
  layer = re.compile(r'^.*?\.(?:layer|h)\.\d+\.')
  for cut in (lambda m: m.rsplit('.', 1)[-1], lambda m: layer.sub('', m), lambda m: m):
    names = sorted({cut(m) for m in adapted})
    if _peft_matches(names, modules) == adapted:
      return names
  raise AssertionError('full module paths always select exactly themselves')


def _patterns(ranks: dict[str, int], r: int) -> dict[str, int]:
  """rank_pattern for the modules whose rank is not `r` (peft matches a key as the regex
  `(.*\\.)?(key)$` against the module path): their leaf name when it picks exactly them,
  else each escaped path."""
  odd = {m: k for m, k in ranks.items() if k != r}
  out = {}
  for k in sorted(set(odd.values())):
    group = {m for m, v in odd.items() if v == k}
    leaves = {m.rsplit('.', 1)[-1] for m in group}
    pick = lambda key: {m for m in ranks if re.match(rf'(.*\.)?({key})$', m)}
    if len(leaves) == 1 and pick(next(iter(leaves))) == group:
      out[next(iter(leaves))] = k
    else:
      out.update({re.escape(m): k for m in sorted(group)})
  return out


def _lora_pair(a: np.ndarray, b: np.ndarray):
  """jaxft lora_a [*in, r], lora_b [r, *out] -> [fan_in, r], [r, fan_out] (fp32)."""
  r = a.shape[-1]
  return (np.asarray(a, np.float32).reshape(-1, r), np.asarray(b, np.float32).reshape(r, -1))


def _lora_tensors(flat: dict, slots: dict) -> tuple[dict, dict[str, int]]:
  """({'<module>.lora_A.weight' ...}, {module: rank}) with fused q/k/v parts stacked."""
  by_module: dict[str, list] = {}
  for name in sorted(flat):
    if name.endswith('.lora_a'):
      host = name[:-len('.lora_a')]
      slot = slots[host + '.kernel']
      by_module.setdefault(slot.module, []).append((slot, *_lora_pair(flat[name],
                                                                      flat[host + '.lora_b'])))
  tensors, ranks = {}, {}
  for module, parts in by_module.items():
    parts.sort(key=lambda p: p[0].part)
    if parts[0][0].kind == hf.QKV_W:  # one c_attn for q|k|v: block-diagonal over the parts
      r, width = parts[0][2].shape
      a = np.concatenate([p[1] for p in parts], axis=1)
      b = np.zeros((r * len(parts), 3 * width), np.float32)
      for i, (slot, _, bi) in enumerate(parts):
        b[i * r:(i + 1) * r, slot.part * width:(slot.part + 1) * width] = bi
    else:
      (_, a, b), = parts
    tensors[f'{module}.lora_A.weight'] = np.ascontiguousarray(a.T)   # torch Linear [r, in]
    tensors[f'{module}.lora_B.weight'] = np.ascontiguousarray(b.T)   # [out, r]
    ranks[module] = a.shape[1]
  return tensors, ranks


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def adapter(pcfg: PeftConfig, params, trainable, mcfg, head: str, *,
            base_model_name_or_path: str | None = None) -> tuple[dict, dict, list[str]]:
  """(adapter_config, {tensor name: fp32 array}, notes) of the run as a peft adapter, or
  NotRepresentable. `params`: the trained PEFT tree (host); `trainable`: its mask."""
  why = why_not(pcfg, mcfg.model_type, head)
  if why:
    raise NotRepresentable(why)
  flat = {n: np.asarray(x) for n, x in flat_params(params).items()}
  mask = flat_params(trainable)
  base = strip_peft(params)
  sd = hf.to_hf_state_dict(base, head)
  slots = hf.hf_slots(base, head)
  trained = {slots[n].module for n in flat if mask[n] and not is_peft_name(n)}
  common = dict(task_type=TASK_TYPES.get(head), base_model_name_or_path=base_model_name_or_path,
                revision=None, inference_mode=True)
  if pcfg.methods == ('prompt',):
    return _prompt(flat, sd, trained, mcfg, head, common)
  config, tensors, notes = _lora(pcfg, flat, sd, slots, trained, mcfg, common)
  return config, tensors, notes + ([QA_NOTE] if head == 'qa' else [])


def _saved(sd: dict, modules, prefix: str) -> dict:
  """The tensors peft writes for `modules_to_save`: each module's own params, full values."""
  return {f'{prefix}{k}': np.ascontiguousarray(v) for k, v in sd.items()
          if k.rsplit('.', 1)[0] in modules}


def _lora(pcfg, flat, sd, slots, trained, mcfg, common):
  lora, ranks = _lora_tensors(flat, slots)
  clash = sorted(trained & set(ranks))
  if clash:
    raise NotRepresentable(f'modules {clash} carry LoRA and also trained tensors of their own '
                           '(e.g. BitFit biases, train_patterns): peft cannot both wrap and save '
                           'a module; use the merged model or the jaxft-peft checkpoint')
  modules = _hf_modules(sd)
  keep = sorted(trained)
  tensors = {f'base_model.model.{k}': v for k, v in lora.items()}
  tensors.update(_saved(sd, trained, 'base_model.model.'))
  r = pcfg.lora_rank
  rank_pattern = _patterns(ranks, r)
  config = dict(
      peft_type='LORA', **common, r=r, lora_alpha=_number(pcfg.lora_alpha),
      lora_dropout=pcfg.lora_dropout, target_modules=target_modules(set(ranks), modules),
      fan_in_fan_out=mcfg.model_type == 'gpt2',  # GPT-2 Conv1D [in, out]
      bias='none', use_rslora=False, use_dora=False, modules_to_save=keep or None,
      init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
      rank_pattern=rank_pattern,
      alpha_pattern={k: _number(pcfg.lora_alpha * (v // r)) for k, v in rank_pattern.items()})
  return config, tensors, []


def _prompt(flat, sd, trained, mcfg, head, common):
  extra = sorted(trained - set(HEAD_MODULES))
  if extra:
    raise NotRepresentable(f'prompt tuning that also trained {extra}: only the soft prompt and '
                           'the task head are exported in peft format')
  prompt = np.ascontiguousarray(np.asarray(flat['prompt'], np.float32))
  tensors = {'prompt_embeddings': prompt}
  tensors.update(_saved(sd, trained, 'base_model.'))
  config = dict(
      peft_type='PROMPT_TUNING', **common, num_virtual_tokens=int(prompt.shape[0]),
      token_dim=int(prompt.shape[1]), num_transformer_submodules=1,
      num_attention_heads=mcfg.num_heads, num_layers=mcfg.num_layers,
      prompt_tuning_init='RANDOM', prompt_tuning_init_text=None, tokenizer_name_or_path=None,
      tokenizer_kwargs=None, modules_to_save=sorted(trained) or None)
  notes = []
  if head == 'cls':
    notes.append('GPT-2 sequence classification under peft prompt tuning: peft passes '
                 'inputs_embeds, so transformers cannot find the last non-padding token and '
                 'scores the last position; equal to jaxft for unpadded inputs (one text per '
                 'call, or texts of equal length)')
  return config, tensors, notes


def write(out_dir: str, config: dict, tensors: dict) -> str:
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={'format': 'pt'})
  return out_dir
