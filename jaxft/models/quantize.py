"""Int8 inference: per-output-channel absmax int8 weights for the dense kernels, dynamic
per-token int8 activations, an int8 x int8 -> int32 dot.

`int8(model)` replaces every `layers.Dense` in a built model by an `Int8Dense` holding
  kernel_q  int8  [*in, *out]   round(kernel / scale), |kernel_q| <= 127
  scale     fp32  [*out]        max |kernel| over the contracted dims / 127
  bias      fp32  [*out]        unchanged
and computes y = (x_q . kernel_q) * x_scale * scale + bias, where x_q = round(x / x_scale)
with x_scale = max |x| over the token's contracted dims / 127 (computed per call: no
calibration data). The dot accumulates in int32, exactly; every error comes from the two
roundings, each at most half a step: |y - y_fp32| <= x_scale/2 * sum_i |kernel_ij|
+ scale_j/2 * sum_i |x_q_i| x_scale (`error_bound`, what tests/test_deploy.py checks).

Kept in fp32, on purpose:
- embeddings (word, position, type): they are gathered, not multiplied, so int8 would buy
  size but no speed, and their error would reach the first LayerNorm unbounded by a dot;
  in a small encoder they are a large share of the bytes (all-MiniLM-L6-v2: 12 M of 22.7 M
  parameters), which bench/deploy.py reports as it is;
- LayerNorm scales and biases, dense biases: O(hidden) numbers added or multiplied
  elementwise after the int32 accumulation, where int8 saves nothing measurable;
- attention's q.k and p.v products: activations on both sides (no weight to quantize);
- PEFT adapters (jaxft.peft): a nonlinear bottleneck after their Dense, not foldable into
  its kernel and small. LoRA is linear: W + scale * A B is folded before rounding
  (`layers.Dense.folded`), so nothing a fine-tune trained is dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import layers

QMAX = 127  # symmetric int8: -127..127 (never -128, so the range is symmetric)


def absmax_scale(x, axes: tuple[int, ...]):
  """max |x| over `axes` / 127, keeping dims; 1 where the slice is all zeros (any scale
  represents zeros exactly, and a 0 scale would divide by zero)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
  return jnp.where(amax > 0, amax / QMAX, 1.0)


def quantize(x, scale):
  """round(x / scale) as int8, clipped to +-127 (a no-op for an absmax scale)."""
  return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -QMAX, QMAX).astype(jnp.int8)


def quantize_kernel(kernel, contract: int):
  """(int8 kernel, fp32 scale [*out]): one absmax scale per output channel."""
  scale = absmax_scale(kernel, tuple(range(contract)))
  return quantize(kernel, scale), scale.reshape(kernel.shape[contract:])


def int8_matmul(x, kernel_q, scale, contract: int):
  """x[..., *in] @ dequant(kernel_q)[*in, *out] with per-token int8 activations and an
  int32-accumulated int8 dot; fp32 result."""
  x_axes = tuple(range(x.ndim - contract, x.ndim))
  x_scale = absmax_scale(x, x_axes)  # [..., 1 (x contract)]
  x_q = quantize(x, x_scale)
  acc = jax.lax.dot_general(x_q, kernel_q, ((x_axes, tuple(range(contract))), ((), ())),
                            preferred_element_type=jnp.int32)
  token_scale = x_scale.reshape(x_scale.shape[:x.ndim - contract] + (1,) * (scale.ndim))
  return acc.astype(jnp.float32) * token_scale * scale


def error_bound(x, kernel, contract: int):
  """The largest |int8_matmul - exact matmul| the two roundings allow, per output: half an
  activation step times sum |kernel| plus half a weight step times sum |x_q * x_scale|
  (exact arithmetic; the int32 accumulation adds nothing)."""
  x_axes = tuple(range(x.ndim - contract, x.ndim))
  k_axes = tuple(range(contract))
  x_scale = absmax_scale(x, x_axes)
  kernel_q, scale = quantize_kernel(kernel, contract)
  x_deq = quantize(x, x_scale).astype(jnp.float32) * x_scale
  abs_dims = ((x_axes, k_axes), ((), ()))
  token_scale = x_scale.reshape(x_scale.shape[:x.ndim - contract] + (1,) * scale.ndim)
  return (token_scale / 2 * jax.lax.dot_general(jnp.ones_like(x), jnp.abs(kernel), abs_dims)
          + jax.lax.dot_general(jnp.abs(x_deq), jnp.ones_like(kernel), abs_dims) * scale / 2)


class Int8Dense(nnx.Module):
  """`layers.Dense` with an int8 kernel (module docstring); the same call contract. The
  kernel rounded is `dense.folded()`'s, so a LoRA delta is in it; a module the Dense applies
  to its output (a PEFT adapter) is kept as it is, in fp32."""

  def __init__(self, dense: layers.Dense):
    names = tuple(getattr(dense.kernel, 'logical_axes', None) or
                  (None,) * dense.kernel[...].ndim)
    self.contract = dense.contract
    self.dtype = dense.dtype
    kernel, self.after = dense.folded()
    kernel_q, scale = quantize_kernel(kernel, dense.contract)
    self.kernel_q = nnx.Param(kernel_q, logical_axes=names)
    self.scale = nnx.Param(scale, logical_axes=names[dense.contract:])
    self.bias = dense.bias

  def __call__(self, x):
    y = int8_matmul(x, self.kernel_q[...], self.scale[...], self.contract)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    y = y.astype(self.dtype)
    return y if self.after is None else self.after(y)


def int8(model: nnx.Module) -> nnx.Module:
  """The model with every `layers.Dense` replaced by an `Int8Dense` (in place; returned)."""
  for name, value in list(vars(model).items()):
    if isinstance(value, layers.Dense):
      setattr(model, name, Int8Dense(value))
    elif isinstance(value, nnx.List):
      for i, item in enumerate(value):
        if isinstance(item, layers.Dense):
          value[i] = Int8Dense(item)
        elif isinstance(item, nnx.Module):
          int8(item)
    elif isinstance(value, nnx.Module):
      int8(value)
  return model


def param_bytes(params) -> int:
  """Bytes of a parameter tree as stored (int8 kernels count 1 byte per weight)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
