"""Building blocks shared by BERT and GPT-2.

Written against plain `jnp` so that dtypes are explicit: parameters live in
`param_dtype` (fp32 by default), matmuls take `dtype` inputs (e.g. bf16) and accumulate
in fp32 (`preferred_element_type`), LayerNorm and softmax always run in fp32.
Every parameter carries logical axis names; activations are constrained by logical
names through `jaxft.partitioning.constrain`, which alone knows the mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import measured
from jaxft.partitioning import constrain

Names = tuple[str | None, ...]


def normal(std: float):
  return jax.nn.initializers.normal(stddev=std)


def param(rngs: nnx.Rngs | None, init, shape, dtype, names: Names) -> nnx.Param:
  """An nnx.Param whose metadata holds its logical axis names (one per dim)."""
  assert len(names) == len(shape), (shape, names)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, shape, dtype), logical_axes=names)


def matmul(x, kernel, contract: int, dtype, *, transposed: bool = False):
  """x[..., *in] @ kernel[*in, *out]: inputs in `dtype`, fp32 accumulation.

  `transposed=True` takes a 2-D kernel stored [out, in] (a tied embedding table) and
  computes x @ kernel.T without materialising the transpose.

  The backward pass is written out (`_matmul`), for two reasons measured in bench/README.md:
  - In a low-precision `dtype`, JAX's own transpose of a bf16 x bf16 -> f32 dot multiplies
    the f32 cotangent with the upcast bf16 operand, so the two backward matmuls (2/3 of the
    FLOPs) would run in fp32. Here they take bf16 inputs too, with fp32 accumulation, and
    the kernel gradient stays fp32 (as torch autocast computes it).
  - In fp32 on CPU, XLA fused the cotangent's producers (the residual stream's backward
    chain, growing with depth) into the transposing copy that feeds the kernel-gradient dot,
    recomputing that chain there: the cotangent is materialised once instead."""
  if transposed:
    assert contract == 1 and kernel.ndim == 2, (contract, kernel.shape)
  return _matmul(x, kernel, contract, jnp.dtype(dtype), transposed)


def _fwd_dims(x_ndim: int, contract: int, transposed: bool):
  """dot_general dims of x[..., *in] with kernel[*in, *out] (or a 2-D [out, in])."""
  if transposed:
    return (((x_ndim - 1,), (1,)), ((), ()))
  return ((tuple(range(x_ndim - contract, x_ndim)), tuple(range(contract))), ((), ()))


def _rows_dot(a2, b2):
  """a2[rows, m]^T @ b2[rows, n] -> [m, n] fp32, contracting the rows.

  In fp32 a plain dot. XLA:CPU has no bf16 kernel for a dot contracting the single dim 0
  of both operands: it silently upcasts both to fp32 and runs 2-3x slower. Contracting two
  dims ([1, rows]) keeps it in bf16, and the unit dim costs nothing; in fp32 that form was
  slower than the plain one (bench/README.md)."""
  if a2.dtype == jnp.float32:
    return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return jax.lax.dot_general(a2[None], b2[None], (((0, 1), (0, 1)), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x, kernel, contract, dtype, transposed):
  return _matmul_fwd(x, kernel, contract, dtype, transposed)[0]


def _matmul_fwd(x, kernel, contract, dtype, transposed):
  xl, kl = x.astype(dtype), kernel.astype(dtype)
  y = jax.lax.dot_general(xl, kl, _fwd_dims(x.ndim, contract, transposed),
                          preferred_element_type=jnp.float32)
  # zero-size arrays carry the primal dtypes (residuals must be arrays)
  return y, (xl, kl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))


def _matmul_bwd(contract, dtype, transposed, res, g):
  xl, kl, x_proto, k_proto = res
  # As 2-D matmuls over [rows, in] and [in, out] (or [out, in] when transposed): free
  # reshapes of row-major arrays.
  n_in = kl.shape[1] if transposed else math.prod(kl.shape[:contract])
  x2 = xl.reshape(-1, n_in)
  k2 = kl if transposed else kl.reshape(n_in, -1)
  n_out = k2.shape[0] if transposed else k2.shape[1]
  g2 = g.astype(dtype).reshape(x2.shape[0], n_out)
  if dtype == jnp.float32 and jax.default_backend() == 'cpu' and _use_cotangent_barrier():
    # one materialised cotangent for both dots (see `matmul`); accelerators keep XLA's
    # fusion choices (not measured there)
    g2 = jax.lax.optimization_barrier(g2)
  dx = jax.lax.dot_general(g2, k2, (((1,), (0 if transposed else 1,)), ((), ())),
                           preferred_element_type=jnp.float32)  # [rows, in]
  dk = _rows_dot(g2, x2) if transposed else _rows_dot(x2, g2)  # kernel's layout
  return (dx.reshape(xl.shape).astype(x_proto.dtype),
          dk.reshape(kl.shape).astype(k_proto.dtype))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@dataclasses.dataclass
class _Barrier:
  on: bool
  sites: int = 0  # fp32 CPU backward passes that asked, while traced


_COTANGENT_BARRIER = contextvars.ContextVar('jaxft_cotangent_barrier', default=None)
# The measured choice (jaxft/measured.py) for the barrier: on (the built-in rule, measured
# helpful on AMD Zen 3, bench/README.md) or off; train/step.py times both on first use.
COTANGENT_BARRIER = measured.Choice('fp32_cotangent_barrier', ('on', 'off'), 'on')


@contextlib.contextmanager
def cotangent_barrier(on: bool):
  """Within (while tracing): whether `matmul`'s fp32 backward on CPU puts its cotangent
  behind an optimization barrier (outside: always). Yields a record whose `sites` counts
  the backward passes that asked: 0 means the choice does not apply to what was traced."""
  record = _Barrier(on)
  token = _COTANGENT_BARRIER.set(record)
  try:
    yield record
  finally:
    _COTANGENT_BARRIER.reset(token)


def _use_cotangent_barrier() -> bool:
  record = _COTANGENT_BARRIER.get()
  if record is None:
    return True
  record.sites += 1
  return record.on


def einsum(spec: str, a, b, dtype):
  """Two-operand einsum with `matmul`'s precision contract: `dtype` inputs, fp32
  accumulation and result, and in low precision a backward whose two einsums also take
  `dtype` inputs (JAX's own transpose would upcast them to fp32). For specs where every
  index appears in at least two of the three terms (attention's batched matmuls)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
  return _lowp_einsum(spec, a, b, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _lowp_einsum(spec, a, b, dtype):
  return _lowp_einsum_fwd(spec, a, b, dtype)[0]


def _lowp_einsum_fwd(spec, a, b, dtype):
  al, bl = a.astype(dtype), b.astype(dtype)
  y = jnp.einsum(spec, al, bl, preferred_element_type=jnp.float32)
  return y, (al, bl, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _lowp_einsum_bwd(spec, dtype, res, g):
  al, bl, a_proto, b_proto = res
  ins, out = spec.split('->')
  sa, sb = ins.split(',')
  # a unit dim contracted alongside, as in `_rows_dot`: XLA:CPU has no bf16 kernel for
  # some single-contracting-dim transposed forms (e.g. p^T @ dy)
  gl = g.astype(dtype)[..., None]
  da = jnp.einsum(f'{out}Z,{sb}Z->{sa}', gl, bl[..., None], preferred_element_type=jnp.float32)
  db = jnp.einsum(f'{out}Z,{sa}Z->{sb}', gl, al[..., None], preferred_element_type=jnp.float32)
  return da.astype(a_proto.dtype), db.astype(b_proto.dtype)


_lowp_einsum.defvjp(_lowp_einsum_fwd, _lowp_einsum_bwd)


class Dense(nnx.Module):
  """y = x @ kernel + bias, with `in_shape` contracted dims and `out_shape` output dims."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Names, *,
               use_bias: bool = True, init_std: float = 0.02, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    self.contract = len(in_shape)
    self.dtype = dtype
    self.kernel = param(rngs, normal(init_std), in_shape + out_shape, param_dtype, names)
    self.bias = (param(rngs, jax.nn.initializers.zeros, out_shape, param_dtype,
                       names[len(in_shape):]) if use_bias else None)

  def __call__(self, x):
    y = matmul(x, self.kernel[...], self.contract, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)

  def folded(self):
    """(kernel, after) with y = after(x @ kernel + bias), `after` None here: what
    `quantize.int8` rounds and what it keeps. A subclass that adds terms (jaxft.peft's LoRA,
    adapters) overrides it, so quantising never drops them."""
    return self.kernel[...], None


class Embed(nnx.Module):
  def __init__(self, num: int, features: int, names: Names, *, init_std: float = 0.02,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, normal(init_std), (num, features), param_dtype, names)

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """Tied output projection: x @ embedding.T (fp32 accumulation; bf16 backward as in
    `matmul`)."""
    return matmul(x, self.embedding[...], 1, self.dtype, transposed=True)


class LayerNorm(nnx.Module):
  def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(None, jax.nn.initializers.ones, (features,), param_dtype, ('norm',))
    self.bias = param(None, jax.nn.initializers.zeros, (features,), param_dtype, ('norm',))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def padding_mask(attention_mask):
  """[B, S] 0/1 -> [B, 1, 1, S] bool (True = attend)."""
  return attention_mask[:, None, None, :].astype(bool)


class Dropout(nnx.Dropout):
  """nnx.Dropout that draws its mask with JAX's original threefry counter layout on CPU.

  JAX's default (`jax_threefry_partitionable`) hashes each element's own 64-bit counter so a
  sharded mask needs no communication; XLA:CPU runs it ~4x slower. Forward + backward of
  dropout on gpt2-small's [4, 12, 256, 256] attention probabilities: ~22 ms against ~2.5 ms
  (bench/README.md). CPU meshes are small (tests, one host), so the sharding-friendly
  layout is not worth that; the masks are as random, from a different stream.
  Accelerators keep JAX's default.
  """

  def __call__(self, inputs, *, deterministic=None, rngs=None):
    layout = (jax.threefry_partitionable(False) if jax.default_backend() == 'cpu'
              else contextlib.nullcontext())
    with layout:
      return super().__call__(inputs, deterministic=deterministic, rngs=rngs)


def use_fused_attention(dtype) -> bool:
  """Whether to use `jax.nn.dot_product_attention`. On CPU it lowers to plain XLA math whose
  matmuls run in fp32 even for bf16 inputs, while `_explicit` keeps the forward and backward
  matmuls bf16 (`einsum`): measured in bench/README.md. Its default implementation is XLA's
  on every back end in jax 0.10 (`None` does not pick cuDNN's flash kernel yet); see
  `attention_implementation`."""
  return jnp.dtype(dtype) == jnp.float32 or jax.default_backend() != 'cpu'


_ATTENTION_IMPL = contextvars.ContextVar('jaxft_attention_implementation', default=None)


@contextlib.contextmanager
def attention_implementation(impl: str | None):
  """Within: `jax.nn.dot_product_attention(implementation=impl)` ('xla', 'cudnn'; None is
  JAX's default) in what traces here. bench/accelerator.py times cuDNN's flash attention
  against the default with it; not a setting until it is measured on a GPU."""
  token = _ATTENTION_IMPL.set(impl)
  try:
    yield
  finally:
    _ATTENTION_IMPL.reset(token)


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v kernels [embed, heads, kv]."""

  def __init__(self, hidden: int, heads: int, *, dropout: float, dtype, param_dtype,
               init_std: float = 0.02, out_init_std: float | None = None, rngs: nnx.Rngs):
    self.heads, self.head_dim = heads, hidden // heads
    if hidden % heads:
      raise ValueError(f'hidden_size {hidden} is not divisible by num_heads {heads}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv_names = ('embed', 'heads', 'kv')
    self.query = Dense((hidden,), (heads, self.head_dim), qkv_names, init_std=init_std, **kw)
    self.key = Dense((hidden,), (heads, self.head_dim), qkv_names, init_std=init_std, **kw)
    self.value = Dense((hidden,), (heads, self.head_dim), qkv_names, init_std=init_std, **kw)
    self.out = Dense((heads, self.head_dim), (hidden,), ('heads', 'kv', 'embed'),
                     init_std=out_init_std or init_std, **kw)
    self.dropout = Dropout(dropout)
    self.dropout_rate = dropout
    self.dtype = dtype

  def __call__(self, x, mask, *, causal: bool = False, deterministic: bool = True, rngs=None,
               output_attentions: bool = False, cache=None):
    """x [B,T,E]; mask [B,1,T|1,S] bool or None. Returns (y, probs or None, new_cache).

    With `cache` (dict k, v [B,S,H,D], index scalar) the new keys/values are written at
    `index` and attention runs over the whole cache (incremental decoding).
    """
    q = constrain(self.query(x), ('batch', 'length', 'heads', 'kv'))
    k = constrain(self.key(x), ('batch', 'length', 'heads', 'kv'))
    v = constrain(self.value(x), ('batch', 'length', 'heads', 'kv'))
    new_cache = None
    if cache is not None:
      idx = cache['index']
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, idx, 0, 0))
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, idx, 0, 0))
      new_cache = {'k': k, 'v': v, 'index': idx + x.shape[1]}
      q_pos = idx + jnp.arange(x.shape[1])
      k_pos = jnp.arange(k.shape[1])
      allowed = k_pos[None, :] <= q_pos[:, None]  # [T, S]: causal over the filled cache
      mask = allowed[None, None] if mask is None else (mask & allowed[None, None])
      causal = False
    use_dropout = self.dropout_rate > 0 and not deterministic
    if output_attentions or use_dropout or not use_fused_attention(self.dtype):
      y, probs = self._explicit(q, k, v, mask, causal, deterministic, rngs)
    else:
      y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                       is_causal=causal, implementation=_ATTENTION_IMPL.get())
      probs = None
    y = constrain(y, ('batch', 'length', 'heads', 'kv'))
    return self.out(y), probs, new_cache

  def _explicit(self, q, k, v, mask, causal, deterministic, rngs):
    """Softmax attention written out: needed for attention dropout and returned probs."""
    scores = einsum('bthd,bshd->bhts', q, k, self.dtype) / math.sqrt(self.head_dim)
    if causal:
      t, s = scores.shape[-2:]
      cmask = jnp.tril(jnp.ones((t, s), bool))[None, None]
      mask = cmask if mask is None else (mask & cmask)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = self.dropout(probs, deterministic=deterministic, rngs=rngs)
    y = einsum('bhts,bshd->bthd', dropped, v, self.dtype).astype(self.dtype)
    return y, probs
