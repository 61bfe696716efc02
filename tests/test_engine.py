"""Training engine: mesh invariance, FSDP sharding, gradient accumulation, schedules,
weight-decay mask and the non-finite 'skip' policy.

A tiny BERT MLM (hidden 32, 2 layers, 4 heads, vocab 128) on synthetic packed rows,
driven through the real step (`ModelDef`, `create_train_state`, `make_train_step`) with
the real MLM task (dynamic masking inside the step). fp32, dropout 0: deterministic.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import partitioning
from jaxft.data.masking import MaskingSettings
from jaxft.models import ModelConfig, build_model
from jaxft.objectives.lm import mlm
from jaxft.partitioning import MeshSettings
from jaxft.train import optimizer as optim
from jaxft.train import step as step_lib
from jaxft.train.optimizer import OptimizerSettings
from jaxft.train.state import ModelDef, create_train_state, to_host
from jaxft.train.step import Objective, global_batch, make_train_step

VOCAB, LEN, BATCH, STEPS = 128, 32, 16, 20
PAD, CLS, SEP, MASK = 0, 2, 3, 4
MCFG = ModelConfig(model_type='bert', vocab_size=VOCAB, hidden_size=32, num_layers=2,
                   num_heads=4, intermediate_size=64, max_position_embeddings=LEN,
                   hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
RULES = partitioning.rules_from_config(())


class _Tokenizer:
  """What the MLM objective reads from a tokenizer."""
  mask_token_id = MASK

  def __len__(self):
    return VOCAB


MASKING = MaskingSettings(mask_prob=0.15, mask_token_frac=0.8, random_token_frac=0.1,
                          max_predictions=6)


def _opt_cfg(**kw):
  d = dict(lr=2e-2, schedule='linear', warmup_steps=5, warmup_ratio=0.0, end_lr_ratio=0.0,
           weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
  d.update(kw)
  return OptimizerSettings(**d)


@functools.cache
def _model_def():
  return ModelDef.create(lambda: build_model(MCFG, 'mlm', seed=0))


@functools.cache
def _task():
  return mlm(_Tokenizer(), MASKING)


def _batches(n, batch=BATCH, seed=0):
  """Packed-looking MLM rows `[CLS] w ... [SEP] [PAD]...` (some rows padded); tokens follow
  a Zipf unigram mixed with a fixed successor map, so there is something to learn."""
  rng = np.random.default_rng(seed)
  words = np.arange(5, VOCAB)
  zipf = 1.0 / np.arange(1, len(words) + 1)
  zipf /= zipf.sum()
  out = []
  for _ in range(n):
    ids = np.full((batch, LEN), PAD, np.int32)
    special = np.ones((batch, LEN), np.int32)
    attn = np.zeros((batch, LEN), np.int32)
    for r in range(batch):
      n_tok = LEN - 2 if r % 4 else int(rng.integers(8, LEN - 2))
      w = rng.choice(words, size=n_tok, p=zipf)
      for t in range(1, n_tok):
        if rng.random() < 0.5:
          w[t] = 5 + (w[t - 1] * 7 + 3) % (VOCAB - 5)
      ids[r, 0], ids[r, 1:1 + n_tok], ids[r, 1 + n_tok] = CLS, w, SEP
      special[r, 1:1 + n_tok] = 0
      attn[r, :2 + n_tok] = 1
    out.append({'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special})
  return out


def _mesh(shape):
  return partitioning.make_mesh(MeshSettings(*shape), jax.devices()[:math.prod(shape)])


@functools.cache
def _init_params():
  """Host copy of the initial parameters (one init compile shared by every mesh)."""
  return to_host(_model_def().init_params(_mesh((1, 1, 1)), RULES))


def _setup(shape, *, opt_cfg=None, num_steps=STEPS, grad_accum=1, task=None, seed=0,
           model_def=None):
  """`model_def`: another model (initialised from `seed`) instead of the shared one."""
  mesh = _mesh(shape)
  md = model_def or _model_def()
  tx, schedule = optim.make_optimizer(opt_cfg or _opt_cfg(), num_steps, md.abstract_params)
  state, shardings = create_train_state(md, tx, mesh, RULES, seed,
                                        params=None if model_def else _init_params())
  step = make_train_step(md, task or _task(), tx, shardings, mesh, RULES,
                         grad_accum=grad_accum, nonfinite='skip', schedule=schedule)
  return mesh, state, step


@functools.cache
def _run(shape):
  """20 steps on `shape`: (losses, final state, mesh)."""
  mesh, state, step = _setup(shape)
  losses = []
  for local in _batches(STEPS):
    state, metrics = step(state, global_batch(local, mesh, RULES))
    losses.append(float(metrics['loss']))
  return np.asarray(losses), state, mesh


# ----------------------------------------------------------------------------- meshes

@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_same_losses_on_every_mesh(shape):
  ref, _, _ = _run((1, 1, 1))
  assert np.all(np.isfinite(ref))
  assert ref[-5:].mean() < ref[:5].mean() - 0.2, f'the tiny model should learn: {ref}'
  losses, state, mesh = _run(shape)
  assert dict(mesh.shape) == dict(zip(partitioning.MESH_AXES, shape))
  assert int(state['step']) == STEPS and int(state['skipped']) == 0
  np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=0)


def _leaf(tree, *keys):
  for k in keys:
    tree = tree[k]
  return tree


def _adam_state(opt_state):
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'mu'))
           if hasattr(s, 'mu')]
  assert len(found) == 1, found
  return found[0]


def test_fsdp_shards_params_and_adam_moments():
  _, state, mesh = _run((2, 4, 1))
  keys = [('bert', 'embeddings', 'word', 'embedding'),      # (vocab, embed)
          ('bert', 'layers', 0, 'mlp_in', 'kernel'),        # (embed, mlp)
          ('bert', 'layers', 1, 'attn', 'out', 'kernel')]   # (heads, kv, embed)
  names = _model_def().names
  adam = _adam_state(state['opt_state'])
  for key in keys:
    axis = _leaf(names, *key).index('embed')
    for what, tree in (('param', state['params']), ('adam mu', adam.mu), ('adam nu', adam.nu)):
      x = _leaf(tree, *key)
      shards = x.addressable_shards
      assert len(shards) == 8
      want = list(x.shape)
      want[axis] //= 4
      for s in shards:
        assert s.data.shape == tuple(want), (what, key, x.shape, s.data.shape)
      # 4 distinct slices along 'embed', each held by the 2 'data' replicas
      starts = sorted({s.index[axis].start or 0 for s in shards})
      assert starts == [i * want[axis] for i in range(4)], (what, key, starts)
  # 1-D params without 'embed' (LayerNorm) stay replicated
  ln = state['params']['bert']['embeddings']['ln']['scale']
  assert all(s.data.shape == ln.shape for s in ln.addressable_shards)


# ----------------------------------------------------------------------------- accumulation

def _recording(tx):
  """`tx`, with the gradient it was handed kept in its state: the accumulated gradient
  itself, read before any optimizer arithmetic."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params), tx.init(params)

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state[1], params)
    return updates, (grads, inner)

  return optax.GradientTransformation(init, update)


