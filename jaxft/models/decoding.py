"""Batched, jittable decoding for causal LMs: greedy, beam search and sampling, with a KV cache.

`decode(model, input_ids, attention_mask, settings)` is a pure function of arrays (it runs
inside `jax.jit`, e.g. as a validation metric inside the eval step); `generate(...)` is
the jitted host-side convenience around it. The model is any causal LM that follows the
jaxft call convention plus `cache=`, `position_ids=`, `logits_positions=` and
`init_cache(batch, length)` (GPT-2, and its PEFT versions).

Prompts are left-padded (`jaxft.data.completion.left_pad`): every row's last prompt token
sits at the same column, so one cache index serves the whole batch, while `position_ids`
skip the padding and the attention mask hides it. A row therefore decodes the same tokens
in any batch as alone (tests/test_decoding.py).

Semantics follow `transformers`' `generate` (so token ids match on an exported model):
- greedy: argmax; a row that produced `eos_token_id` is padded with `pad_token_id` after it;
  the loop stops when every row is done or after `max_new_tokens`.
- sample: logits / temperature, then top-k, then top-p (nucleus; HF's `TopPLogitsWarper`,
  keeping at least one token), then a categorical draw. `rng` is one key, or one key per
  row (the `generate` stage folds in each input's index, so samples do not depend on the
  batch a prompt lands in).
- beam: HF's vectorised beam search (transformers >= 4.50): 2k candidates per step, a
  candidate ending in EOS (or reaching max_new_tokens) is scored sum_logprobs / len**lp with
  len counting the generated tokens including EOS, and `early_stopping` True | False |
  'never' with HF's meaning (True: stop once k hypotheses are done; False: stop when the
  best running beam at its current length cannot beat the worst done one; 'never': with
  lp > 0, assume the running beams could reach max_new_tokens).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METHODS = ('greedy', 'beam', 'sample')
CANDIDATE_KEYS = ('candidates', 'candidate_length', 'candidate_score')  # beam's n-best list
_NEG = -1.0e9  # HF's "impossible" score in beam search


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How to decode. Hashable: it is a static argument of the jitted decoder."""
  method: str = 'greedy'           # greedy | beam | sample
  max_new_tokens: int = 32
  num_beams: int = 4
  length_penalty: float = 1.0      # beam: score = sum_logprobs / generated_len ** length_penalty
  early_stopping: Any = False      # beam: True | False | 'never' (transformers' meaning)
  temperature: float = 1.0         # sample
  top_k: int = 0                   # sample: 0 = off
  top_p: float = 1.0               # sample: 1.0 = off
  eos_token_id: int | None = None  # None: always max_new_tokens
  pad_token_id: int = 0            # fills rows after their EOS
  use_cache: bool = True           # False re-runs the whole sequence per token (a reference)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'decode method={self.method!r}; allowed: {METHODS}')
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} must be >= 1')
    if self.method == 'beam' and self.num_beams < 1:
      raise ValueError(f'num_beams={self.num_beams} must be >= 1')
    if self.early_stopping not in (True, False, 'never'):
      raise ValueError(f"early_stopping={self.early_stopping!r}; allowed: True, False, 'never'")
    if self.method == 'sample':
      if not self.temperature > 0:
        raise ValueError(f'temperature={self.temperature} must be > 0 for sampling')
      if self.top_k < 0 or not 0 < self.top_p <= 1:
        raise ValueError(f'top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]')

  @classmethod
  def from_dict(cls, d, **overrides) -> 'DecodeSettings':
    """From a config section (unknown keys are an error naming them)."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else (d or {}))
    d.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown decoding key(s) {unknown}; allowed: {sorted(names)}')
    if isinstance(d.get('early_stopping'), str) and d['early_stopping'] != 'never':
      d['early_stopping'] = {'true': True, 'false': False}.get(d['early_stopping'].lower(),
                                                               d['early_stopping'])
    return cls(**d)


# ------------------------------------------------------------------------- model steppers

def _prompt_positions(mask):
  """Positions of a left-padded prompt: 0.. from the first real token (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _cached_stepper(model, input_ids, mask, max_new: int):
  """(prefill() -> (logits, state), step(state, tok) -> (logits, state)) with a KV cache.

  The cache holds prompt + max_new positions; keys not yet written are excluded by the
  cache's own causal mask, so the attention mask is the prompt mask then ones."""
  b, t = input_ids.shape
  full_mask = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
  n_real = mask.sum(axis=1).astype(jnp.int32)

  def prefill():
    cache = model.init_cache(b, t + max_new)
    out = model(input_ids, full_mask, cache=cache, position_ids=_prompt_positions(mask),
                logits_positions=jnp.full((b, 1), t - 1, jnp.int32))
    return out['logits'][:, 0], {'cache': out['cache'], 'pos': n_real, 'mask': full_mask}

  def step(state, tok):
    out = model(tok[:, None], state['mask'], cache=state['cache'],
                position_ids=state['pos'][:, None])
    return out['logits'][:, 0], {**state, 'cache': out['cache'], 'pos': state['pos'] + 1}

  return prefill, step


def _uncached_stepper(model, input_ids, mask, max_new: int, pad_id: int):
  """The same interface re-running the whole (causally masked) buffer for every token: the
  reference the cache must reproduce."""
  b, t = input_ids.shape
  n_real = mask.sum(axis=1).astype(jnp.int32)
  positions = jnp.concatenate([_prompt_positions(mask),
                               n_real[:, None] + jnp.arange(max_new, dtype=jnp.int32)], axis=1)

  def logits_at(state, idx):
    rows = state['seq'].shape[0]
    out = model(state['seq'], state['mask'], position_ids=state['pos'],
                logits_positions=jnp.full((rows, 1), idx, jnp.int32))
    return out['logits'][:, 0]

  def prefill():
    state = {'seq': jnp.concatenate([input_ids, jnp.full((b, max_new), pad_id, jnp.int32)], 1),
             'mask': jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1),
             'pos': positions, 'idx': jnp.int32(t - 1)}
    return logits_at(state, t - 1), state

  def step(state, tok):
    idx = state['idx'] + 1
    seq = jax.lax.dynamic_update_slice(state['seq'], tok[:, None].astype(jnp.int32), (0, idx))
    state = {**state, 'seq': seq, 'idx': idx}
    return logits_at(state, idx), state

  return prefill, step


