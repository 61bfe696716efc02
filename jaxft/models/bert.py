"""BERT encoder (post-LN) with masked-LM, sequence- and token-classification and extractive
question-answering (span) heads.

Matches Hugging Face `BertModel` numerically (exact GELU, LayerNorm eps from config).
There is deliberately no next-sentence-prediction head: jaxft pretrains RoBERTa style.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.config import ModelConfig
from jaxft.models.layers import (Attention, Dense, Dropout, Embed, LayerNorm, padding_mask,
                                 param)
from jaxft.partitioning import constrain

ACT = ('batch', 'length', 'embed')


class BertEmbeddings(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    kw = dict(init_std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              rngs=rngs)
    self.word = Embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), **kw)
    self.position = Embed(cfg.max_position_embeddings, cfg.hidden_size, ('position', 'embed'), **kw)
    self.token_type = Embed(cfg.type_vocab_size, cfg.hidden_size, ('type', 'embed'), **kw)
    self.ln = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype)
    self.dropout = Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids, token_type_ids, *, deterministic, rngs, inputs_embeds=None):
    x = self.word(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.word.dtype)
    length = x.shape[1]
    x = x + self.position.embedding[...][:length].astype(x.dtype)[None]
    x = x + self.token_type(token_type_ids)
    x = self.ln(x)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)


class BertLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    h, m = cfg.hidden_size, cfg.intermediate_size
    self.attn = Attention(h, cfg.num_heads, dropout=cfg.attention_dropout,
                          init_std=cfg.initializer_range, **kw)
    self.attn_dropout = Dropout(cfg.hidden_dropout)
    self.attn_ln = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.mlp_in = Dense((h,), (m,), ('embed', 'mlp'), init_std=cfg.initializer_range, **kw)
    self.mlp_out = Dense((m,), (h,), ('mlp', 'embed'), init_std=cfg.initializer_range, **kw)
    self.mlp_dropout = Dropout(cfg.hidden_dropout)
    self.mlp_ln = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.act = cfg.act

  def __call__(self, x, mask, *, deterministic, rngs, output_attentions=False):
    a, probs, _ = self.attn(x, mask, deterministic=deterministic, rngs=rngs,
                            output_attentions=output_attentions)
    x = self.attn_ln(x + self.attn_dropout(a, deterministic=deterministic, rngs=rngs))
    h = self.act(self.mlp_in(x).astype(jnp.float32)).astype(x.dtype)
    h = constrain(h, ('batch', 'length', 'mlp'))
    h = self.mlp_out(h)
    x = self.mlp_ln(x + self.mlp_dropout(h, deterministic=deterministic, rngs=rngs))
    return constrain(x, ACT), probs


class BertModel(nnx.Module):
  """The encoder: embeddings -> N post-LN layers (-> optional pooler)."""

  def __init__(self, cfg: ModelConfig, *, add_pooler: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = BertEmbeddings(cfg, rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.pooler = (Dense((cfg.hidden_size,), (cfg.hidden_size,), ('embed', 'embed_out'),
                         init_std=cfg.initializer_range, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, rngs=rngs) if add_pooler else None)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, output_hidden_states=False, output_attentions=False,
               inputs_embeds=None):
    shape = (input_ids if inputs_embeds is None else inputs_embeds[..., 0]).shape
    if attention_mask is None:
      attention_mask = jnp.ones(shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(shape, jnp.int32)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs,
                        inputs_embeds=inputs_embeds)
    x = constrain(x, ACT)
    mask = padding_mask(attention_mask)
    hidden, attns = [x], []
    for layer in self.layers:
      x, probs = _call_layer(layer, self.cfg.remat, x, mask, deterministic=deterministic,
                             rngs=rngs, output_attentions=output_attentions)
      hidden.append(x)
      attns.append(probs)
    out = {'last_hidden_state': x}
    if output_hidden_states:
      out['hidden_states'] = tuple(hidden)
    if output_attentions:
      out['attentions'] = tuple(attns)
    if self.pooler is not None:
      out['pooled'] = jnp.tanh(self.pooler(x[:, 0]).astype(jnp.float32)).astype(x.dtype)
    return out


def _call_layer(layer, remat, x, mask, **kw):
  if remat and not kw.get('output_attentions'):
    return nnx.remat(lambda l, x, m: l(x, m, **kw))(layer, x, mask)
  return layer(x, mask, **kw)


class BertForMaskedLM(nnx.Module):
  """Encoder + MLM head (dense-gelu-LN transform, decoder tied to word embeddings + bias)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.bert = BertModel(cfg, rngs=rngs)
    h = cfg.hidden_size
    self.mlm_dense = Dense((h,), (h,), ('embed', 'embed_out'), init_std=cfg.initializer_range,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.mlm_ln = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.mlm_bias = param(None, jax.nn.initializers.zeros, (cfg.vocab_size,), cfg.param_dtype,
                          ('vocab',))

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, masked_positions=None, **kw):
    """`masked_positions` [B, P]: project only those positions (logits [B, P, V])."""
    out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                    rngs=rngs, **kw)
    x = out['last_hidden_state']
    if masked_positions is not None:
      x = jnp.take_along_axis(x, masked_positions[..., None].astype(jnp.int32), axis=1)
    h = self.cfg.act(self.mlm_dense(x).astype(jnp.float32))
    h = self.mlm_ln(h.astype(x.dtype))
    logits = self.bert.embeddings.word.attend(h) + self.mlm_bias[...].astype(jnp.float32)
    out['logits'] = constrain(logits, ('batch', 'length', 'vocab'))
    return out


def classifier_head(cfg: ModelConfig, num_labels: int, rngs: nnx.Rngs) -> Dense:
  """The task projection hidden -> labels shared by the sequence and token heads."""
  return Dense((cfg.hidden_size,), (num_labels,), ('embed', 'classes'),
               init_std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               rngs=rngs)


class _BertClassifier(nnx.Module):
  """Encoder + dropout + classifier over one encoder output (`FEATURE`)."""
  FEATURE = ''

  def __init__(self, cfg: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.feature = self.FEATURE  # an instance attribute: PEFT re-hangs the module's own ones
    self.bert = BertModel(cfg, add_pooler=self.feature == 'pooled', rngs=rngs)
    self.dropout = Dropout(cfg.classifier_dropout)
    self.classifier = classifier_head(cfg, num_labels, rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, **kw):
    out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                    rngs=rngs, **kw)
    x = self.dropout(out[self.feature], deterministic=deterministic, rngs=rngs)
    out['logits'] = self.classifier(x).astype(jnp.float32)
    return out


class BertForSequenceClassification(_BertClassifier):
  """Encoder + pooler ([CLS] dense-tanh) + dropout + classifier."""
  FEATURE = 'pooled'


class BertForTokenClassification(_BertClassifier):
  """Encoder + dropout + a classifier at every position."""
  FEATURE = 'last_hidden_state'


class BertForQuestionAnswering(nnx.Module):
  """Encoder (no pooler) + `qa_outputs`, hidden -> 2 at every position, as Hugging Face's
  BertForQuestionAnswering (which has no dropout before it). `logits` [B, L, 2] fp32: [..., 0]
  the span start's score, [..., 1] its end's; one key, so the paths that gather `logits`
  (eval, predict, export checks) take the head as they take the token classifier."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.bert = BertModel(cfg, rngs=rngs)
    self.qa_outputs = classifier_head(cfg, 2, rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, **kw):
    out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                    rngs=rngs, **kw)
    out['logits'] = self.qa_outputs(out['last_hidden_state']).astype(jnp.float32)
    return out
