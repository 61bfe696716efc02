"""PEFT exports open in transformers / Hugging Face peft and compute the jaxft model.

Each case is a tiny random model (hidden 32, 2 layers, vocab 100) after `peft.setup`, every
tensor random (LoRA B and the head too, LayerNorms around 1), exported once with
`peft.export_peft` and read back with `peft.PeftModel.from_pretrained` (torch, CPU). No
training: the export must be exact for any values, and random ones leave no tensor a no-op.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
hfpeft = pytest.importorskip('peft')

from safetensors.numpy import load_file  # noqa: E402

from jaxft import peft  # noqa: E402
from jaxft.models import ModelConfig, build_model, flat_params, hf  # noqa: E402
from jaxft.peft import PeftConfig  # noqa: E402
from jaxft.train.state import ModelDef  # noqa: E402
from jaxft.trees import dotted  # noqa: E402

transformers.logging.set_verbosity_error()

V, SEQ, K = 100, 12, 3
BERT = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                   classifier_dropout=0.0)
GPT2 = BERT.replace(model_type='gpt2', type_vocab_size=0, hidden_act='gelu_new',
                    layer_norm_eps=1e-5)
EPS32 = float(np.finfo(np.float32).eps)


def cfg_for(method: str, **kw) -> PeftConfig:
  p = ml_collections.ConfigDict(PeftConfig.section_defaults())
  p.method = method
  p.lora.update(rank=4, alpha=8.0)
  p.adapter.update(size=8)
  p.prompt.update(length=K, init='random')
  for k, v in kw.items():
    if isinstance(v, dict):
      p[k].update(v)
    else:
      p[k] = v
  return PeftConfig.from_section(p, seed=0)


# name: (model config, head, num_labels, peft config)
CASES = {
    'bert_cls_lora': (BERT, 'cls', 3, cfg_for('lora', lora={'targets': 'all'},
                                              train_patterns=(r'^bert\.pooler\.',))),
    'bert_tok_lora': (BERT, 'token_cls', 5, cfg_for('lora', lora={'targets': 'qkvo'})),
    'gpt2_clm_lora': (GPT2, 'clm', None, cfg_for('lora', lora={'targets': 'all'})),
    'gpt2_cls_lora': (GPT2, 'cls', 3, cfg_for('lora')),
    'gpt2_clm_prompt': (GPT2, 'clm', None, cfg_for('prompt')),
    'gpt2_cls_prompt': (GPT2, 'cls', 3, cfg_for('prompt')),
    'bert_cls_prompt': (BERT, 'cls', 3, cfg_for('prompt')),
    'bert_cls_adapter': (BERT, 'cls', 3, cfg_for('adapter')),
    'bert_cls_bitfit': (BERT, 'cls', 3, cfg_for('bitfit')),
    'bert_tok_lora_bitfit': (BERT, 'token_cls', 5, cfg_for('lora+bitfit')),
}
LORA = ['bert_cls_lora', 'bert_tok_lora', 'gpt2_clm_lora', 'gpt2_cls_lora']
PROMPT = ['gpt2_clm_prompt', 'gpt2_cls_prompt']


def read(path: str) -> str:
  with open(path) as f:
    return f.read()


def random_params(abstract, seed: int):
  rng = np.random.RandomState(seed)

  def init(path, x):
    mean = 1.0 if dotted(path).endswith('scale') else 0.0
    return (mean + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, abstract)


def inputs(mcfg: ModelConfig, padded: bool = True) -> dict[str, np.ndarray]:
  """Right-padded rows (pad id 0 never occurs in content); BERT gets mixed token types."""
  rng = np.random.RandomState(1)
  ids = rng.randint(3, V, (3, SEQ)).astype(np.int32)
  mask = np.ones_like(ids)
  if padded:
    mask[1, 7:] = 0
    mask[2, 4:] = 0
  out = {'input_ids': ids * mask, 'attention_mask': mask}
  if mcfg.model_type == 'bert':
    out['token_type_ids'] = (rng.rand(3, SEQ) < 0.5).astype(np.int32) * mask
  return out


def jaxft_logits(model_def, params, batch) -> np.ndarray:
  return np.asarray(model_def.merge(params)(batch['input_ids'], batch['attention_mask'],
                                            batch.get('token_type_ids'))['logits'])


def torch_logits(model, batch) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()})
  return out.logits.float().numpy()


def assert_fp32_close(theirs, ours):
  """fp32 logits from differently ordered computations (XLA vs torch kernels and erf/tanh):
  2-5 ulps of the largest logit were measured here (AMD Zen 3) on these 2-layer models;
  128 ulps of it leaves room for other CPUs' kernels. A wrong or missing tensor moves the
  logits by a sizeable fraction of their scale (see `test_..._adapter_matters`)."""
  theirs, ours = np.asarray(theirs), np.asarray(ours)
  assert theirs.shape == ours.shape
  tol = 128 * EPS32 * float(np.abs(ours).max())
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=tol)


@functools.cache
def case(name: str, root: str) -> dict:
  """Build, randomise and export one case (once per test session)."""
  mcfg, head, num_labels, cfg = CASES[name]
  base_def = ModelDef.create(lambda: build_model(mcfg, head, num_labels=num_labels))
  model_def, _, mask = peft.setup(cfg, base_def, None, None, max_len=SEQ)
  params = random_params(model_def.abstract_params, seed=0)
  out = os.path.join(root, name)
  manifest = peft.export_peft(cfg, params, mask, mcfg, head, out)
  return dict(mcfg=mcfg, head=head, cfg=cfg, base_def=base_def, model_def=model_def,
              params=params, mask=mask, out=out, manifest=manifest,
              auto=getattr(transformers, peft.export.AUTO_CLASSES[head]))


@pytest.fixture(scope='module')
def get(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('peft_export'))
  return lambda name: case(name, root)


def peft_model(c, base_dir=None):
  base = c['auto'].from_pretrained(base_dir or os.path.join(c['out'], 'base'))
  return hfpeft.PeftModel.from_pretrained(base, os.path.join(c['out'], 'adapter')).eval()


# ----------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize('name', LORA)
def test_lora_adapter_gives_the_jaxft_logits_in_peft(get, name):
  c = get(name)
  assert c['manifest']['parts'] == {'merged': '.', 'base': 'base', 'adapter': 'adapter',
                                    'jaxft_peft': 'jaxft-peft'}
  batch = inputs(c['mcfg'])
  ours = jaxft_logits(c['model_def'], c['params'], batch)
  assert_fp32_close(torch_logits(peft_model(c), batch), ours)
  # The merged plain model (transformers alone) computes the same.
  assert_fp32_close(torch_logits(c['auto'].from_pretrained(c['out']), batch), ours)


@pytest.mark.parametrize('name', LORA)
def test_lora_adapter_matters(get, name):
  """base/ without the adapter is far from the model: the comparisons above test LoRA."""
  c = get(name)
  batch = inputs(c['mcfg'])
  ours = jaxft_logits(c['model_def'], c['params'], batch)
  base = torch_logits(c['auto'].from_pretrained(os.path.join(c['out'], 'base')), batch)
  assert np.abs(base - ours).max() > 0.05 * np.abs(ours).max()


def test_lora_target_names_and_fused_gpt2_attention(get):
  """BERT targets are named inside the layer when a leaf name would select more ('dense':
  the pooler, the MLP);
  GPT-2 q and v become one c_attn LoRA of rank 2r, alpha 2*alpha (the same scale) with
  zero B rows for k; LoRA on both c_proj (attention and MLP) is named by its leaf."""
  conf = lambda n: json.loads(read(os.path.join(get(n)['out'], 'adapter/adapter_config.json')))
  assert conf('bert_cls_lora')['target_modules'] == [
      'attention.output.dense', 'attention.self.key', 'attention.self.query',
      'attention.self.value', 'intermediate.dense', 'output.dense']  # 'dense': also the pooler
  assert conf('bert_tok_lora')['target_modules'] == [  # 'dense': also the MLP
      'attention.output.dense', 'attention.self.key', 'attention.self.query',
      'attention.self.value']
  gpt = conf('gpt2_cls_lora')
  assert gpt['target_modules'] == ['c_attn'] and gpt['fan_in_fan_out']
  assert (gpt['r'], gpt['lora_alpha'], gpt['rank_pattern'], gpt['alpha_pattern']) == (
      4, 8, {'c_attn': 8}, {'c_attn': 16})
  w = load_file(os.path.join(get('gpt2_cls_lora')['out'], 'adapter/adapter_model.safetensors'))
  b = w['base_model.model.transformer.h.0.attn.c_attn.lora_B.weight']  # [3H, 2r]
  assert b.shape == (96, 8) and not b[32:64].any() and not b[:32, 4:].any()
  assert conf('gpt2_clm_lora')['target_modules'] == ['c_attn', 'c_fc', 'c_proj']


@pytest.mark.parametrize('name', LORA + PROMPT)
def test_adapter_files_round_trip_through_peft(get, name, tmp_path):
  """peft reads every tensor we write under the name it would write itself: saving the loaded
  model back gives every tensor we wrote under the same name with a bit-identical value, and
  every config key we wrote with the same value. Lists that peft owns (the task heads it adds
  to `modules_to_save` by default) may grow with its releases; that the model it builds is
  ours is checked on the logits (test_lora_adapter_gives_the_jaxft_logits_in_peft, ...)."""
  c = get(name)
  peft_model(c).save_pretrained(str(tmp_path))
  ours_dir = os.path.join(c['out'], 'adapter')
  mine = load_file(os.path.join(ours_dir, 'adapter_model.safetensors'))
  theirs = load_file(str(tmp_path / 'adapter_model.safetensors'))
  assert sorted(set(mine) - set(theirs)) == []
  for k in mine:
    np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
  cfg_mine = json.loads(read(os.path.join(ours_dir, 'adapter_config.json')))
  cfg_theirs = json.loads(read(str(tmp_path / 'adapter_config.json')))
  added = set(cfg_theirs.get('modules_to_save') or ()) - set(cfg_mine.get('modules_to_save') or ())
  # A tensor only peft saved belongs to a module peft added to modules_to_save.
  for k in sorted(set(theirs) - set(mine)):
    assert any(f'.{m}.' in k for m in added), k
  for k, v in cfg_mine.items():
    if k in ('target_modules', 'modules_to_save'):
      assert set(v or ()) <= set(cfg_theirs[k] or ()), k
    else:
      assert cfg_theirs[k] == v, (k, cfg_theirs[k], v)


def test_lora_adapter_carries_every_trained_module(get, tmp_path):
  """Applied to a base whose trained modules (classifier, pooler) hold other values, as the
  init_from model would, the adapter still gives the model: modules_to_save has them all."""
  c = get('bert_cls_lora')
  assert c['manifest']['trained_non_peft'] == ['bert.pooler.bias', 'bert.pooler.kernel',
                                               'classifier.bias', 'classifier.kernel']
  other = peft.strip_peft(c['params'])
  other = {**other, 'classifier': random_params(other['classifier'], 7),
           'bert': {**other['bert'], 'pooler': random_params(other['bert']['pooler'], 8)}}
  hf.save_hf(other, c['mcfg'], str(tmp_path), 'cls')
  batch = inputs(c['mcfg'])
  ours = jaxft_logits(c['model_def'], c['params'], batch)
  assert_fp32_close(torch_logits(peft_model(c, str(tmp_path)), batch), ours)


# ----------------------------------------------------------------------------- prompt tuning

def test_gpt2_prompt_tuning_causal_lm_in_peft(get):
  """peft prepends the k virtual tokens, as jaxft does for GPT-2, and returns logits for
  them too: its logits after the prompt are jaxft's (padded rows included)."""
  c = get('gpt2_clm_prompt')
  batch = inputs(c['mcfg'])
  theirs = torch_logits(peft_model(c), batch)
  assert theirs.shape == (3, K + SEQ, V)
  assert_fp32_close(theirs[:, K:], jaxft_logits(c['model_def'], c['params'], batch))