ACCUM_K, ACCUM_LR, ACCUM_STEPS = 4, 1e-2, 3


def _accumulation_run(grad_accum):
  """ACCUM_STEPS SGD steps of 4x8 rows: [(loss, grad_norm, weight), grads, params] per step."""
  mesh = _mesh((2, 2, 2))
  tx = _recording(optax.sgd(ACCUM_LR))
  state, shardings = create_train_state(_model_def(), tx, mesh, RULES, 0, params=_init_params())
  step = make_train_step(_model_def(), _task(), tx, shardings, mesh, RULES,
                         grad_accum=grad_accum)
  out = []
  for local in _batches(ACCUM_STEPS, batch=ACCUM_K * 8, seed=1):
    state, m = step(state, global_batch(local, mesh, RULES))
    host = to_host(state)
    out.append(([float(m['loss']), float(m['grad_norm']), float(m['weight'])],
                host['opt_state'][0], host['params']))
  return out


_big_batch_run = functools.cache(lambda: _accumulation_run(1))


def _assert_same_training(run, ref):
  """Tolerances that hold on any CPU, derived from fp32 rounding of a differently ordered sum.

  Gradients: elementwise within 1e-5 of the largest gradient element (a sum of per-row
  terms re-associated differs by a few ulps of its largest terms; an element whose true
  value is 0, like a key bias's, is all rounding, so no per-element relative test).
  Parameters: SGD makes them linear in the gradients, so they may differ by at most
  lr * (the gradient tolerance) per step plus one rounding of each parameter per step.
  (Adam's g / (|g| + eps) would amplify the rounding of near-zero gradients by up to lr/eps:
  1.6e-6 after one step on an Intel Xeon, hence SGD here.)"""
  eps32 = float(np.finfo(np.float32).eps)
  for i, ((m, g, p), (m_ref, g_ref, p_ref)) in enumerate(zip(run, ref)):
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, err_msg=f'loss/grad_norm/weight, step {i + 1}')
    g_scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_ref))
    g_tol = 1e-5 * g_scale
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(x, y, rtol=0, atol=g_tol, err_msg=f'gradient, step {i + 1}')
    p_scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(p_ref))
    p_tol = (i + 1) * (ACCUM_LR * g_tol + 2 * eps32 * p_scale)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
      np.testing.assert_allclose(x, y, rtol=0, atol=p_tol, err_msg=f'params, step {i + 1}')


