"""The fast training paths used by bench/train_throughput.py give the reference losses.

- masked-position MLM head (`mlm.max_predictions` >= the number of selected tokens):
  the same loss (and gradients) as the full-vocab head at every position, in fp32;
- bf16 compute (`model.dtype='bfloat16'`, fp32 params): the fp32 loss within bf16
  tolerance, also through the real jitted train step; the bf16 matmul's backward runs
  on bf16 operands with fp32 accumulation.
Tiny BERT, fp32 parameters shared by every variant.
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import partitioning
from jaxft.data.masking import MaskingSettings
from jaxft.models import ModelConfig, build_model
from jaxft.objectives.lm import mlm as mlm_objective
from jaxft.partitioning import MeshSettings
from jaxft.train.optimizer import OptimizerSettings, make_optimizer
from jaxft.train.state import ModelDef, create_train_state
from jaxft.train.step import global_batch, make_train_step

VOCAB, CLS, SEP, PAD, MASK = 256, 2, 3, 0, 4
B, L = 8, 48
MAX_PRED = math.ceil(0.15 * L)  # >= floor(0.15 * n + u) for every row: nothing truncated
CFG = ModelConfig(model_type='bert', vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                  intermediate_size=64, max_position_embeddings=64)


class _Tok:
  mask_token_id = MASK

  def __len__(self):
    return VOCAB


def _task(max_pred):
  return mlm_objective(_Tok(), MaskingSettings(max_predictions=max_pred))


def _batch():
  """Rows of different lengths (right padding) so padding is exercised too."""
  rng = np.random.default_rng(0)
  ids = rng.integers(10, VOCAB, (B, L)).astype(np.int32)
  n = np.array([L, L, L, 40, 33, 20, 12, L])
  attn = (np.arange(L)[None] < n[:, None]).astype(np.int32)
  ids[:, 0] = CLS
  ids[np.arange(B), n - 1] = SEP
  ids = np.where(attn > 0, ids, PAD).astype(np.int32)
  special = ((ids == CLS) | (ids == SEP) | (attn == 0)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special}


@pytest.fixture(scope='module')
def params():
  """fp32 params of a fresh model, perturbed so LayerNorm scales/biases are not 1/0."""
  def init():  # one jit: eager init would compile op by op
    p = nnx.to_pure_dict(nnx.state(build_model(CFG, 'mlm', seed=0), nnx.Param))
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])

  return jax.jit(init)()


@functools.lru_cache(maxsize=None)
def _loss_fn(cfg, max_pred, deterministic):
  """jitted (params, batch, rng) -> (loss, weight, grads) through the MLM objective's
  prepare/loss."""
  model_def = ModelDef.create(lambda: build_model(cfg, 'mlm', seed=0))
  task = _task(max_pred)

  def f(params, batch, rng):
    prepared = task.prepare(batch, jax.random.fold_in(rng, 1))

    def loss(p):
      loss_sum, sums = task.loss(model_def.merge(p), prepared, jax.random.fold_in(rng, 2),
                                 deterministic)
      return loss_sum / sums['weight'], sums['weight']

    (l, w), g = jax.value_and_grad(loss, has_aux=True)(params)
    return l, w, g

  return jax.jit(f)


@pytest.mark.parametrize('deterministic', [True, False], ids=['no_dropout', 'dropout'])
def test_masked_positions_equal_full_vocab_loss_fp32(params, deterministic):
  batch, rng = _batch(), jax.random.key(7)
  full = _loss_fn(CFG, 0, deterministic)(params, batch, rng)
  gathered = _loss_fn(CFG, MAX_PRED, deterministic)(params, batch, rng)
  assert float(full[1]) == float(gathered[1]) > 0  # same tokens scored: nothing truncated
  # The head's matmul over [B, P] gathered rows vs [B, L] rows: other kernel blocking, so
  # each logit may round differently (~sqrt(hidden) ulps, 3e-7 relative); 5e-6 holds on any
  # CPU, and a wrong position or label would be off by far more.
  np.testing.assert_allclose(float(gathered[0]), float(full[0]), rtol=5e-6, atol=0)
  # Relative to the largest gradient entry: some (key biases) are zero up to rounding.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(full[2]))
  for a, b in zip(jax.tree.leaves(gathered[2]), jax.tree.leaves(full[2])):
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5)


@pytest.mark.parametrize('max_pred', [0, MAX_PRED], ids=['full_vocab', 'masked_positions'])
def test_bf16_compute_matches_fp32_loss(params, max_pred):
  batch, rng = _batch(), jax.random.key(3)
  ref = _loss_fn(CFG, max_pred, True)(params, batch, rng)
  bf16 = _loss_fn(CFG.replace(dtype=jnp.bfloat16), max_pred, True)(params, batch, rng)
  assert float(bf16[1]) == float(ref[1])
  np.testing.assert_allclose(float(bf16[0]), float(ref[0]), rtol=2e-2)
  assert jax.tree.leaves(bf16[2])[0].dtype == jnp.float32  # fp32 master params / grads


def _compiled_train_step(cfg, max_pred, params=None):
  """(compiled step, its state, its batch): the real jitted train step on the test batch."""
  mesh, rules = MeshSettings().build()
  model_def = ModelDef.create(lambda: build_model(cfg, 'mlm', seed=0))
  tx, _ = make_optimizer(OptimizerSettings(), 100, model_def.abstract_params)
  state, shardings = create_train_state(model_def, tx, mesh, rules, seed=0, params=params)
  step = make_train_step(model_def, _task(max_pred), tx, shardings, mesh, rules)
  batch = global_batch(_batch(), mesh, rules)
  with partitioning.use_mesh(mesh, rules):
    return step.jitted.lower(state, batch).compile(), state, batch


def test_fast_train_step_matches_fp32_train_step(params):
  """The bench's modes through make_train_step: fp32 full head vs bf16 + masked positions."""
  out = {}
  for name, cfg, max_pred in (('fp32', CFG, 0), ('fast', CFG.replace(dtype='bfloat16'), MAX_PRED)):
    compiled, state, batch = _compiled_train_step(
        cfg, max_pred, params=jax.device_get(params))  # the step donates
    _, metrics = compiled(state, batch)
    out[name] = jax.device_get(metrics)
    if name == 'fast':
      _assert_every_dot_reads_bf16(compiled.as_text(), cfg.num_layers)
  assert out['fast']['weight'] == out['fp32']['weight'] > 0
  np.testing.assert_allclose(out['fast']['loss'], out['fp32']['loss'], rtol=2e-2)
  np.testing.assert_allclose(out['fast']['grad_norm'], out['fp32']['grad_norm'], rtol=5e-2)


