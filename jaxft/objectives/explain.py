"""Which input tokens drove a prediction: integrated gradients and attention rollout.

Both are eval objectives (per-example outputs through the loop's one `evaluate`), so they
run jitted and sharded like any prediction. What is explained (`f`, a scalar per example):
- `kind='cls'`: the log-probability of the predicted class (log-softmax of the logits at
  the argmax; the score itself for regression, one output);
- `kind='ner'`: the sum, over the first sub-token of every word (`target_mask`, where the
  predicted tags are read), of the log-probability of the tag predicted there: one
  attribution per token for the whole predicted tagging;
- `kind='qa'`: log p(start) + log p(end) of the chosen answer span (`target` [B, 2]: its
  first and last token in the window it was read from; softmax over positions).

Integrated gradients (Sundararajan et al. 2017) go through the input embeddings (the
models' `inputs_embeds`, the hook prompt tuning uses): attribution of token t is
sum_h (x - x')_th * integral_0^1 df/dx_th(x' + a (x - x')) da, the integral by the
trapezoid rule over `steps` points, all points of a batch in one forward + backward. The
attributions of an example sum to f(x) - f(x') up to the quadrature error (completeness),
which `delta` reports. Special tokens ([CLS], [SEP], pads) keep their own embedding in
the baseline, so they get exactly 0: the baseline is the pad-token embedding ('pad') or
zeros ('zeros') at every other position.

Attention rollout (Abnar & Zuidema 2020): per layer the head-averaged attention plus the
identity (the residual), rows normalised, multiplied through the layers; a token's score
is its column in the row of the position the prediction is read from ([CLS] for BERT, the
last real token for GPT-2; for NER the mean of the rows of the tagged positions).
"""
from __future__ import annotations

import html
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft.models import word_embeddings
from jaxft.objectives.classification import inputs
from jaxft.train.step import Objective

METHODS = ('integrated_gradients', 'attention_rollout')
BASELINES = ('pad', 'zeros')
QUERIES = ('first', 'last', 'targets')  # which rollout row(s) a score is read from