def test_grad_accumulation_matches_big_batch():
  """k=4 micro-batches of b rows == one batch of 4b rows: same loss, same gradient norm, the
  same accumulated gradient (compared before the optimizer) and the same parameters after
  each of 3 steps."""
  ref = _big_batch_run()
  _assert_same_training(_accumulation_run(ACCUM_K), ref)
  # the steps did move the parameters, by far more than the tolerance
  p0 = jax.tree.leaves(_init_params())
  moved = max(float(np.abs(x - z).max()) for x, z in zip(jax.tree.leaves(ref[-1][2]), p0))
  assert moved > 1e-4


def test_grad_accumulation_check_catches_a_dropped_micro_batch(monkeypatch):
  """The comparison above fails when accumulation is wrong: the last micro-batch replaced
  by a copy of the first (one micro-batch's rows never reach the gradient)."""
  real = step_lib._microbatches

  def drop_last(batch, k):
    micro = real(batch, k)
    return jax.tree.map(lambda x: x.at[k - 1].set(x[0]), micro)

  monkeypatch.setattr(step_lib, '_microbatches', drop_last)
  broken = _accumulation_run(ACCUM_K)
  with pytest.raises(AssertionError, match='gradient|loss'):
    _assert_same_training(broken, _big_batch_run())


# ----------------------------------------------------------------------------- schedules

def _closed_form(kind, lr, warm, num_steps, end_ratio, t):
  if warm and t < warm:
    return lr * t / warm
  decay = max(num_steps - warm, 1)
  frac = min(t - warm, decay) / decay
  end = lr * end_ratio
  if kind == 'linear':
    return lr + (end - lr) * frac
  if kind == 'cosine':
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
  return lr


@pytest.mark.parametrize('kind', ['linear', 'cosine', 'constant'])
@pytest.mark.parametrize('warm_kw', [dict(warmup_steps=10), dict(warmup_ratio=0.1), {}],
                         ids=['warmup_steps', 'warmup_ratio', 'no_warmup'])