def test_gpt2_prompt_tuning_seq_cls_in_peft_on_unpadded_inputs(get):
  """peft feeds inputs_embeds, so transformers' GPT-2 classifier reads the last position:
  equal to jaxft (last non-padding token) on unpadded rows, as the export's note says."""
  c = get('gpt2_cls_prompt')
  assert any('unpadded' in n for n in c['manifest']['notes'])
  assert 'unpadded' in read(os.path.join(c['out'], 'README.md'))
  batch = inputs(c['mcfg'], padded=False)
  assert_fp32_close(torch_logits(peft_model(c), batch),
                    jaxft_logits(c['model_def'], c['params'], batch))


# ----------------------------------------------------------------------------- what peft cannot hold

@pytest.mark.parametrize('name,reason,merged', [
    ('bert_cls_prompt', 'after \\[CLS\\]', False),
    ('bert_cls_adapter', 'no bottleneck adapter', False),
    ('bert_cls_bitfit', 'BitFit has no peft method', True),
    ('bert_tok_lora_bitfit', 'holds one method', True),
])
def test_methods_peft_cannot_hold_export_what_they_can(get, name, reason, merged):
  """No adapter/ (the reason is recorded and in README.md); a merged model where the method
  merges (transformers gives the jaxft logits), else no config.json at the top, so nothing
  opens the export as a plain model by mistake; the jaxft-peft checkpoint with base/ loads
  back bit-identical (`peft.load_export`)."""
  import re
  c = get(name)
  m = c['manifest']
  assert m['parts']['adapter'] is None and re.search(reason, m['absent']['adapter'])
  assert not os.path.exists(os.path.join(c['out'], 'adapter'))
  assert re.search(reason, read(os.path.join(c['out'], 'README.md')))
  batch = inputs(c['mcfg'])
  ours = jaxft_logits(c['model_def'], c['params'], batch)
  assert os.path.exists(os.path.join(c['out'], 'config.json')) == merged
  if merged:
    assert_fp32_close(torch_logits(c['auto'].from_pretrained(c['out']), batch), ours)
  model_def, params = peft.load_export(c['out'], c['base_def'])
  if m['parts']['jaxft_peft']:  # exact copies of every tensor, through base/ and jaxft-peft/
    for n, x in flat_params(c['params']).items():
      np.testing.assert_array_equal(flat_params(params)[n], x, err_msg=n)
    np.testing.assert_array_equal(jaxft_logits(model_def, params, batch), ours)
  else:  # BitFit: the merged model is the whole model
    assert m['parts'] == {'merged': '.', 'base': None, 'adapter': None, 'jaxft_peft': None}
    for n, x in flat_params(c['params']).items():
      np.testing.assert_array_equal(flat_params(params)[n], x, err_msg=n)


