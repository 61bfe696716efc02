"""GPT-2 decoder (pre-LN, learned positions, gelu_new) with causal-LM and classification heads.

Matches Hugging Face `GPT2LMHeadModel` / `GPT2ForSequenceClassification`. Incremental
decoding keeps a functional KV cache: `init_cache()` makes it, each call with `cache=`
returns the updated cache in `out['cache']` (the decoding loops are in `decoding.py`).

Two optional inputs serve packed and left-padded rows: `position_ids` [B, T] (HF's
`position_ids`: positions restart per packed example, and skip left padding while decoding)
and `segment_ids` [B, T] (1, 2, ... per packed example, 0 on padding): attention stays
within a segment, so a packed row computes what its examples compute alone.
"""
from __future__ import annotations

import math

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
               inputs_embeds=None, cache=None, position_ids=None, segment_ids=None):
    del token_type_ids  # GPT-2 has none
    x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.cfg.dtype)
    length = x.shape[1]
    wpe = self.wpe.embedding[...]
    if position_ids is not None:
      x = x + jnp.take(wpe, position_ids.astype(jnp.int32), axis=0).astype(x.dtype)
    elif cache is not None:
      pos = cache[0]['index'] + jnp.arange(length)
      x = x + jnp.take(wpe, pos, axis=0).astype(x.dtype)[None]
    else:
      x = x + wpe[:length].astype(x.dtype)[None]
    x = constrain(self.dropout(x, deterministic=deterministic, rngs=rngs), ACT)
    # Padding mask over keys; causality is added in attention. With a cache the mask
    # covers the whole cache length.
    mask = None if attention_mask is None else padding_mask(attention_mask)
    if segment_ids is not None:
      if cache is not None:
        raise ValueError('segment_ids (packed rows) cannot be combined with a KV cache')
      mask = _and(mask, segment_mask(segment_ids))
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


def segment_mask(segment_ids):
  """[B, T] segment ids -> [B, 1, T, T] bool: query and key in the same non-padding segment."""
  seg = jnp.asarray(segment_ids)
  return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]


def _and(a, b):
  return b if a is None else a & b


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