def test_schedule_closed_form(kind, warm_kw):
  num_steps, lr, end_ratio = 100, 2e-3, 0.1
  cfg = _opt_cfg(lr=lr, schedule=kind, end_lr_ratio=end_ratio,
                 **{'warmup_steps': 0, **warm_kw})
  warm = 10 if warm_kw else 0
  assert optim.warmup_steps(cfg, num_steps) == warm
  sched = optim.make_schedule(cfg, num_steps)
  mid = warm + (num_steps - warm) // 2
  points = [0, warm // 2, warm, mid, num_steps - 1, num_steps]
  for t in points:
    np.testing.assert_allclose(float(sched(t)), _closed_form(kind, lr, warm, num_steps,
                                                             end_ratio, t),
                               rtol=1e-5, atol=1e-9, err_msg=f'{kind} {warm_kw} step {t}')
  # landmarks stated plainly
  assert float(sched(0)) == pytest.approx(0.0 if warm else lr)
  assert float(sched(warm)) == pytest.approx(lr)
  end = {'linear': lr * end_ratio, 'cosine': lr * end_ratio, 'constant': lr}[kind]
  assert float(sched(num_steps)) == pytest.approx(end, rel=1e-5)
  if kind == 'cosine':
    assert float(sched(mid)) == pytest.approx(lr * end_ratio + (lr - lr * end_ratio) / 2)


def test_explicit_warmup_steps_win_over_a_presets_ratio():
  """--config.optimizer.warmup_steps=N on a preset with warmup_ratio: N steps (it used to be
  an error, after tokenizing and loading the model)."""
  settings = _opt_cfg(warmup_steps=5, warmup_ratio=0.1)
  assert optim.warmup_steps(settings, 100) == 5
  assert float(optim.make_schedule(settings, 100)(5)) == pytest.approx(settings.lr)


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_optimizer_steps_follow_schedule(kind):
  """Adam with a constant gradient moves each weight by exactly lr(t) at update t."""
  num_steps = 20
  cfg = _opt_cfg(lr=1e-2, schedule=kind, warmup_steps=4, end_lr_ratio=0.1, weight_decay=0.0,
                 clip_norm=0.0)
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  tx, sched = optim.make_optimizer(cfg, num_steps, params)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for t in range(num_steps + 2):
    updates, opt_state = update(grads, opt_state, params)
    want = _closed_form(kind, 1e-2, 4, num_steps, 0.1, t)
    for u in jax.tree.leaves(updates):
      np.testing.assert_allclose(np.asarray(u), -want, rtol=1e-5, atol=1e-9,
                                 err_msg=f'update {t}')


# ----------------------------------------------------------------------------- weight decay

def test_weight_decay_skips_biases_and_layernorm():
  lr, wd = 0.1, 0.5
  md = _model_def()
  cfg = _opt_cfg(lr=lr, schedule='constant', warmup_steps=0, weight_decay=wd)
  tx, _ = optim.make_optimizer(cfg, 10, md.abstract_params)
  params = jax.tree.map(lambda x: x + 0.5, _init_params())  # LayerNorm bias/zero biases non-zero too

  @jax.jit
  def one_update(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)

  new = to_host(one_update(params))
  flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
  n_decayed = n_kept = 0
  for path, old in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    got = np.asarray(flat_new[path])
    no_decay = old.ndim < 2 or 'bias' in name or "['ln']" in name or '_ln' in name
    if no_decay:
      np.testing.assert_array_equal(got, old, err_msg=f'{name} must not be decayed')
      n_kept += 1
    else:
      np.testing.assert_allclose(got, old * (1 - lr * wd), rtol=1e-6, err_msg=name)
      n_decayed += 1
  # kernels, embeddings decayed; every bias (incl. the [heads, kv] q/k/v biases) and LN kept
  assert n_decayed == 2 * 6 + 4 and n_kept == 2 * 10 + 2 + 1 + 1 + 2


# ----------------------------------------------------------------------------- non-finite

@jax.custom_vjp
def _poison_grad(x, flag):
  return x


def _poison_grad_fwd(x, flag):
  return x, flag


def _poison_grad_bwd(flag, g):
  return g * jnp.where(flag, jnp.nan, 1.0), jnp.zeros_like(flag)


_poison_grad.defvjp(_poison_grad_fwd, _poison_grad_bwd)


def _poisoned_task():
  """MLM, but `poison`=1 in a batch makes the loss NaN, `poison`=2 only the gradients."""
  base = _task()

  def loss(model, batch, rng, deterministic):
    loss_sum, sums = base.loss(model, batch, rng, deterministic)
    p = batch['poison'].max()
    loss_sum = loss_sum + jnp.where(p == 1, jnp.nan, 0.0)
    return _poison_grad(loss_sum, (p == 2).astype(jnp.float32)), sums

  return Objective(loss=loss, evaluate=base.evaluate, prepare=base.prepare)


def test_nonfinite_skip_keeps_params_and_counts():
  mesh, state, step = _setup((2, 2, 2), task=_poisoned_task(),
                             opt_cfg=_opt_cfg(schedule='constant', warmup_steps=0))
  batches = _batches(4, seed=2)
  poison = [0, 1, 2, 0]
  history = [to_host(state)]
  finite = []
  for local, p in zip(batches, poison):
    local = {**local, 'poison': np.full((BATCH,), p, np.int32)}
    state, metrics = step(state, global_batch(local, mesh, RULES))
    history.append(to_host(state))
    finite.append(bool(metrics['finite']))
  assert finite == [True, False, False, True]
  assert [int(h['step']) for h in history] == [0, 1, 2, 3, 4]
  assert [int(h['skipped']) for h in history] == [0, 0, 1, 2, 2]

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert not same(history[1]['params'], history[0]['params'])  # a good step moves params
  for i in (2, 3):  # NaN loss, then NaN gradients: params and Adam state untouched
    assert same(history[i]['params'], history[1]['params']), f'step {i} changed params'
    assert same(history[i]['opt_state'], history[1]['opt_state']), f'step {i} changed Adam'
  assert not same(history[4]['params'], history[3]['params'])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(history[4]['params']))


