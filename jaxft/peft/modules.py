"""PEFT modules, put into an already built model by module surgery (`inject`).

Why surgery rather than options in the model code: the base models stay untouched and any
model built from `jaxft.models.layers.Dense` gains LoRA/adapters by path regex. The swapped
modules adopt the base `kernel`/`bias` Params, so base parameter paths are unchanged
(checkpoints, `init_from` and the HF tables keep working) and the new Params sit next to
them (`...attn.query.lora_a`, `...attn.out.adapter.down.kernel`, top-level `prompt`), each
with logical axis names, so `partitioning` shards them like everything else.

LoRA runs on the input side, `y = x W + (alpha/r) * (dropout(x) A) B`, so LoRA dropout is
real dropout on the LoRA branch only. Dense.__call__ takes no `rngs`; `PeftModel.__call__`
publishes `(deterministic, rngs)` in a context variable for the duration of the (traced)
call, which `PeftDense` reads. Outside a PeftModel call, LoRA dropout is off.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import word_embeddings
from jaxft.models.config import ACTIVATIONS
from jaxft.models.layers import Dense, Dropout, LayerNorm, matmul, param
from jaxft.peft.config import PeftConfig

# Path components that mark a PEFT parameter (everything else belongs to the base model).
PEFT_KEYS = ('lora_a', 'lora_b', 'adapter', 'prompt')

_CALL = contextvars.ContextVar('jaxft_peft_call', default=None)


@contextlib.contextmanager
def call_context(deterministic: bool, rngs):
  token = _CALL.set((deterministic, rngs))
  try:
    yield
  finally:
    _CALL.reset(token)


def _names(var) -> tuple:
  names = var.get_metadata().get('logical_axes')
  return tuple(names) if names else (None,) * var[...].ndim


def _uniform(bound: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Adapter(nnx.Module):
  """Houlsby bottleneck on the last axis: y + up(act(down(y))). `up` starts at zero, so the
  adapted model computes exactly what the base model does until it trains."""

  def __init__(self, features: int, size: int, name: str | None, *, act: str, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.act = ACTIVATIONS[act]
    self.down = Dense((features,), (size,), (name, 'adapter'), init_std=init_std, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    self.up = Dense((size,), (features,), ('adapter', name), init_std=init_std, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
    self.up.kernel = param(None, jax.nn.initializers.zeros, (size, features), param_dtype,
                           ('adapter', name))

  def __call__(self, y):
    h = self.act(self.down(y).astype(jnp.float32)).astype(self.dtype)
    return (y.astype(jnp.float32) + self.up(h).astype(jnp.float32)).astype(self.dtype)


class PeftDense(Dense):
  """A Dense holding the base kernel/bias plus an optional LoRA pair and/or adapter.

  lora_a [*in, r] ('...in names', 'lora_rank'): uniform(+-1/sqrt(fan_in)) like HF PEFT;
  lora_b [r, *out] ('lora_rank', '...out names'): zero, so the delta starts at 0.
  """

  def __init__(self, base: Dense, pcfg: PeftConfig, *, lora: bool, adapter: bool,
               rngs: nnx.Rngs):
    self.contract, self.dtype = base.contract, base.dtype
    self.kernel, self.bias = base.kernel, base.bias
    k = base.kernel[...]
    names = _names(base.kernel)
    in_shape, out_shape = k.shape[:self.contract], k.shape[self.contract:]
    in_names, out_names = names[:self.contract], names[self.contract:]
    r = pcfg.lora_rank
    self.lora_a = param(rngs, _uniform(1.0 / math.sqrt(math.prod(in_shape))),
                        tuple(in_shape) + (r,), k.dtype,
                        tuple(in_names) + ('lora_rank',)) if lora else None
    self.lora_b = param(None, jax.nn.initializers.zeros, (r,) + tuple(out_shape), k.dtype,
                        ('lora_rank',) + tuple(out_names)) if lora else None
    self.lora_scale = pcfg.lora_scale if lora else 0.0
    self.lora_dropout = Dropout(pcfg.lora_dropout if lora else 0.0)
    if adapter and len(out_shape) != 1:
      raise ValueError(f'an adapter needs a Dense with one output axis, got {out_shape}')
    self.adapter = Adapter(out_shape[0], pcfg.adapter_size, out_names[0], act=pcfg.adapter_act,
                           init_std=0.02, dtype=self.dtype, param_dtype=k.dtype,
                           rngs=rngs) if adapter else None

  def _lora_input(self, x):
    ctx = _CALL.get()  # (deterministic, rngs) of the model call, if any
    if ctx is None or ctx[1] is None:
      return x
    return self.lora_dropout(x, deterministic=ctx[0], rngs=ctx[1])

  def __call__(self, x):
    y = matmul(x, self.kernel[...], self.contract, self.dtype)
    if self.lora_a is not None:
      h = matmul(self._lora_input(x), self.lora_a[...], self.contract, self.dtype)
      y = y + self.lora_scale * matmul(h, self.lora_b[...], 1, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    y = y.astype(self.dtype)
    return y if self.adapter is None else self.adapter(y)

  def folded(self):
    """(W + lora_scale * A B in fp32, the adapter): inference has no LoRA dropout, so the
    LoRA branch is exactly a kernel term; the adapter is nonlinear and stays a module."""
    kernel = self.kernel[...].astype(jnp.float32)
    if self.lora_a is not None:
      kernel = kernel + self.lora_scale * jnp.tensordot(
          self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32), axes=1)
    return kernel, self.adapter


class PeftModel(nnx.Module):
  """The base model's children re-hung on a module that adds soft prompts and the LoRA
  dropout context, then runs the base class's own forward on itself.

  Taking the children (not wrapping the module) keeps every base path as it was: a
  wrapper attribute would prefix all of them. `prompt` [k, embed] ('prompt', 'embed') is
  inserted after [CLS] for BERT (the pooler and cloze templates still see [CLS] first)
  and before everything for GPT-2; the attention mask gets k ones, token types k zeros,
  `masked_positions` are shifted, and per-position outputs drop the prompt rows again.
  While decoding with a KV cache, `init_cache` runs the soft prompt into the cache once and
  every later call only extends the mask and shifts `position_ids` past it.
  """

  def __init__(self, base: nnx.Module, pcfg: PeftConfig, *, rngs: nnx.Rngs):
    self.base_cls = type(base)
    for k, v in vars(base).items():
      if not k.startswith('_'):
        setattr(self, k, v)
    prompted = 'prompt' in pcfg.methods
    word = word_embeddings(self).embedding if prompted else None
    self.prompt = param(rngs, jax.nn.initializers.normal(0.02),
                        (pcfg.prompt_length, word[...].shape[1]), word[...].dtype,
                        ('prompt', _names(word)[1])) if prompted else None
    self.prompt_at = 1 if self.cfg.model_type == 'bert' else 0

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
               rngs=None, **kw):
    with call_context(deterministic, rngs):
      if self.prompt is None:
        return self.base_cls.__call__(self, input_ids, attention_mask, token_type_ids,
                                      deterministic=deterministic, rngs=rngs, **kw)
      return self._prompted(input_ids, attention_mask, token_type_ids,
                            deterministic=deterministic, rngs=rngs, **kw)

  def _prompted(self, input_ids, attention_mask, token_type_ids, **kw):
    if kw.get('cache') is not None:
      return self._prompted_cached(input_ids, attention_mask, token_type_ids, **kw)
    if kw.get('segment_ids') is not None:
      raise ValueError('prompt tuning prepends one soft prompt per row: packed rows '
                       '(segment_ids) are not supported')
    embeds = kw.pop('inputs_embeds', None)
    if embeds is None:
      embeds = word_embeddings(self)(input_ids)
    b, n = embeds.shape[:2]
    k, at = self.prompt.shape[0], self.prompt_at
    p = jnp.broadcast_to(self.prompt[...].astype(embeds.dtype)[None], (b, k, embeds.shape[2]))
    embeds = jnp.concatenate([embeds[:, :at], p, embeds[:, at:]], axis=1)

    def extend(x, fill):
      if x is None:  # the models' defaults: attend everywhere, token type 0
        x = jnp.full((b, n), fill, jnp.int32)
      pad = jnp.full((b, k), fill, x.dtype)
      return jnp.concatenate([x[:, :at], pad, x[:, at:]], axis=1)

    attention_mask = extend(attention_mask, 1)
    if token_type_ids is not None:
      token_type_ids = extend(token_type_ids, 0)
    if kw.get('position_ids') is not None:  # the prompt takes positions 0..k-1 (GPT-2)
      pos = kw['position_ids']
      kw['position_ids'] = jnp.concatenate(
          [pos[:, :at], jnp.broadcast_to(jnp.arange(k, dtype=pos.dtype), (b, k)),
           pos[:, at:] + k], axis=1)
    positional = True
    for key in ('masked_positions', 'logits_positions'):
      if kw.get(key) is not None:
        kw[key] = jnp.where(kw[key] >= at, kw[key] + k, kw[key])
        positional = False
    out = self.base_cls.__call__(self, None, attention_mask, token_type_ids,
                                 inputs_embeds=embeds, **kw)
    drop = lambda x: jnp.concatenate([x[:, :at], x[:, at + k:]], axis=1)
    if out['last_hidden_state'].shape[1] == n + k:
      out['last_hidden_state'] = drop(out['last_hidden_state'])
    if positional and out['logits'].ndim == 3 and out['logits'].shape[1] == n + k:
      out['logits'] = drop(out['logits'])
    return out

  def _prompted_cached(self, input_ids, attention_mask, token_type_ids, **kw):
    """Incremental decoding: the soft prompt is already in the cache (`init_cache` put it
    there), so the mask gets its k leading ones and positions move past it."""
    k = self.prompt.shape[0]
    if attention_mask is not None:
      b = attention_mask.shape[0]
      attention_mask = jnp.concatenate([jnp.ones((b, k), attention_mask.dtype), attention_mask],
                                       axis=1)
    if kw.get('position_ids') is not None:
      kw['position_ids'] = kw['position_ids'] + k
    return self.base_cls.__call__(self, input_ids, attention_mask, token_type_ids, **kw)

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    """The base model's KV cache; with a soft prompt, k positions longer and already holding
    the prompt's keys and values (what a prompted forward would put first)."""
    if self.prompt is None:
      return self.base_cls.init_cache(self, batch_size, max_length, dtype)
    if self.prompt_at != 0:
      raise ValueError('incremental decoding with a soft prompt needs a decoder (GPT-2)')
    k = self.prompt.shape[0]
    cache = self.base_cls.init_cache(self, batch_size, max_length + k, dtype)
    word = word_embeddings(self).embedding[...]
    embeds = jnp.broadcast_to(self.prompt[...].astype(word.dtype)[None],
                              (batch_size, k, word.shape[1]))
    out = self.base_cls.__call__(self, None, None, None, inputs_embeds=embeds, cache=cache,
                                 logits_positions=jnp.full((batch_size, 1), k - 1, jnp.int32))
    return out['cache']


