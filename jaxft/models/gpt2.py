"""GPT-2 decoder (pre-LN, learned positions, gelu_new) with causal-LM and classification heads.

Matches Hugging Face `GPT2LMHeadModel` / `GPT2ForSequenceClassification`. Incremental
decoding keeps a functional KV cache: `init_cache()` makes it, each call with `cache=`
returns the updated cache in `out['cache']`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.config import ModelConfig
from jaxft.models.layers import Attention, Dense, Dropout, Embed, LayerNorm, padding_mask
from jaxft.partitioning import constrain

ACT = ('batch', 'length', 'embed')


class GPT2Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    h, m = cfg.hidden_size, cfg.intermediate_size
    proj_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
    self.ln_1 = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.attn = Attention(h, cfg.num_heads, dropout=cfg.attention_dropout,
                          init_std=cfg.initializer_range, out_init_std=proj_std, **kw)
    self.attn_dropout = Dropout(cfg.hidden_dropout)
    self.ln_2 = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.mlp_in = Dense((h,), (m,), ('embed', 'mlp'), init_std=cfg.initializer_range, **kw)
    self.mlp_out = Dense((m,), (h,), ('mlp', 'embed'), init_std=proj_std, **kw)
    self.mlp_dropout = Dropout(cfg.hidden_dropout)
    self.act = cfg.act

  def __call__(self, x, mask, *, deterministic, rngs, output_attentions=False, cache=None):
    a, probs, new_cache = self.attn(self.ln_1(x), mask, causal=True, deterministic=deterministic,
                                    rngs=rngs, output_attentions=output_attentions, cache=cache)
    x = x + self.attn_dropout(a, deterministic=deterministic, rngs=rngs)
    h = self.act(self.mlp_in(self.ln_2(x)).astype(jnp.float32)).astype(x.dtype)
    h = self.mlp_out(constrain(h, ('batch', 'length', 'mlp')))
    x = x + self.mlp_dropout(h, deterministic=deterministic, rngs=rngs)
    return constrain(x, ACT), probs, new_cache


class GPT2Model(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(init_std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              rngs=rngs)
    self.wte = Embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), **kw)
    self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, ('position', 'embed'),
                     init_std=0.01, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.dropout = Dropout(cfg.hidden_dropout)
    self.layers = nnx.List([GPT2Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, output_hidden_states=False, output_attentions=False,
               inputs_embeds=None, cache=None):
    del token_type_ids  # GPT-2 has none
    x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.cfg.dtype)
    length = x.shape[1]
    if cache is not None:
      pos = cache[0]['index'] + jnp.arange(length)
      x = x + jnp.take(self.wpe.embedding[...], pos, axis=0).astype(x.dtype)[None]
    else:
      x = x + self.wpe.embedding[...][:length].astype(x.dtype)[None]
    x = constrain(self.dropout(x, deterministic=deterministic, rngs=rngs), ACT)
    # Padding mask over keys; causality is added in attention. With a cache the mask
    # covers the whole cache length.
    mask = None if attention_mask is None else padding_mask(attention_mask)
    hidden, attns, new_cache = [x], [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache[i]
      if self.cfg.remat and cache is None and not output_attentions:
        x, probs, c = nnx.remat(lambda l, x, m: l(x, m, deterministic=deterministic, rngs=rngs))(
            layer, x, mask)
      else:
        x, probs, c = layer(x, mask, deterministic=deterministic, rngs=rngs,
                            output_attentions=output_attentions, cache=layer_cache)
      hidden.append(x)
      attns.append(probs)
      new_cache.append(c)
    x = self.ln_f(x)
    hidden[-1] = x  # HF reports the final-LN output as the last hidden state
    out = {'last_hidden_state': x}
    if output_hidden_states:
      out['hidden_states'] = tuple(hidden)
    if output_attentions:
      out['attentions'] = tuple(attns)
    if cache is not None:
      out['cache'] = new_cache
    return out

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    cfg = self.cfg
    shape = (batch_size, max_length, cfg.num_heads, cfg.hidden_size // cfg.num_heads)
    dtype = dtype or cfg.dtype
    return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
             'index': jnp.array(0, jnp.int32)} for _ in range(cfg.num_layers)]


class GPT2LMHeadModel(nnx.Module):
  """Decoder + LM head tied to the token embeddings."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.transformer = GPT2Model(cfg, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, logits_positions=None, **kw):
    out = self.transformer(input_ids, attention_mask, deterministic=deterministic, rngs=rngs, **kw)
    x = out['last_hidden_state']
    if logits_positions is not None:  # e.g. only the last position while generating
      x = jnp.take_along_axis(x, logits_positions[..., None].astype(jnp.int32), axis=1)
    out['logits'] = constrain(self.transformer.wte.attend(x), ('batch', 'length', 'vocab'))
    return out

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    return self.transformer.init_cache(batch_size, max_length, dtype)