def _take_rows(state, rows, n_rows: int):
  """Reorder / repeat the batch rows of every per-row array in a stepper state."""
  return jax.tree.map(lambda x: x[rows] if x.ndim and x.shape[0] == n_rows else x, state)


# ------------------------------------------------------------------------ token choice

def warp_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """HF's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order; removed
  tokens get -inf."""
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending, as HF
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - top_p).at[..., -1].set(False)  # keep at least one token
    inverse = jnp.argsort(order, axis=-1)
    remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _row_keys(rng, b: int):
  """One key per row: `rng` is a key (split into rows) or already [B] keys."""
  if rng is None:
    rng = jax.random.key(0)
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  return rng if rng.shape == (b,) else jax.random.split(rng, b)


def _greedy_or_sample(prefill, step, b: int, s: DecodeSettings, rng):
  n = s.max_new_tokens
  keys = _row_keys(rng, b) if s.method == 'sample' else None
  eos = -1 if s.eos_token_id is None else s.eos_token_id

  def pick(logits, i):
    if s.method == 'greedy':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, s.temperature, s.top_k, s.top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, warped).astype(jnp.int32)

  logits, state = prefill()
  init = (jnp.int32(0), jnp.full((b, n), s.pad_token_id, jnp.int32), jnp.zeros((b,), bool),
          jnp.zeros((b,), jnp.int32), logits, state)

  def cond(c):
    i, _, done, _, _, _ = c
    return (i < n) & ~done.all()

  def body(c):
    i, tokens, done, length, logits, state = c
    tok = jnp.where(done, s.pad_token_id, pick(logits, i))
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
    length = length + (~done).astype(jnp.int32)
    done = done | (tok == eos)
    more = (i + 1 < n) & ~done.all()
    logits, state = jax.lax.cond(more, step, lambda st, _: (logits, st), state, tok)
    return i + 1, tokens, done, length, logits, state

  _, tokens, _, length, _, _ = jax.lax.while_loop(cond, body, init)
  return {'tokens': tokens, 'length': length}


