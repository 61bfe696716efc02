"""PEFT: LoRA, adapters, BitFit, prompt tuning and the PET cloze stage.

One tiny BERT classifier (hidden 64, 2 layers, 4 heads, vocab 1024) is trained 3 steps per
method through the real step (`peft.setup` -> `create_train_state` -> `make_train_step`);
the runs are module-scoped and shared by the count, frozen-bits, optimizer-state, merge,
checkpoint and mesh tests. The cloze test uses a 4-wide MLM whose weights are written by
hand so that its verbalizer choice is the sign of (#positive - #negative) words.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxft import partitioning, peft
from jaxft.models import ModelConfig, build_model, flat_params
from jaxft.objectives import classification as objectives
from jaxft.partitioning import MeshSettings
from jaxft.peft import PeftConfig
from jaxft.train import optimizer as optim
from jaxft.train.optimizer import FreezeSettings, OptimizerSettings
from jaxft.train.state import ModelDef, create_train_state, to_host
from jaxft.train.step import global_batch, make_train_step

H, M, L, C, V, SEQ, B = 64, 128, 2, 2, 1024, 12, 8
MCFG = ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, num_heads=4, intermediate_size=M,
                   max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                   classifier_dropout=0.0)
HEAD = H * C + C
RULES = partitioning.rules_from_config(())
STEPS = 3


def cfg_for(method: str, **peft_kw) -> PeftConfig:
  p = ml_collections.ConfigDict(PeftConfig.section_defaults())
  p.method = method
  p.lora.update(rank=8, alpha=16.0, dropout=0.0)
  p.adapter.update(size=16)
  p.prompt.update(length=4, init='random')
  for k, v in peft_kw.items():
    if isinstance(v, dict):
      p[k].update(v)
    else:
      p[k] = v
  return PeftConfig.from_section(p, seed=0)


@functools.cache
def base_def():
  return ModelDef.create(lambda: build_model(MCFG, 'cls', num_labels=C, seed=0))


def closed_form(method: str) -> int:
  r, b, k = 8, 16, 4
  return {
      'lora': L * 2 * r * (H + H) + HEAD,                       # q, v: in H, out heads*kv = H
      'lora_all': L * r * (4 * (H + H) + (H + M) + (M + H)) + HEAD,
      'adapter': L * 2 * (H * b + b + b * H + H) + (L * 2 + 1) * 2 * H + HEAD,  # + LayerNorms
      'bitfit': L * (4 * H + M + H + 2 * H) + H + H + HEAD,     # layers, emb LN, pooler
      'prompt': k * H + HEAD,
  }[method]


@pytest.mark.parametrize('method', ['lora', 'lora_all', 'adapter', 'bitfit', 'prompt'])
def test_trainable_counts_closed_form(method):
  cfg = cfg_for('lora', lora={'targets': 'all'}) if method == 'lora_all' else cfg_for(method)
  new_def, params, mask = peft.setup(cfg, base_def(), None, None, max_len=SEQ)
  assert params is None
  c = peft.count(new_def.abstract_params, mask)
  assert c['trainable'] == closed_form(method)
  base = peft.count(base_def().abstract_params)['params']
  assert c['params'] == base + c['peft']


def test_freeze_patterns_also_freeze_the_lora_of_frozen_layers():
  base_mask = optim.trainable_mask(FreezeSettings(freeze_patterns=(r'layers\.0\.',)),
                                   base_def().abstract_params)
  new_def, _, mask = peft.setup(cfg_for('lora'), base_def(), None, base_mask, max_len=SEQ)
  flat = flat_params(mask)
  assert not flat['bert.layers.0.attn.query.lora_a'] and flat['bert.layers.1.attn.query.lora_a']
  assert peft.count(new_def.abstract_params, mask)['trainable'] == 2 * 8 * (H + H) + HEAD


def test_bad_peft_config_is_refused_with_the_key():
  with pytest.raises(ValueError, match='peft.method'):
    peft.setup(cfg_for('loraa'), base_def(), None, None, max_len=SEQ)
  with pytest.raises(ValueError, match='peft.lora.targets'):
    peft.setup(cfg_for('lora', lora={'targets': r'nothing_matches$'}), base_def(), None, None,
               max_len=SEQ)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    peft.setup(cfg_for('prompt', prompt={'length': 30}), base_def(), None, None, max_len=SEQ)


def test_lora_dropout_acts_on_the_lora_branch_in_training_only():
  from flax import nnx

  from jaxft.models.layers import Dense
  from jaxft.peft.modules import PeftDense, call_context
  pc = cfg_for('lora', lora={'dropout': 0.5})
  layer = PeftDense(Dense((8,), (6,), ('embed', 'mlp'), rngs=nnx.Rngs(params=0)), pc, lora=True,
                    adapter=False, rngs=nnx.Rngs(params=1))
  layer.lora_b[...] = jnp.ones_like(layer.lora_b[...])
  x = np.random.RandomState(0).standard_normal((64, 8)).astype(np.float32)
  k, b, a, bb = (np.asarray(v[...]) for v in (layer.kernel, layer.bias, layer.lora_a,
                                               layer.lora_b))
  want = x @ k + b + pc.lora_scale * (x @ a) @ bb
  np.testing.assert_allclose(layer(x), want, rtol=1e-4, atol=1e-4)  # no context: off
  with call_context(True, nnx.Rngs(dropout=0)):
    np.testing.assert_allclose(layer(x), want, rtol=1e-4, atol=1e-4)
  with call_context(False, nnx.Rngs(dropout=0)):
    y = np.asarray(layer(x))
  # Each row's LoRA input is x * mask / 0.5: the base path is untouched, so y - x W - b is
  # exactly the LoRA branch of some 0/2-scaled copy of x, and differs from the undropped one.
  assert not np.allclose(y, want, atol=1e-3)
  lora_out = (y - x @ k - b) / pc.lora_scale          # [64, 6] = (x * m * 2) @ A @ B
  np.testing.assert_allclose(lora_out[:, 0], lora_out[:, 1], rtol=1e-4, atol=1e-4)  # B = 1
  # The mask is the dropout stream's first key, drawn in the layout `layers.Dropout` uses
  # on CPU.
  with jax.threefry_partitionable(False):
    mask = np.asarray(jax.random.bernoulli(nnx.Rngs(dropout=0).dropout(), 0.5, x.shape))
  np.testing.assert_allclose(lora_out, (x * mask * 2) @ a @ bb, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- training runs

def opt_cfg():
  return OptimizerSettings(lr=1e-2, schedule='constant', warmup_steps=0, weight_decay=0.01,
                           clip_norm=1.0)


def batches():
  rng = np.random.RandomState(0)
  out = []
  for _ in range(STEPS):
    ids = rng.randint(5, V, (B, SEQ)).astype(np.int32)
    lens = rng.randint(4, SEQ + 1, B)
    mask = (np.arange(SEQ)[None] < lens[:, None]).astype(np.int32)
    out.append({'input_ids': ids * mask, 'attention_mask': mask,
                'token_type_ids': np.zeros_like(ids), 'labels': rng.randint(0, C, B).astype(
                    np.int32)})
  return out


def mesh_of(shape):
  n = int(np.prod(shape))
  return partitioning.make_mesh(MeshSettings(*shape), devices=jax.devices()[:n])


@functools.cache
def base_params():
  """Host weights for the base model (numpy RNG: a jitted random init compiles slowly)."""
  rng = np.random.RandomState(0)

  def init(path, x):
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    if name.endswith('scale'):
      return np.ones(x.shape, np.float32)
    return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, base_def().abstract_params)


def train(method: str, shape=(1, 1, 1)) -> dict:
  """STEPS steps from base_params() (+ the PEFT init); dropout is 0 so runs compare."""
  cfg = cfg_for(method)
  new_def, params, mask = peft.setup(cfg, base_def(), base_params(), None, max_len=SEQ)
  mesh = mesh_of(shape)
  tx, _ = optim.make_optimizer(opt_cfg(), STEPS, new_def.abstract_params, trainable=mask)
  state, shardings = create_train_state(new_def, tx, mesh, RULES, seed=0, params=params)
  p0 = to_host(state['params'])
  step = make_train_step(new_def, objectives.cls(C, False), tx, shardings, mesh, RULES,
                         trainable=mask)
  losses = []
  for b in batches():
    state, m = step(state, global_batch(b, mesh, RULES))
    losses.append(float(m['loss']))
  return {'cfg': cfg, 'def': new_def, 'mask': mask, 'p0': p0, 'p1': to_host(state['params']),
          'opt_state': state['opt_state'], 'losses': losses, 'shardings': shardings}


@pytest.fixture(scope='module')
def runs():
  return {m: train(m) for m in ('lora', 'adapter', 'bitfit', 'prompt')}


@pytest.mark.parametrize('method', ['lora', 'adapter', 'bitfit', 'prompt'])
def test_frozen_params_bit_identical_and_trained_ones_move(runs, method):
  r = runs[method]
  p0, p1, mask = flat_params(r['p0']), flat_params(r['p1']), flat_params(r['mask'])
  for n in p0:
    if not mask[n]:
      assert np.array_equal(p0[n], p1[n]), n
  moved = [n for n in p0 if mask[n] and not np.array_equal(p0[n], p1[n])]
  assert 'classifier.kernel' in moved
  if method == 'lora':  # B starts at 0; A gets gradient from step 2 on
    assert {'bert.layers.1.attn.value.lora_b', 'bert.layers.1.attn.value.lora_a'} <= set(moved)
  if method == 'adapter':
    assert 'bert.layers.1.mlp_out.adapter.up.kernel' in moved
  if method == 'prompt':
    assert 'prompt' in moved
  assert all(np.isfinite(r['losses']))


@pytest.mark.parametrize('method', ['lora', 'adapter', 'bitfit', 'prompt'])
def test_optimizer_state_holds_only_trainable_moments(runs, method):
  r = runs[method]
  moment_bytes = sum(x.nbytes for x in jax.tree.leaves(r['opt_state']) if x.ndim)
  trainable = peft.count(r['p0'], r['mask'])['trainable']
  assert trainable == closed_form(method)
  assert moment_bytes == 2 * 4 * trainable  # Adam mu and nu, fp32, trainable leaves only


_FORWARD = {}


def forward(model_def):
  """One jitted logits function per ModelDef (compiled once, reused across tests)."""
  if id(model_def) not in _FORWARD:
    _FORWARD[id(model_def)] = jax.jit(lambda params, batch: model_def.merge(params)(
        batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])['logits'])
  return _FORWARD[id(model_def)]


def test_lora_merged_logits_equal_unmerged(runs):
  r = runs['lora']
  batch = batches()[0]
  unmerged = forward(r['def'])(r['p1'], batch)
  merged = peft.merged_params(r['cfg'], r['p1'])
  assert not any(peft.is_peft_name(n) for n in flat_params(merged))
  plain = forward(base_def())(merged, batch)
  np.testing.assert_allclose(plain, unmerged, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(plain - forward(base_def())(peft.merged_params(r['cfg'], r['p0']),
                                                   batch)).max()) > 1e-4  # LoRA did something


def test_int8_keeps_lora_and_adapters():
  """predict.quantize=int8 of a LoRA + adapter model: LoRA is folded into the kernel before
  rounding and the adapters run in fp32, so the int8 logits follow lora_b and stay close to
  the fp32 logits of the same model (int8 used to drop every PEFT tensor: the base model's
  logits whatever lora_b held)."""
  from flax import nnx

  from jaxft.export import int8_model
  from jaxft.trees import map_named
  pdef = peft.trained_def(cfg_for('lora+adapter'), base_def())
  zero = to_host(nnx.to_pure_dict(nnx.state(pdef.build(), nnx.Param)))
  rng = np.random.RandomState(0)
  moved = lambda n, x: (rng.normal(0, 0.5, x.shape).astype(x.dtype)
                        if n.endswith(('lora_b', 'adapter.up.kernel')) else x)
  adapted = map_named(moved, zero)  # lora_b and adapter.up start at 0: give them values
  big_b = map_named(lambda n, x: x * 1000 if n.endswith('lora_b') else x, adapted)
  batch = batches()[0]
  fp32 = np.asarray(forward(pdef)(adapted, batch))
  base = np.asarray(forward(pdef)(zero, batch))  # what a model without PEFT computes
  qdef, q_adapted = int8_model(pdef, adapted)
  _, q_big = int8_model(pdef, big_b)
  adapter_sizes = lambda tree, key: sorted(x.size for n, x in flat_params(tree).items()
                                          if f'.{key}.' in n)
  assert adapter_sizes(q_adapted, 'after') == adapter_sizes(adapted, 'adapter') != []
  int8 = np.asarray(forward(qdef)(q_adapted, batch))
  int8_big = np.asarray(forward(qdef)(q_big, batch))
  scale = np.abs(fp32).max()
  err = np.abs(int8 - fp32).max()
  assert 0 < err <= 0.05 * scale, (err, scale)  # int8 rounding through 2 layers
  assert np.abs(fp32 - base).max() > 4 * err  # the PEFT tensors matter far beyond rounding
  assert np.abs(int8_big - int8).max() > 0.1 * scale  # lora_b x 1000 reaches int8 logits

def test_lora_checkpoint_is_small_and_reapplies(runs, tmp_path):
  r = runs['lora']
  d = peft.save_checkpoint(r['cfg'], r['p1'], r['mask'], str(tmp_path))
  assert d == str(tmp_path / 'lora')
  size = os.path.getsize(os.path.join(d, peft.checkpoint.WEIGHTS))
  base_bytes = 4 * peft.count(base_def().abstract_params)['params']
  assert size < 0.05 * base_bytes, (size, base_bytes)
  base = peft.merged_params(r['cfg'], r['p0'])  # = the starting base (B = 0)
  applied = peft.apply_lora_checkpoint(base, d)
  batch = batches()[1]
  np.testing.assert_allclose(forward(base_def())(applied, batch),
                             forward(r['def'])(r['p1'], batch), atol=1e-5, rtol=1e-5)
  again = peft.load_into(r['p0'], d)  # unmerged re-application into the PEFT tree
  for n, x in flat_params(again).items():
    np.testing.assert_array_equal(x, flat_params(r['p1'])[n] if flat_params(r['mask'])[n]
                                  else flat_params(r['p0'])[n])


@pytest.mark.parametrize('method', ['lora', 'adapter', 'bitfit', 'prompt'])
def test_load_trained_is_the_model_that_was_evaluated(runs, method):
  """What predict loads: the run's checkpointed params (flat, as a checkpoint reader gives
  them) with the run's config (as config.json holds it) -> the very definition and params
  that trained, so the logits are bit-identical (same program, same arrays). Loading into
  the base definition instead, as predict did, leaves the PEFT tensors unused."""
  r = runs[method]
  saved_cfg = PeftConfig.from_dict(json.loads(json.dumps(r['cfg'].to_dict())))
  ckpt = {n: np.asarray(x) for n, x in flat_params(r['p1']).items()}
  model_def, params = peft.load_trained(saved_cfg, base_def(), ckpt, where='workdir')
  assert flat_params(model_def.abstract_params).keys() == ckpt.keys()
  for n, x in flat_params(params).items():
    np.testing.assert_array_equal(x, ckpt[n], err_msg=n)
  batch = batches()[0]
  np.testing.assert_array_equal(forward(model_def)(params, batch),
                                forward(r['def'])(r['p1'], batch))
  dropped = set(ckpt) - set(flat_params(base_def().abstract_params))
  assert bool(dropped) == (method != 'bitfit')


def test_load_trained_refuses_a_checkpoint_that_is_not_the_model(runs):
  lora = {n: np.asarray(x) for n, x in flat_params(runs['lora']['p1']).items()}
  cfg = runs['lora']['cfg']
  partial = {n: x for n, x in lora.items() if n != 'bert.layers.1.attn.value.lora_b'}
  with pytest.raises(ValueError, match=r"wd: .*missing \['bert.layers.1.attn.value.lora_b'\]"):
    peft.load_trained(cfg, base_def(), partial, where='wd')
  with pytest.raises(ValueError, match=r'peft.method=adapter.*not in the model \[.*lora_a'):
    peft.load_trained(cfg_for('adapter'), base_def(), lora, where='wd')
  with pytest.raises(ValueError, match=r'peft.method=none.*not in the model \[.*lora_a'):
    peft.load_trained(PeftConfig(), base_def(), lora, where='wd')  # a run without peft
  bad = {**lora, 'classifier.kernel': np.zeros((H, C + 1), np.float32)}
  with pytest.raises(ValueError, match=r'wd: classifier.kernel has shape \(64, 3\)'):
    peft.load_trained(cfg, base_def(), bad, where='wd')
  full = {n: x for n, x in lora.items() if not peft.is_peft_name(n)}  # a plain fine-tune
  model_def, _ = peft.load_trained(PeftConfig(), base_def(), full, where='wd')
  assert model_def is base_def()


@pytest.mark.parametrize('method', ['lora', 'adapter'])
def test_trains_on_2x2x2_mesh_with_single_device_losses(runs, method):
  r8 = train(method, (2, 2, 2))
  np.testing.assert_allclose(r8['losses'], runs[method]['losses'], rtol=2e-5, atol=2e-6)
  sh = flat_params(r8['shardings']['params'])
  if method == 'lora':
    assert sh['bert.layers.0.attn.query.lora_a'].spec == P('fsdp', None)
    assert sh['bert.layers.0.attn.query.lora_b'].spec == P(None, 'tensor', None)
  else:
    assert sh['bert.layers.0.mlp_out.adapter.down.kernel'].spec == P('fsdp', None)
    assert sh['bert.layers.0.mlp_out.adapter.up.kernel'].spec == P(None, 'fsdp')
  for n, x in flat_params(r8['p1']).items():
    np.testing.assert_allclose(x, flat_params(runs[method]['p1'])[n], rtol=1e-3, atol=1e-4)


def test_prompt_tuning_keeps_token_outputs_aligned():
  """token_cls logits cover the input positions only; [CLS] stays first for BERT."""
  base = ModelDef.create(lambda: build_model(MCFG, 'token_cls', num_labels=3, seed=0))
  new_def, _, _ = peft.setup(cfg_for('prompt'), base, None, None, max_len=SEQ)
  out = jax.eval_shape(lambda p: new_def.merge(p)(jnp.ones((2, SEQ), jnp.int32)),
                       new_def.abstract_params)
  assert out['logits'].shape == (2, SEQ, 3)
  assert out['last_hidden_state'].shape == (2, SEQ, H)
  gpt = ModelConfig(model_type='gpt2', vocab_size=V, hidden_size=H, num_layers=1, num_heads=4,
                    intermediate_size=M, max_position_embeddings=32, type_vocab_size=0)
  for head, kw, shape in (('clm', {}, (2, SEQ, V)), ('cls', {'num_labels': 3}, (2, 3))):
    base = ModelDef.create(lambda: build_model(gpt, head, **kw))
    new_def, _, mask = peft.setup(cfg_for('lora+prompt'), base, None, None, max_len=SEQ)
    out = jax.eval_shape(lambda p: new_def.merge(p)(jnp.ones((2, SEQ), jnp.int32),
                                                    jnp.ones((2, SEQ), jnp.int32)),
                         new_def.abstract_params)
    assert out['logits'].shape == shape
    assert flat_params(mask)['transformer.layers.0.attn.value.lora_b']


# ------------------------------------------------------------------------------- cloze

POS = ('great', 'good', 'wonderful', 'excellent')
NEG = ('terrible', 'bad', 'awful', 'boring')
SENTENCES = [  # expected label = sign(#POS - #NEG) of the words
    'a wonderful , great film', 'boring and awful', 'good acting but a terrible , bad script',
    'great fun , good cast , bad ending', 'an excellent movie', 'awful', 'bad', 'great']


def hand_built_mlm(tokenizer, out_dir):
  """Hidden 4, one layer, 1 head. Positive words embed as [1,-1,0,0], negative ones as
  [-1,1,0,0], everything else as 0. Zero query/key kernels make attention uniform, identity
  value/out kernels make the [MASK] position the mean of the tokens, the LayerNorms keep the
  sign of that mean, the zero MLP adds nothing, and the identity MLM transform followed by
  the tied decoder scores 'great'/'good' against 'terrible'/'bad' by that sign (gelu(a) -
  gelu(-a) = a keeps it through the head). So the prediction is sign(#pos - #neg)."""
  from jaxft.models import hf
  mcfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=4, num_layers=1, num_heads=1,
                     intermediate_size=4, max_position_embeddings=64, hidden_dropout=0.0,
                     attention_dropout=0.0)
  abstract = ModelDef.create(lambda: build_model(mcfg, 'mlm')).abstract_params
  flat = {n: np.zeros(x.shape, np.float32) for n, x in flat_params(abstract).items()}
  for n in flat:
    if n.endswith('ln.scale'):
      flat[n][:] = 1.0
  for words, vec in ((POS, [1, -1, 0, 0]), (NEG, [-1, 1, 0, 0])):
    for w in words:
      flat['bert.embeddings.word.embedding'][tokenizer.convert_tokens_to_ids(w)] = vec
  flat['bert.layers.0.attn.value.kernel'][:] = np.eye(4)[:, None, :]
  flat['bert.layers.0.attn.out.kernel'][:] = np.eye(4)[None]
  flat['mlm_dense.kernel'][:] = np.eye(4)
  params = jax.tree_util.tree_map_with_path(
      lambda path, _: flat['.'.join(str(getattr(k, 'key', k)) for k in path)], abstract)
  hf.save_hf(params, mcfg, out_dir, 'mlm', tokenizer=tokenizer)