def test_lora_export_loads_back_into_jaxft_bit_identical(get):
  c = get('gpt2_clm_lora')
  model_def, params = peft.load_export(c['out'], c['base_def'])
  for n, x in flat_params(c['params']).items():
    np.testing.assert_array_equal(flat_params(params)[n], x, err_msg=n)
  batch = inputs(c['mcfg'])
  np.testing.assert_array_equal(jaxft_logits(model_def, params, batch),
                                jaxft_logits(c['model_def'], c['params'], batch))


@pytest.mark.parametrize('name', ['bert_cls_lora', 'gpt2_cls_prompt', 'bert_cls_adapter',
                                  'bert_cls_bitfit'])
def test_export_readme_code_runs_as_written(get, name, monkeypatch):
  """Each python block of the export's README.md, run in the export directory, gives the
  model: transformers / peft `model` with the jaxft logits, or jaxft `model_def, params`."""
  import re
  c = get(name)
  monkeypatch.chdir(c['out'])
  blocks = re.findall(r'```python\n(.*?)```', read('README.md'), re.S)
  assert len(blocks) == {'bert_cls_lora': 3, 'gpt2_cls_prompt': 2, 'bert_cls_adapter': 1,
                         'bert_cls_bitfit': 1}[name]
  batch = inputs(c['mcfg'], padded=name != 'gpt2_cls_prompt')
  ours = jaxft_logits(c['model_def'], c['params'], batch)
  for code in blocks:
    env = {}
    exec(code, env)  # noqa: S102  (our own generated README)
    if 'model' in env:
      assert_fp32_close(torch_logits(env['model'].eval(), batch), ours)
    else:
      np.testing.assert_array_equal(jaxft_logits(env['model_def'], env['params'], batch), ours)