@pytest.mark.parametrize('contract,x_shape,k_shape', [
    (1, (4, 5, 16), (16, 32)),        # Dense
    (1, (4, 5, 16), (16, 2, 8)),      # q/k/v: [embed] -> [heads, kv]
    (2, (4, 5, 2, 8), (2, 8, 16)),    # attention output: [heads, kv] -> [embed]
])
def test_bf16_matmul_backward_runs_in_bf16_with_fp32_accumulation(contract, x_shape, k_shape):
  """The bf16 matmul's backward takes bf16 operands (JAX's own transpose would upcast them
  and run both backward matmuls in fp32), accumulates in fp32, and returns the kernel
  gradient in fp32: exactly the fp32 math on bf16-rounded operands and cotangent."""
  from jaxft.models import layers
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  k = jax.random.normal(kk, k_shape)
  g = jax.random.normal(kg, x_shape[:x.ndim - contract] + k_shape[contract:])
  y, vjp = jax.vjp(lambda x, k: layers.matmul(x, k, contract, jnp.bfloat16), x, k)
  dx, dk = jax.jit(vjp)(g)
  assert y.dtype == dx.dtype == dk.dtype == jnp.float32
  r = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  n_in = math.prod(k_shape[:contract])
  x2, k2 = r(x).reshape(-1, n_in), r(k).reshape(n_in, -1)
  g2 = r(g).reshape(x2.shape[0], -1)
  np.testing.assert_allclose(np.asarray(y).reshape(g2.shape), x2 @ k2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dk).reshape(k2.shape), x2.T @ g2, rtol=1e-5, atol=1e-5)
  # dx is returned in x's dtype (fp32 here) from the fp32 accumulator
  np.testing.assert_allclose(np.asarray(dx).reshape(x2.shape), g2 @ k2.T, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(vjp).lower(g).as_text()
  dots = [ln for ln in hlo.splitlines() if 'stablehlo.dot_general' in ln]
  assert len(dots) == 2 and all(ln.split('->')[0].count('bf16>') == 2 and
                                'f32>' in ln.split('->')[1] for ln in dots), dots


@pytest.mark.parametrize('contract,x_shape,k_shape,transposed', [
    (1, (4, 5, 16), (16, 32), False),      # Dense
    (1, (4, 5, 16), (16, 2, 8), False),    # q/k/v
    (2, (4, 5, 2, 8), (2, 8, 16), False),  # attention output
    (1, (4, 5, 16), (40, 16), True),       # tied head over a [vocab, embed] table
])
def test_fp32_matmul_backward_is_autodiff_with_one_materialised_cotangent(
    contract, x_shape, k_shape, transposed):
  """fp32's written-out backward equals JAX's own gradient of the plain dot, and on CPU
  it materialises the cotangent once (an optimization barrier): without it XLA fused the
  residual stream's backward chain into the kernel gradient's transposing copy and
  recomputed it there (gpt2-small fp32 step 14.1 -> 10.3-10.9 s, bench/README.md)."""
  from jaxft.models import layers
  kx, kk, kg = jax.random.split(jax.random.key(2), 3)
  x, k = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
  dims = layers._fwd_dims(x.ndim, contract, transposed)
  plain = lambda x, k: jax.lax.dot_general(x, k, dims)
  ours = lambda x, k: layers.matmul(x, k, contract, jnp.float32, transposed=transposed)
  g = jax.random.normal(kg, plain(x, k).shape)
  want = jax.vjp(plain, x, k)[1](g)
  y, vjp = jax.vjp(ours, x, k)
  np.testing.assert_allclose(y, plain(x, k), rtol=1e-6, atol=1e-5)
  for got, ref in zip(jax.jit(vjp)(g), want):
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(vjp).lower(g).as_text()
  assert ('optimization_barrier' in hlo) == (jax.default_backend() == 'cpu'), hlo


def test_bf16_step_without_attention_dropout_keeps_bf16_matmuls_on_cpu():
  """With attention dropout 0 (configs/gpt2_clm.py) jax.nn.dot_product_attention would run
  every attention matmul in fp32 on CPU; the bf16 model takes the explicit path there."""
  from jaxft.models import layers
  assert layers.use_fused_attention(jnp.float32)
  assert layers.use_fused_attention(jnp.bfloat16) == (jax.default_backend() != 'cpu')
  cfg = CFG.replace(dtype='bfloat16', attention_dropout=0.0)
  compiled, _, _ = _compiled_train_step(cfg, MAX_PRED)
  _assert_every_dot_reads_bf16(compiled.as_text(), cfg.num_layers)


def _assert_every_dot_reads_bf16(hlo: str, num_layers: int):
  """After XLA's own passes, every matmul of a bf16 step still reads bf16 operands: XLA:CPU
  silently upcasts forms it has no bf16 kernel for (kernel gradients contracting one rows
  dim, p^T @ dy in attention), which ran them 2-3x slower."""
  dots = []  # ((lhs dtype, rhs dtype), line) for every dot of the optimized module
  for comp in re.split(r'\n(?=\S)', hlo):
    types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', comp))
    for m in re.finditer(r'^.* dot\(%([\w.\-]+), %([\w.\-]+)\).*$', comp, re.M):
      dots.append(((types.get(m.group(1)), types.get(m.group(2))), m.group(0).strip()[:160]))
  assert len(dots) >= 6 * num_layers, dots  # 2 fwd + 4 bwd per matmul, roughly
  assert all(ops == ('bf16', 'bf16') for ops, _ in dots), [d for d in dots
                                                           if d[0] != ('bf16', 'bf16')]


def test_tied_head_matmul_backward_in_bf16():
  """The tied output projection x @ table.T (table stored [vocab, embed]) without a
  materialised transpose: values and both gradients are the fp32 math on bf16 inputs."""
  from jaxft.models import layers
  kx, kt, kg = jax.random.split(jax.random.key(1), 3)
  x, table = jax.random.normal(kx, (3, 4, 16)), jax.random.normal(kt, (40, 16))
  g = jax.random.normal(kg, (3, 4, 40))
  y, vjp = jax.vjp(lambda x, t: layers.matmul(x, t, 1, jnp.bfloat16, transposed=True), x, table)
  dx, dt = jax.jit(vjp)(g)
  r = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  x2, g2 = r(x).reshape(12, 16), r(g).reshape(12, 40)
  np.testing.assert_allclose(np.asarray(y).reshape(12, 40), x2 @ r(table).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx).reshape(12, 16), g2 @ r(table), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dt), g2.T @ x2, rtol=1e-5, atol=1e-5)
  assert dt.dtype == dx.dtype == jnp.float32
  # fp32 gives the plain dot's value
  np.testing.assert_allclose(layers.matmul(x, table, 1, jnp.float32, transposed=True),
                             x @ table.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('spec,a_shape,b_shape', [
    ('bthd,bshd->bhts', (2, 5, 3, 4), (2, 6, 3, 4)),   # attention scores
    ('bhts,bshd->bthd', (2, 3, 5, 6), (2, 6, 3, 4)),   # probs @ values
])
def test_bf16_einsum_backward_in_bf16(spec, a_shape, b_shape):
  """Attention's batched matmuls: bf16 operands forward and backward, fp32 accumulation,
  gradients equal to the fp32 math on bf16-rounded operands and cotangent."""
  from jaxft.models import layers
  ka, kb, kg = jax.random.split(jax.random.key(2), 3)
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  y, vjp = jax.vjp(lambda a, b: layers.einsum(spec, a, b, jnp.bfloat16), a, b)
  g = jax.random.normal(kg, y.shape)
  da, db = jax.jit(vjp)(g)
  r = lambda t: np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  ref_y, ref_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, precision='highest'),
                           jnp.asarray(r(a)), jnp.asarray(r(b)))
  ref_da, ref_db = ref_vjp(jnp.asarray(r(g)))
  for got, want in ((y, ref_y), (da, ref_da), (db, ref_db)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(vjp).lower(g).as_text()
  dots = [ln for ln in hlo.splitlines() if 'stablehlo.dot_general' in ln]
  assert len(dots) == 2 and all(ln.split('->')[0].count('bf16>') == 2 for ln in dots), dots


@pytest.mark.parametrize('label_smoothing,weighted', [(0.0, False), (0.1, True)])
def test_cross_entropy_sums_equals_log_softmax_reference(label_smoothing, weighted):
  """The two-pass cross-entropy gives log_softmax's loss and gradient, and argmax's
  accuracy (ties to the first index), on rows with ties and masked-out tokens."""
  from jaxft.train.step import cross_entropy_sums
  vocab = 7
  logits = 3 * jax.random.normal(jax.random.key(4), (4, 5, vocab))
  logits = logits.at[0, 0].set(0.0).at[0, 1].set(0.0)  # all-tied rows
  labels = jax.random.randint(jax.random.key(5), (4, 5), 0, vocab)
  labels = labels.at[0, 0].set(0).at[0, 1].set(3)  # a tie won by index 0, a tie lost
  weights = (jax.random.uniform(jax.random.key(6), (4, 5)) > 0.3).astype(jnp.float32)
  weights = weights.at[0, 0].set(1.0).at[0, 1].set(1.0)
  labels = jnp.where(weights > 0, labels, -100)  # ignored tokens carry any label
  class_weights = [1.0 + i / 2 for i in range(vocab)] if weighted else None

  def ref(logits):
    logp = jax.nn.log_softmax(logits, -1)
    safe = jnp.where(weights > 0, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
    nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    w = weights * (jnp.asarray(class_weights)[safe] if weighted else 1.0)
    correct = (jnp.argmax(logits, -1) == labels) * (weights > 0)
    return (nll * w).sum(), (w.sum(), correct.sum())

  got_fn = lambda lg: (lambda s: (s[0], s[1:]))(
      cross_entropy_sums(lg, labels, weights, label_smoothing, class_weights))
  (got, (gw, gc)), g_got = jax.value_and_grad(got_fn, has_aux=True)(logits)
  (want, (ww, wc)), g_want = jax.value_and_grad(ref, has_aux=True)(logits)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(gw) == float(ww) and float(gc) == float(wc)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-5, atol=1e-6)


def test_dropout_on_cpu_draws_the_original_threefry_layout():
  """`layers.Dropout` on CPU: nnx.Dropout's mask drawn with the non-partitionable threefry
  (4x cheaper on XLA:CPU); keep rate, 1/keep scale and a backward through the same mask."""
  from jaxft.models.layers import Dropout
  assert jax.default_backend() == 'cpu'
  x = jnp.ones((4, 12, 128, 128), jnp.float32)
  key = jax.random.key(7)
  drop = jax.jit(lambda x, k: Dropout(0.1)(x, deterministic=False, rngs=k))
  y = drop(x, key)
  with jax.threefry_partitionable(False):
    legacy = jax.jit(lambda x, k: nnx.Dropout(0.1)(x, deterministic=False, rngs=k))(x, key)
  default = jax.jit(lambda x, k: nnx.Dropout(0.1)(x, deterministic=False, rngs=k))(x, key)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(legacy))
  assert not np.array_equal(np.asarray(y), np.asarray(default))  # a different stream
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.9) < 0.002, kept.mean()
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  g = jax.jit(jax.grad(lambda x, k: (Dropout(0.1)(x, deterministic=False, rngs=k) * 3).sum()))
  np.testing.assert_allclose(np.asarray(g(x, key)), np.where(kept, 3 / 0.9, 0), rtol=1e-6)