@pytest.fixture(scope='module')
def cloze_setup(tmp_path_factory):
  """(config, tokenizer, expected labels) for the hand-built MLM and an 8-sentence dev set."""
  from jaxft.data.tokenizer import load_tokenizer
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tmp = tmp_path_factory.mktemp('cloze')
  tok = load_tokenizer(os.path.join(repo, 'data/tokenizers/bert-base-uncased'))
  hand_built_mlm(tok, str(tmp / 'mlm'))
  expected = []
  for s in SENTENCES:
    words = s.split()
    d = sum(w in POS for w in words) - sum(w in NEG for w in words)
    assert d != 0
    expected.append(int(d > 0))
  rows = 'sentence\tlabel\n' + ''.join(f'{s}\t{y}\n' for s, y in zip(SENTENCES, expected))
  (tmp / 'dev.tsv').write_text(rows)
  (tmp / 'train.tsv').write_text(rows)
  spec = importlib.util.spec_from_file_location('_peft_cloze',
                                                os.path.join(repo, 'configs/peft_cloze.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config('sst2')
  cfg.init_from = str(tmp / 'mlm')
  cfg.data.path = str(tmp)
  cfg.data.max_len = 24
  cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0)
  cfg.train.update(num_steps=2, batch_size=8, eval_every=0, log_every=1)
  cfg.checkpoint.update(async_save=False)
  return cfg, tok, expected, tmp


def test_cloze_zero_shot_on_a_hand_built_mlm(cloze_setup):
  from jaxft.models import hf
  from jaxft import stages
  from jaxft.objectives import cloze
  cfg, tok, expected, tmp = cloze_setup
  res = stages.REGISTRY['cloze'].run(stages.validate(cfg), str(tmp / 'zero'))
  assert res['zero_shot']['predictions'] == expected
  assert res['zero_shot']['accuracy'] == 1.0
  assert 'few_shot' not in res
  # The function API agrees with the stage.
  arrays = cloze.encode(SENTENCES, cfg.cloze.template, tok, 24)
  assert all(tok.convert_ids_to_tokens(int(r[p])) == '[MASK]'
             for r, p in zip(arrays['input_ids'], arrays['mask_pos']))
  ids = cloze.verbalizer_ids(cloze.parse_verbalizer(cfg.cloze.verbalizer,
                                                    ['negative', 'positive'], ['0', '1']), tok)
  model, _ = hf.from_pretrained(cfg.init_from, head='mlm')
  assert cloze.predict(model, arrays, ids, batch_size=8).argmax(-1).tolist() == expected


@pytest.mark.slow
def test_cloze_few_shot_with_lora_trains_only_lora(cloze_setup):
  from jaxft import stages
  cfg, _, _, tmp = cloze_setup
  cfg = cfg.copy_and_resolve_references()
  cfg.cloze.num_shots = 4
  cfg.peft.method = 'lora'
  cfg.peft.lora.rank = 2
  cfg.optimizer.lr = 1e-3
  res = stages.REGISTRY['cloze'].run(stages.validate(cfg), str(tmp / 'few'))
  fs = res['few_shot']
  assert fs['trainable_params'] == 2 * 2 * (4 + 4)  # LoRA r=2 on q, v of one 4-wide layer
  assert fs['accuracy'] == 1.0 and np.isfinite(fs['loss'])
  assert os.path.exists(tmp / 'few/few_shot/lora/peft_config.json')


@pytest.mark.slow
def test_finetune_stage_with_lora_end_to_end(tmp_path):
  """`--config.peft.method=lora` on finetune_cls from an HF directory: the new pooler and the
  classifier train with LoRA, results.json reports the count, workdir/lora holds the LoRA
  weights, and export/ is a plain HF model computing what the PEFT model computes."""
  from jaxft.data.tokenizer import load_tokenizer
  from jaxft.models import hf
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tok = load_tokenizer(os.path.join(repo, 'data/tokenizers/bert-base-uncased'))
  h, r = 16, 4
  mcfg = ModelConfig(vocab_size=len(tok), hidden_size=h, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
  abstract = ModelDef.create(lambda: build_model(mcfg, 'mlm')).abstract_params
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                        abstract)
  hf.save_hf(params, mcfg, str(tmp_path / 'mlm'), 'mlm', tokenizer=tok)
  with open(os.path.join(repo, 'data/glue/sst2/train.tsv'), encoding='utf-8') as f:
    lines = f.read().splitlines()
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data/train.tsv').write_text('\n'.join(lines[:17]) + '\n')
  (tmp_path / 'data/dev.tsv').write_text('\n'.join(lines[:1] + lines[17:25]) + '\n')

  spec = importlib.util.spec_from_file_location('_ft_cls',
                                                os.path.join(repo, 'configs/finetune_cls.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config('sst2')
  cfg.init_from = str(tmp_path / 'mlm')
  cfg.data.update(path=str(tmp_path / 'data'), max_len=16)
  cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  cfg.train.update(num_epochs=0, num_steps=2, batch_size=8, eval_every=0, log_every=1)
  cfg.checkpoint.update(async_save=False)
  cfg.optimizer.lr = 1e-2
  cfg.peft.method = 'lora'
  cfg.peft.lora.rank = r
  wd = tmp_path / 'work'
  from jaxft import config as config_lib
  from jaxft import stages
  from jaxft.stages import finetune
  settings = stages.validate(cfg)
  config_lib.save_config(cfg, str(wd))
  outcome = finetune.finetune(settings, str(wd))
  res = {**outcome.results, 'state': outcome.state}
  want = 2 * 2 * r * (h + h) + (h * 2 + 2) + (h * h + h)  # LoRA q,v + classifier + new pooler
  assert res['trainable_params'] == want
  saved = json.loads((wd / 'results.json').read_text())
  assert saved['trainable_params'] == want
  assert abs(saved['trainable_percent'] - 100.0 * want / saved['params']) < 1e-9
  meta, tensors = peft.load_checkpoint(str(wd / 'lora'))
  assert sum(t.size for t in tensors.values()) == want and meta['peft']['lora_rank'] == r
  model, _ = hf.from_pretrained(str(wd / 'export'))
  batch = {'input_ids': np.full((2, 16), 2000, np.int32),
           'attention_mask': np.ones((2, 16), np.int32),
           'token_type_ids': np.zeros((2, 16), np.int32)}
  exported = model(batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])['logits']
  base = ModelDef.create(lambda: build_model(mcfg, 'cls', num_labels=2))
  peft_def, _, _ = peft.setup(settings.peft, base, None, None, max_len=16)
  ours = peft_def.merge(to_host(res['state']['params']))(
      batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])['logits']
  np.testing.assert_allclose(exported, ours, atol=1e-5, rtol=1e-5)