# --------------------------------------------------------------------------- beam search

def _gather(x, idx):
  """x [B, K, ...] gathered along K by idx [B, J]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(prefill, step, b: int, s: DecodeSettings):
  """transformers' `_beam_search` (vectorised version), step for step, as a while_loop."""
  k, n = s.num_beams, s.max_new_tokens
  keep = 2 * k  # HF: max(2, 1 + number of EOS ids) * num_beams
  eos = -1 if s.eos_token_id is None else s.eos_token_id
  lp = float(s.length_penalty)
  top_mask = jnp.arange(keep) < k

  logits, state = prefill()
  flat = jnp.repeat(jnp.arange(b), k)  # prefill once per prompt, then k copies of its cache
  state = _take_rows(state, flat, b)
  logits = logits[flat]
  run_seq = jnp.full((b, k, n), s.pad_token_id, jnp.int32)
  run_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG)
  init = dict(i=jnp.int32(0), logits=logits, state=state, run_seq=run_seq, run_scores=run_scores,
              seqs=run_seq, scores=jnp.full((b, k), _NEG, jnp.float32),
              lens=jnp.zeros((b, k), jnp.int32), done=jnp.zeros((b, k), bool),
              open=jnp.ones((b,), bool), go=jnp.bool_(True))

  def body(c):
    i = c['i']
    logp = jax.nn.log_softmax(c['logits'].astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    logp = (logp.reshape(b, k, vocab) + c['run_scores'][:, :, None]).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(logp, keep)
    src_beam, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    cand = _gather(c['run_seq'], src_beam)
    cand = jax.lax.dynamic_update_slice(cand, tok[:, :, None], (0, 0, i))
    hits = (tok == eos) | (i + 1 >= n)
    # the k best candidates that did not finish keep running
    run_logp = top_logp + hits.astype(jnp.float32) * _NEG
    _, nxt = jax.lax.top_k(run_logp, k)
    run_seq, run_scores = _gather(cand, nxt), _gather(run_logp, nxt)
    rows = (jnp.arange(b)[:, None] * k + _gather(src_beam, nxt)).reshape(-1)
    next_tok = _gather(tok, nxt).reshape(-1)
    # finished candidates among the top k compete for the k done slots
    just = hits & top_mask[None]
    fin = top_logp / ((i + 1).astype(jnp.float32) ** lp)
    full = c['done'].all(axis=1, keepdims=True) & (s.early_stopping is True)
    fin = fin + full * _NEG + (~c['open'])[:, None] * _NEG + (~just) * _NEG
    m_scores = jnp.concatenate([c['scores'], fin], axis=1)
    _, best = jax.lax.top_k(m_scores, k)
    seqs = _gather(jnp.concatenate([c['seqs'], cand], axis=1), best)
    scores = _gather(m_scores, best)
    lens = _gather(jnp.concatenate([c['lens'], jnp.broadcast_to(i + 1, (b, keep))], axis=1), best)
    done = _gather(jnp.concatenate([c['done'], just], axis=1), best)
    # can a running beam still beat the worst done hypothesis?
    cur = jnp.float32(n) if (s.early_stopping == 'never' and lp > 0) else (i + 1).astype(jnp.float32)
    best_possible = run_scores[:, :1] / (cur ** lp)
    worst = jnp.where(done, scores.min(axis=1, keepdims=True), _NEG)
    open_ = c['open'] & (best_possible > worst).any(axis=1)
    go = open_.any() & ~(done.all() & (s.early_stopping is True)) & ~hits.all()
    state = _take_rows(c['state'], rows, b * k)
    logits, state = jax.lax.cond(go, step, lambda st, _: (c['logits'], st), state, next_tok)
    return dict(i=i + 1, logits=logits, state=state, run_seq=run_seq, run_scores=run_scores,
                seqs=seqs, scores=scores, lens=lens, done=done, open=open_, go=go)

  c = jax.lax.while_loop(lambda c: c['go'] & (c['i'] < n), body, init)
  # the k finished hypotheses, best score first (a slot never filled has length 0)
  filled = c['scores'] > _NEG / 2
  lens = jnp.where(filled, c['lens'], 0)
  seqs = jnp.where(jnp.arange(n)[None, None] < lens[:, :, None], c['seqs'], s.pad_token_id)
  return {'tokens': seqs[:, 0], 'length': lens[:, 0], 'score': c['scores'][:, 0],
          'candidates': seqs, 'candidate_length': lens,
          'candidate_score': jnp.where(filled, c['scores'], -jnp.inf)}


# ---------------------------------------------------------------------------- entry points

def decode(model, input_ids, attention_mask, settings: DecodeSettings, rng=None) -> dict:
  """New tokens for left-padded prompts [B, T] (pure; call inside jit).

  Returns {'tokens': [B, max_new_tokens] int32 (EOS included, `pad_token_id` after it),
  'length': [B] generated tokens including EOS}, plus for beam search 'score' (the
  length-penalised log-probability of the chosen hypothesis) and the n-best list that a
  reranker chooses from (generate.rerank): 'candidates' [B, num_beams, max_new_tokens],
  'candidate_length' [B, num_beams], 'candidate_score' [B, num_beams] (best first; -inf
  and length 0 for a slot no hypothesis filled). Candidate 0 is 'tokens'.
  """
  s = settings
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = (jnp.ones_like(input_ids) if attention_mask is None
          else jnp.asarray(attention_mask, jnp.int32))
  b, t = input_ids.shape
  limit = model.cfg.max_position_embeddings
  if t + s.max_new_tokens > limit:
    raise ValueError(f'prompt length {t} + max_new_tokens {s.max_new_tokens} exceeds the '
                     f"model's max_position_embeddings={limit}")
  if s.use_cache:
    prefill, step = _cached_stepper(model, input_ids, mask, s.max_new_tokens)
  else:
    prefill, step = _uncached_stepper(model, input_ids, mask, s.max_new_tokens, s.pad_token_id)
  if s.method == 'beam':
    return _beam_search(prefill, step, b, s)
  return _greedy_or_sample(prefill, step, b, s, rng)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode_jit(graphdef, state, input_ids, attention_mask, settings, rng):
  return decode(nnx.merge(graphdef, state), input_ids, attention_mask, settings, rng)


def generate(model, input_ids, max_new_tokens: int | None = None, *, attention_mask=None,
             settings: DecodeSettings | None = None, rng=None, temperature: float = 0.0,
             **overrides) -> np.ndarray:
  """Prompt + new tokens [B, T + max_new_tokens] (numpy), like `transformers`' `generate`
  without its cropping: rows are `pad_token_id`-filled after their EOS.

  `settings` (or keyword overrides of its fields) choose the method; `temperature` > 0
  alone means sampling (the older call). Prompts of different lengths: left-pad them
  (`jaxft.data.completion.left_pad`) and pass the mask."""
  settings = settings or DecodeSettings()
  if temperature and 'method' not in overrides:
    overrides.update(method='sample', temperature=temperature)
  if max_new_tokens is not None:
    overrides['max_new_tokens'] = int(max_new_tokens)
  settings = dataclasses.replace(settings, **overrides)
  ids = np.asarray(input_ids, np.int32)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  out = _decode_jit(graphdef, state, ids, mask, settings, rng)
  return np.concatenate([ids, np.asarray(out['tokens'])], axis=1)


def strip(tokens, length) -> list[list[int]]:
  """Host-side: each row's generated ids without padding (EOS kept if it was produced)."""
  tokens, length = np.asarray(tokens), np.asarray(length)
  return [tokens[i, :int(length[i])].tolist() for i in range(len(tokens))]