def test_bf16_params_train_and_keep_their_dtypes():
  """`model.param_dtype='bfloat16'`: params and Adam moments stay bf16 step after step (the
  fp32 loss scale used to promote the moments, which broke the non-finite cond)."""
  cfg = dataclasses.replace(MCFG, dtype='bfloat16', param_dtype='bfloat16')
  mesh, state, step = _setup((2, 1, 1), task=mlm(_Tokenizer(), MASKING),
                             model_def=ModelDef.create(lambda: build_model(cfg, 'mlm', seed=0)))
  dtypes = [x.dtype for x in jax.tree.leaves(state)]
  assert jnp.bfloat16 in dtypes
  losses = []
  for local in _batches(12, seed=3):
    state, metrics = step(state, global_batch(local, mesh, RULES))
    losses.append(float(metrics['loss']))
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes
  assert bool(metrics['finite']) and int(state['skipped']) == 0
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses


# ----------------------------------------------------------------------------- progress

class _Loss:
  """A dispatched step's loss: ready when the test says so."""

  def __init__(self):
    self.ready = False

  def is_ready(self):
    return self.ready


def test_progress_counts_finished_steps_not_dispatched_ones():
  from jaxft.train.loop import _Progress
  bar = _Progress(total=10, initial=0, desc='t')
  losses = [_Loss() for _ in range(3)]
  for step, loss in enumerate(losses, 1):
    bar.dispatched(step, loss)
  assert bar.bar.n == 0  # three steps handed to the device, none finished
  losses[0].ready = True
  bar.dispatched(4, _Loss())
  assert bar.bar.n == 1
  bar.set_postfix(loss='x')  # the caller holds step 4's metrics: steps 1-4 are done
  assert bar.bar.n == 4
  bar.reset_to(2)  # a rollback
  assert bar.bar.n == 2
  bar.close()


# ----------------------------------------------------------------------------- dtype auto

def test_auto_dtype_follows_the_hardware():
  """model.dtype='auto': bf16 compute where the device has bf16 units, fp32 elsewhere."""
  from jaxft.models.config import bf16_hardware
  zen4 = {'avx512f', 'avx512_bf16', 'avx2'}
  xeon_without = {'avx512f', 'avx512_vnni', 'avx2'}  # family 6 model 207 as CI met it
  zen3 = {'avx2', 'fma'}
  sapphire = {'avx512f', 'amx_bf16', 'amx_tile'}
  assert bf16_hardware('cpu', flags=zen4) == (True, 'CPU with avx512_bf16')
  assert bf16_hardware('cpu', flags=sapphire)[0]
  assert bf16_hardware('cpu', flags=xeon_without)[0] is False
  assert bf16_hardware('cpu', flags=zen3) == (False, 'CPU without avx512_bf16/amx_bf16')
  assert bf16_hardware('tpu') == (True, 'TPU')
  assert bf16_hardware('gpu', compute_capability='9.0')[0]  # H100
  assert not bf16_hardware('gpu', compute_capability='7.0')[0]  # V100


def test_auto_dtype_resolves_in_the_model_config(monkeypatch):
  from jaxft.models import config as model_config
  for forced, want in (('bfloat16', jnp.bfloat16), ('float32', jnp.float32)):
    monkeypatch.setenv(model_config.AUTO_ENV, forced)
    model_config.auto_dtype.cache_clear()
    assert ModelConfig(dtype='auto').dtype == want
  monkeypatch.delenv(model_config.AUTO_ENV)
  monkeypatch.setattr(model_config, 'cpu_flags', lambda: {'avx512_bf16'})
  model_config.auto_dtype.cache_clear()
  assert model_config.auto_dtype() == ('bfloat16', 'CPU with avx512_bf16')
  monkeypatch.setattr(model_config, 'cpu_flags', lambda: {'avx2'})
  model_config.auto_dtype.cache_clear()
  assert model_config.auto_dtype()[0] == 'float32'
  model_config.auto_dtype.cache_clear()
