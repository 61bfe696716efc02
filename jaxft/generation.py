"""What the generation stages share (finetune_lm's validation and `generate`): the
`generate.*` decoding section, batched decoding of prompts, completion texts (delexicalised
values put back), the eval summary that scores them (BLEU, chrF, ROUGE-L against every
reference of a prompt; the slot error rate for `slot[value]` prompts),
WORKDIR/generations.jsonl and WORKDIR/slot_errors.txt."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxft import files
from jaxft.data import completion as lm_data
from jaxft.data import loader as loader_lib
from jaxft.data.splits import pad_id as pad_id_of
from jaxft.models.decoding import CANDIDATE_KEYS, DecodeSettings, decode, strip
from jaxft.train import metrics as metrics_lib
from jaxft.train import slot_errors

GENERATIONS = 'generations.jsonl'
SLOT_ERRORS = 'slot_errors.txt'  # the outputs with slot errors, for a person to read
RERANKERS = ('', 'slot_errors')


@dataclasses.dataclass(frozen=True)
class DecodingSection:
  """The `generate` config section: how prompts are decoded (jaxft.models.decoding)."""
  method: str = 'greedy'      # greedy | beam | sample ('' in finetune_lm: validate by loss only)
  max_new_tokens: int = 64    # stop after this many tokens, or at EOS
  num_beams: int = 4          # beam width
  length_penalty: float = 1.0  # beam: score = sum log p / generated_length ** length_penalty
  early_stopping: str = 'false'  # beam, as in transformers: 'false' | 'true' | 'never'
  temperature: float = 1.0    # sample: logits / temperature
  top_k: int = 0              # sample: keep the k most likely tokens (0 = off)
  top_p: float = 1.0          # sample: nucleus, the smallest set with this mass (1.0 = off)
  rerank: str = ''            # beam: '' | 'slot_errors' (the fewest slot errors, then score)

  def __post_init__(self):
    if self.early_stopping not in ('false', 'true', 'never'):
      raise ValueError(f'generate.early_stopping={self.early_stopping!r}; allowed: '
                       "'false', 'true', 'never'")
    if self.rerank not in RERANKERS:
      raise ValueError(f'generate.rerank={self.rerank!r}; allowed: {RERANKERS}')
    if self.rerank and self.method != 'beam':
      raise ValueError(f'generate.rerank={self.rerank!r} chooses among the hypotheses of beam '
                       f"search: set generate.method='beam' (it is {self.method!r})")
    if self.method:
      try:
        self.decode_settings()
      except ValueError as e:
        raise ValueError(f'generate: {e}') from e

  def decode_settings(self, eos_token_id: int | None = None,
                      pad_token_id: int = 0) -> DecodeSettings | None:
    """DecodeSettings (None when method is '')."""
    if not self.method:
      return None
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(DecodingSection)
         if f.name != 'rerank'}  # chosen on the host, after decoding
    return DecodeSettings.from_dict(d, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def decode_settings(section: DecodingSection, tokenizer) -> DecodeSettings | None:
  """The section's DecodeSettings with the tokenizer's EOS (stops a row) and pad id."""
  eos = tokenizer.eos_token_id
  return section.decode_settings(None if eos is None else int(eos), pad_id_of(tokenizer))


def completion_texts(tokenizer, tokens, length, eos_id) -> list[str]:
  """Generated ids -> completion texts (EOS and what follows dropped, outer spaces stripped)."""
  out = []
  for ids in strip(tokens, length):
    if eos_id is not None and ids and ids[-1] == eos_id:
      ids = ids[:-1]
    out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
  return out


def output_texts(tokenizer, out: dict, prompts=None, delexicalize=(), rerank: str = '',
                 known: dict | None = None) -> list[str]:
  """The completion text of each prompt from decoded arrays (`tokens`, `length` and, from
  beam search, its n-best `candidates`), placeholders put back. rerank='slot_errors': of each
  prompt's finished hypotheses the first (best-scored) with the fewest slot errors against
  its `slot[value]` prompt, as TGen reranks its beam (Dusek & Jurcicek 2016); a free-text
  prompt keeps the best-scored one. `known`: open-class values (slot_errors.known_values;
  default: those of `prompts`)."""
  eos = tokenizer.eos_token_id
  texts = completion_texts(tokenizer, out['tokens'], out['length'], eos)
  if prompts is not None:
    texts = put_back(texts, prompts, delexicalize)
  if not rerank or 'candidates' not in out:
    return texts
  if prompts is None:
    raise ValueError(f'generate.rerank={rerank!r} needs the prompts')
  known = known if known is not None else slot_errors.known_values(prompts)
  cands, lens, scores = out['candidates'], out['candidate_length'], out['candidate_score']
  b, k = lens.shape
  flat = completion_texts(tokenizer, cands.reshape(b * k, -1), lens.reshape(-1), eos)
  flat = put_back(flat, [p for p in prompts for _ in range(k)], delexicalize)
  chosen = []
  for i, p in enumerate(prompts):
    options = [flat[i * k + j] for j in range(k) if np.isfinite(scores[i, j])]
    chosen.append(options[slot_errors.fewest_errors(p, options, known)] if options else texts[i])
  return chosen


def put_back(texts, prompts, delexicalize=()) -> list[str]:
  """Generated texts with the placeholders of data.delexicalize replaced by the values of
  their (raw) prompts."""
  delex = lm_data.Delexicalizer(tuple(delexicalize))
  if not delex:
    return list(texts)
  return [delex.put_back(t, delex.prompt(p)[1]) for t, p in zip(texts, prompts)]


def score(texts, references, prompts=None, known_prompts=()) -> tuple[dict, list]:
  """(BLEU, chrF, ROUGE-L and, for `slot[value]` prompts, the slot error rate and its
  counts; the failing outputs [(index, errors)]). `known_prompts` (e.g. the training
  prompts) add the open-class values whose mention in a text is an added slot."""
  scores = metrics_lib.generation_metrics(texts, references) if references is not None else {}
  if not prompts:
    return scores, []
  known = slot_errors.known_values(list(prompts) + list(known_prompts))
  ser, failing = slot_errors.slot_error_rate(prompts, texts, known)
  return {**scores, **ser}, failing


def summarizer(tokenizer, references, keep: dict | None = None, *, prompts=None,
               delexicalize=(), known_prompts=(), rerank: str = ''):
  """(sums, per_example) -> eval metrics: loss, perplexity, accuracy on loss rows, and for
  decoded prompt rows BLEU, chrF, ROUGE-L against `references` (one list per distinct
  prompt, in prompt order), the slot error rate when `prompts` (the raw distinct prompts)
  are `slot[value]` items, and the mean generated length. Placeholders of `delexicalize`
  are put back first; `rerank` chooses among beam hypotheses (output_texts). `keep`: the
  texts and the failing outputs (`texts`, `failing`)."""
  known = slot_errors.known_values(list(prompts or ()) + list(known_prompts)) if rerank else None

  def summarize(sums, per):
    w = max(sums.get('weight', 0.0), 1e-9)
    out = {}
    if 'loss_sum' in sums:
      out.update(loss=sums['loss_sum'] / w, perplexity=math.exp(min(sums['loss_sum'] / w, 50.0)),
                 accuracy=sums['correct'] / w)
    if per:
      per = loader_lib.ordered(per)
      texts = output_texts(tokenizer, per, prompts, delexicalize, rerank, known)
      scores, failing = score(texts, references, prompts, known_prompts)
      out.update(scores)
      out['gen_length'] = float(np.mean(per['length']))
      if keep is not None:
        keep.update(texts=texts, failing=failing, scores=scores)
    return out
  return summarize


def write_slot_errors(workdir: str, prompts, texts, failing, scores: dict) -> str | None:
  """WORKDIR/slot_errors.txt: every output with a slot error, its prompt and the errors
  (nothing when the prompts are not `slot[value]` items)."""
  if jax.process_index() != 0 or 'slot_error_rate' not in scores:
    return None
  path = os.path.join(workdir, SLOT_ERRORS)
  with files.atomic_open(path, 'slot errors') as f:
    f.write(slot_errors.report_text(prompts, texts, failing, scores) + '\n')
  logging.info('slot error rate %.2f%%: %d failing outputs listed in %s',
               scores['slot_error_rate'], len(failing), path)
  return path


def write_generations(path: str, prompts, texts, scores: dict | None = None) -> None:
  """One JSON line per distinct prompt: {"input": prompt, "text": completion}; the file is
  replaced whole (files.atomic_open)."""
  if jax.process_index() != 0:
    return
  with files.atomic_open(path, 'generations') as f:
    for p, t in zip(prompts, texts):
      f.write(json.dumps({'input': p, 'text': t}, ensure_ascii=False) + '\n')
  logging.info('wrote %d generations to %s%s', len(texts), path,
               f' ({scores})' if scores else '')


def check_room(prompt_ids, settings: DecodeSettings, max_positions: int, sources) -> None:
  """Every prompt plus max_new_tokens must fit the model's positions."""
  room = max_positions - settings.max_new_tokens
  too_long = [i for i, p in enumerate(prompt_ids) if len(p) > room]
  if too_long:
    i = too_long[0]
    raise ValueError(f'{sources[i]}: the prompt has {len(prompt_ids[i])} tokens; with '
                     f'generate.max_new_tokens={settings.max_new_tokens} at most {room} fit the '
                     f'model ({len(too_long)} such prompts)')