def _get(tree, path):
  for p in path:
    tree = tree[p] if isinstance(p, int) else getattr(tree, p)
  return tree


def _set(parent, key, value):
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def dense_paths(model) -> list[str]:
  """Dotted paths of every Dense in `model` (for error messages and docs)."""
  return sorted('.'.join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, Dense))


def inject(model: nnx.Module, pcfg: PeftConfig, *, rngs: nnx.Rngs | None = None) -> PeftModel:
  """Swap matching Dense layers for PeftDense and return the PeftModel around `model`'s
  children. Deterministic: targets are visited in path order with their own RNG stream."""
  rngs = rngs or nnx.Rngs(params=jax.random.fold_in(jax.random.key(pcfg.seed), 0x9EF7))
  lora_re = re.compile(pcfg.lora_targets) if 'lora' in pcfg.methods else None
  adapter_re = re.compile(pcfg.adapter_targets) if 'adapter' in pcfg.methods else None
  found = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, Dense) or isinstance(node, PeftDense) or not path:
      continue
    name = '.'.join(map(str, path))
    lora = bool(lora_re and lora_re.search(name))
    adapter = bool(adapter_re and adapter_re.search(name))
    if lora or adapter:
      found.append((tuple(path), lora, adapter))
  found.sort(key=lambda t: tuple(f'{p:08d}' if isinstance(p, int) else p for p in t[0]))
  for method, regex, col in (('lora', lora_re, 1), ('adapter', adapter_re, 2)):
    if regex is not None and not any(f[col] for f in found):
      raise ValueError(f'peft.{method}.targets={regex.pattern!r} matches no Dense layer; '
                       f'Dense layers: {dense_paths(model)}')
  for path, lora, adapter in found:
    _set(_get(model, path[:-1]), path[-1],
         PeftDense(_get(model, path), pcfg, lora=lora, adapter=adapter, rngs=rngs))
  return PeftModel(model, pcfg, rngs=rngs)


def layernorm_paths(model) -> list[str]:
  return sorted('.'.join(map(str, p)) for p, n in nnx.iter_graph(model)
                if isinstance(n, LayerNorm))