def trapezoid(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(points a_k in [0, 1], weights w_k): sum_k w_k g(a_k) ~ integral_0^1 g (error O(1/k^2))."""
  if steps < 2:
    raise ValueError(f'integrated gradients need at least 2 steps, got {steps}')
  alphas = np.linspace(0.0, 1.0, steps, dtype=np.float32)
  weights = np.full(steps, 1.0 / (steps - 1), np.float32)
  weights[[0, -1]] *= 0.5
  return alphas, weights


def target_value(logits, target, target_mask, kind: str):
  """f per example ([B]) of the module docstring; `target` is the predicted class [B] or
  tags [B, L]; regression (one output) explains the score itself."""
  logits = logits.astype(jnp.float32)
  if kind == 'qa':  # logits [B, L, 2]: start / end scores per position; target [B, 2]
    logp = jax.nn.log_softmax(logits, axis=1)
    rows = jnp.arange(logits.shape[0])
    return logp[rows, target[:, 0], 0] + logp[rows, target[:, 1], 1]
  if kind == 'cls' and logits.shape[-1] == 1:
    return logits[:, 0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  if kind == 'cls':
    return picked
  return (picked * target_mask.astype(jnp.float32)).sum(-1)


def baseline_embeddings(x, attention_mask, special_tokens_mask, baseline: str,
                        pad_embedding=None):
  """x' : x where a token is special or padding (so it gets no attribution), else the pad
  embedding ('pad') or zeros ('zeros')."""
  keep = (special_tokens_mask > 0) | (attention_mask == 0)
  if baseline == 'pad':
    other = jnp.broadcast_to(pad_embedding.astype(x.dtype), x.shape)
  elif baseline == 'zeros':
    other = jnp.zeros_like(x)
  else:
    raise ValueError(f'baseline {baseline!r}; allowed: {BASELINES}')
  return jnp.where(keep[..., None], x, other)


def integrated_gradients(model, batch, *, kind: str, steps: int = 64, baseline: str = 'pad',
                         pad_id: int | None = None) -> dict:
  """`path_integral` from the baseline of the module docstring to the looked-up embeddings
  of `input_ids` (pure; call under jit)."""
  if baseline == 'pad' and pad_id is None:
    raise ValueError("baseline 'pad' needs the tokenizer's pad token id (it has none): use "
                     "baseline 'zeros'")
  word = word_embeddings(model)
  x = word(batch['input_ids'])
  pad = word(jnp.asarray(pad_id or 0, jnp.int32))
  x0 = baseline_embeddings(x, batch['attention_mask'], batch['special_tokens_mask'], baseline,
                           pad)
  return path_integral(model, batch, x, x0, kind=kind, steps=steps)


def path_integral(model, batch, x, x0, *, kind: str, steps: int = 64) -> dict:
  """{'attributions' [B, L], 'delta' [B] = f(x) - f(x0), 'target'}: integrated gradients of
  f (module docstring; the target is predicted at x) along the line from embeddings x0 to x
  ([B, L, H] each), by the trapezoid rule over `steps` points.

  The points of every example go through the model as one batch of steps * B rows (memory
  grows with steps * B: callers size B to steps)."""
  _, mask, tt = inputs(batch)
  target_mask = batch.get('target_mask', mask)
  target = batch['target'] if 'target' in batch else jnp.argmax(  # a QA span comes chosen
      model(None, mask, tt, inputs_embeds=x)['logits'], axis=-1)
  alphas, weights = trapezoid(steps)
  b, length, hidden = x.shape
  rows = lambda a: None if a is None else jnp.tile(a, (steps,) + (1,) * (a.ndim - 1))

  def f(path):  # [steps, B, L, H] -> (sum of f: one backward for all rows, f per point)
    out = model(None, rows(mask), rows(tt),
                inputs_embeds=path.reshape(steps * b, length, hidden))['logits']
    vals = target_value(out, rows(target), rows(target_mask), kind).reshape(steps, b)
    return vals.sum(), vals

  path = x0[None] + jnp.asarray(alphas, x.dtype)[:, None, None, None] * (x - x0)[None]
  grads, vals = jax.grad(f, has_aux=True)(path)
  avg_grad = jnp.einsum('s,sblh->blh', jnp.asarray(weights), grads.astype(jnp.float32))
  attributions = ((x - x0).astype(jnp.float32) * avg_grad).sum(-1)
  return {'attributions': attributions, 'delta': vals[-1] - vals[0], 'target': target}


def rollout(attentions: Sequence, attention_mask=None):
  """[B, L, L] rollout of per-layer attention probabilities (each [B, H, L, L]): rows sum to
  1. Without a mask every position is real."""
  eye = None
  result = None
  for probs in attentions:
    a = probs.astype(jnp.float32).mean(axis=1)
    if eye is None:
      eye = jnp.eye(a.shape[-1], dtype=a.dtype)[None]
    a = a + eye
    a = a / a.sum(-1, keepdims=True)
    result = a if result is None else jnp.einsum('bij,bjk->bik', a, result)
  if attention_mask is not None:  # pad columns are already 0 in real rows; pad rows: 0
    result = result * attention_mask[:, :, None].astype(result.dtype)
  return result


def rollout_scores(r, attention_mask, query: str, target_mask=None):
  """[B, L] scores: the rollout row(s) the prediction is read from (`QUERIES`)."""
  if query == 'first':
    return r[:, 0]
  if query == 'last':
    idx = jnp.arange(r.shape[1])[None, :]
    last = jnp.max(jnp.where(attention_mask > 0, idx, 0), axis=1)
    return jnp.take_along_axis(r, last[:, None, None], axis=1)[:, 0]
  if query == 'targets':
    w = target_mask.astype(r.dtype)
    return jnp.einsum('bi,bij->bj', w, r) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
  raise ValueError(f'query {query!r}; allowed: {QUERIES}')


def attention_rollout(model, batch, *, query: str) -> dict:
  """{'attributions' [B, L]}: rollout scores of a batch (pure; call under jit)."""
  ids, mask, tt = inputs(batch)
  out = model(ids, mask, tt, output_attentions=True)
  if out['attentions'][0].shape[-1] != ids.shape[1]:
    raise ValueError(f"attention rollout: the model attends over {out['attentions'][0].shape[-1]}"
                     f' positions for {ids.shape[1]} input tokens (a soft prompt?); use '
                     'integrated_gradients')
  r = rollout(out['attentions'], mask)
  return {'attributions': rollout_scores(r, mask, query, batch.get('target_mask'))}


def query_for(kind: str, model_type: str) -> str:
  """The rollout row(s) a prediction is read from: BERT's classifier reads [CLS] (first),
  GPT-2's the last real token, a token classifier every tagged position, a span head the
  answer's first and last token (targets)."""
  return 'targets' if kind in ('ner', 'qa') else 'last' if model_type == 'gpt2' else 'first'


def explainer(method: str, *, kind: str, query: str = 'first', steps: int = 64,
              baseline: str = 'pad', pad_id: int | None = None) -> Objective:
  """An eval objective: per_example {'attributions' [B, L] (+ 'delta' for IG), index, valid}.
  Batches need `special_tokens_mask` (IG) and, for NER, `target_mask` (`explain_arrays`)."""
  if method not in METHODS:
    raise ValueError(f'explain method {method!r}; allowed: {METHODS}')

  def evaluate(model, batch):
    if method == 'integrated_gradients':
      out = integrated_gradients(model, batch, kind=kind, steps=steps, baseline=baseline,
                                 pad_id=pad_id)
      out = {'attributions': out['attributions'], 'delta': out['delta']}
    else:
      out = attention_rollout(model, batch, query=query)
    return {'per_example': {**out, 'index': batch['index'], 'valid': batch['valid']}}

  return Objective(loss=None, evaluate=evaluate)


# ------------------------------------------------------------------------- host side

def special_ids(tokenizer) -> list[int]:
  """The ids a tokenizer adds around text (CLS/SEP/BOS/EOS, pad, mask): tokens to keep out of
  the attributions. Not [UNK]: it stands for real text."""
  names = ('cls_token_id', 'sep_token_id', 'bos_token_id', 'eos_token_id', 'pad_token_id',
           'mask_token_id')
  return sorted({i for i in (getattr(tokenizer, n, None) for n in names) if i is not None})


def explain_arrays(arrays: dict, special_ids: Sequence[int]) -> dict:
  """The model inputs of encoded examples + `special_tokens_mask` (ids among the tokenizer's
  special ids) and, with `word_ids` (NER), `target_mask` (first sub-token of each word); a
  `target` / `target_mask` already given (a QA span) is kept."""
  out = {k: arrays[k] for k in ('input_ids', 'attention_mask', 'token_type_ids', 'target',
                                'target_mask') if k in arrays}
  ids = np.asarray(arrays['input_ids'])
  out['special_tokens_mask'] = np.isin(ids, np.asarray(list(special_ids))).astype(np.int32)
  if 'word_ids' in arrays:
    w = np.asarray(arrays['word_ids'])
    prev = np.concatenate([np.full((len(w), 1), -1, w.dtype), w[:, :-1]], axis=1)
    out['target_mask'] = ((w >= 0) & (w != prev)).astype(np.int32)
  return out


def log_completeness(out: dict, steps: int) -> None:
  """Logs how far the attributions' sums are from f(x) - f(baseline) (the quadrature error:
  more steps shrink it)."""
  if not len(out['delta']):
    return
  gap = np.abs(out['attributions'].sum(-1) - out['delta'])
  logging.info('integrated gradients, %d steps: |sum of attributions - (f(x) - f(baseline))| '
               'max %.3g, mean %.3g (mean |f(x) - f(baseline)| %.3g)', steps, gap.max(),
               gap.mean(), np.abs(out['delta']).mean())


def token_attributions(tokens: Sequence[Sequence[str]], attention_mask: np.ndarray,
                       scores: np.ndarray) -> list[list[dict]]:
  """Per example, [{'token', 'score'}] over its real (attended) positions, in order."""
  out = []
  for toks, m, s in zip(tokens, np.asarray(attention_mask), np.asarray(scores)):
    out.append([{'token': t, 'score': float(v)} for t, keep, v in zip(toks, m, s) if keep])
  return out


def _display(token: str) -> tuple[str, bool]:
  """(text, glued to the previous token): WordPiece '##x' glues; BPE 'Ġx' / '▁x' is ' x'."""
  if token.startswith('##'):
    return token[2:], True
  if token[:1] in ('Ġ', '▁'):
    return token[1:], False
  return token, False


def _color(score: float, scale: float) -> str:
  """Red for positive, blue for negative, opacity by |score| / the example's largest."""
  a = 0.0 if scale <= 0 else min(abs(score) / scale, 1.0)
  rgb = '220,38,38' if score > 0 else '37,99,235'
  return f'rgba({rgb},{a:.3f})'


def _caption(rec: dict) -> str:
  if 'answer' in rec:  # a QA span
    cap = f"answer {rec['answer']!r}"
    if rec.get('gold'):
      cap += f"; gold {' | '.join(rec['gold'])}"
    return cap
  if 'label' in rec:
    p = rec.get('probs', {}).get(rec['label'])
    cap = f"predicted {rec['label']}" + ('' if p is None else f' (p={p:.3f})')
  elif 'score' in rec:
    cap = f"predicted score {rec['score']:.4f}"
  else:
    ents = '; '.join(f"{e['type']}: {e['text']}" for e in rec.get('entities', []))
    cap = 'predicted entities: ' + (ents or 'none')
  if 'gold' in rec and not isinstance(rec['gold'], list):
    cap += f"; gold {rec['gold']}"
  return cap


def _block(rec: dict) -> str:
  attrs = rec['attributions']
  scale = max((abs(a['score']) for a in attrs), default=0.0)
  spans = []
  for a in attrs:
    text, glued = _display(a['token'])
    spans.append(('' if glued or not spans else ' ') +
                 f'<span style="background:{_color(a["score"], scale)}" '
                 f'title="{html.escape(a["token"])}: {a["score"]:.4g}">{html.escape(text)}</span>')
  text = ' | '.join(rec[k] for k in ('text', 'text_pair') if rec.get(k))
  text = text or ' '.join(rec.get('tokens', ()))
  return (f'<div class="ex"><div class="cap">{html.escape(rec.get("source", ""))} &middot; '
          f'{html.escape(_caption(rec))}</div><div class="text">{html.escape(text)}</div>'
          f'<div class="toks">{"".join(spans)}</div></div>')


def html_page(records: Sequence[dict], title: str) -> str:
  """One self-contained HTML page (no scripts, no external files): a block per record of
  predictions.jsonl with `attributions`: source and prediction, the input text, then the
  tokens shaded red (+) / blue (-) by their score relative to the example's largest
  |score|; hovering shows the token and its score. All text is HTML-escaped."""
  style = ('body{font-family:sans-serif;max-width:60em;margin:2em auto}'
           '.ex{margin:1em 0;padding:.5em;border-bottom:1px solid #ddd}'
           '.cap,.text{color:#444;font-size:90%;margin-bottom:.3em}.toks{line-height:1.8}')
  blocks = '\n'.join(_block(r) for r in records)
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
          f'</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n'
          '<p>Red: the token raises the explained score, blue: lowers it; shade relative to '
          'the largest |score| of the example.</p>\n'
          f'{blocks}\n</body></html>\n')