def generate_ids(model_def, params, prompt_ids, settings: DecodeSettings, *, batch_size: int,
                 pad_id: int, seed: int):
  """Decode `prompt_ids` (token lists) in fixed-shape batches (one compile): {tokens,
  length} per prompt, and beam search's n-best list (decoding.CANDIDATE_KEYS). Sampling
  draws prompt i from fold_in(key(seed), i), whatever its batch."""
  length = max(len(p) for p in prompt_ids)
  fn = jax.jit(lambda p, ids, mask, keys: decode(model_def.merge(p), ids, mask, settings, keys))
  params = jax.device_put(params)  # once, not with every batch
  base = jax.random.key(seed)
  parts: dict[str, list] = {}
  for start in tqdm(range(0, len(prompt_ids), batch_size), desc='generate', unit='batch',
                    disable=jax.process_index() != 0):
    arr = lm_data.prompt_arrays(prompt_ids[start:start + batch_size], pad_id, batch_size, length)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(arr['index'] + start)
    out = jax.device_get(fn(params, arr['prompt_ids'], arr['prompt_mask'], keys))
    n = int(arr['valid'].sum())
    for k in ('tokens', 'length') + CANDIDATE_KEYS:
      if k in out:
        parts.setdefault(k, []).append(np.asarray(out[k])[:n])
  return {k: np.concatenate(v) for k, v in parts.items()}


def ser_text(scores: dict) -> str:
  """', slot error rate 3.10% (12 of 387 slot values)' for a summary line; '' without one."""
  if 'slot_error_rate' not in scores:
    return ''
  errors = sum(scores.get(f'slot_{k}', 0) for k in ('missing', 'wrong', 'added'))
  return (f", slot error rate {scores['slot_error_rate']:.2f}% ({errors:.0f} of "
          f"{scores['slots']:.0f} slot values, {SLOT_ERRORS})")