class GPT2ForSequenceClassification(nnx.Module):
  """Decoder + `score` projection read at the last non-padding token of each row."""

  def __init__(self, cfg: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.transformer = GPT2Model(cfg, rngs=rngs)
    self.score = Dense((cfg.hidden_size,), (num_labels,), ('embed', 'classes'), use_bias=False,
                       init_std=cfg.initializer_range, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, **kw):
    out = self.transformer(input_ids, attention_mask, deterministic=deterministic, rngs=rngs, **kw)
    x = out['last_hidden_state']
    if attention_mask is None:
      last = jnp.full((x.shape[0],), x.shape[1] - 1)
    else:  # index of the last position whose mask is 1 (right padding)
      idx = jnp.arange(x.shape[1])[None, :]
      last = jnp.max(jnp.where(attention_mask.astype(bool), idx, 0), axis=1)
    pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    out['logits'] = self.score(pooled).astype(jnp.float32)
    return out


def generate(model: GPT2LMHeadModel, input_ids, max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, rng=None):
  """Greedy (temperature 0) or sampled continuation of equal-length prompts [B, T].

  With the cache, the prompt is prefilled once and each new token costs one position;
  without it the whole sequence is re-run each step (the reference the cache must match).
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  batch, prompt_len = input_ids.shape
  total = prompt_len + max_new_tokens
  if total > model.cfg.max_position_embeddings:
    raise ValueError(f'prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds '
                     f'max_position_embeddings={model.cfg.max_position_embeddings}')
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng

  def pick(logits, key):
    if temperature and temperature > 0:
      return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  if use_cache:
    @jax.jit
    def run(state, input_ids, rng):
      m = nnx.merge(graphdef, state)
      cache = m.init_cache(batch, total)
      out = m(input_ids, cache=cache)
      tok = pick(out['logits'][:, -1], jax.random.fold_in(rng, 0))

      def body(carry, i):
        cache, tok = carry
        out = m(tok[:, None], cache=cache)
        nxt = pick(out['logits'][:, -1], jax.random.fold_in(rng, i))
        return (out['cache'], nxt), tok

      (_, last), toks = jax.lax.scan(body, (out['cache'], tok), jnp.arange(1, max_new_tokens))
      return jnp.concatenate([toks.T, last[:, None]], axis=1)

    new = run(state, input_ids, rng)
  else:
    @jax.jit
    def run(state, input_ids, rng):
      m = nnx.merge(graphdef, state)
      seq = jnp.concatenate([input_ids, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)

      def body(seq, i):
        pos = prompt_len + i - 1
        out = m(seq, logits_positions=jnp.full((batch, 1), pos))
        tok = pick(out['logits'][:, 0], jax.random.fold_in(rng, i))
        return seq.at[:, pos + 1].set(tok), None

      seq, _ = jax.lax.scan(body, seq, jnp.arange(max_new_tokens))
      return seq[:, prompt_len:]

    new = run(state, input_ids, rng)
  return jnp.concatenate([input_ids, new], axis=1)
