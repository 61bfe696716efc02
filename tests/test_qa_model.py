"""The extractive question-answering head ('qa'): jaxft's BertForQuestionAnswering computes
transformers' start / end logits, and every export of it (the Hugging Face directory and its
question-answering pipeline, the peft adapter, ONNX, int8) computes jaxft's.

Tiny random models (hidden 32, 2 layers), every tensor random (HF init leaves LayerNorms at 1
and biases at 0, which would hide a swapped or dropped tensor). jaxft runs eagerly except
where a path jits (jax_logits, int8_model).
"""
from __future__ import annotations

import functools
import json
import os

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
hfpeft = pytest.importorskip('peft')

from flax import nnx  # noqa: E402

from jaxft import export, peft  # noqa: E402
from jaxft.models import ModelConfig, build_model, flat_params, gpt2_defaults, hf  # noqa: E402
from jaxft.partitioning import DEFAULT_RULES, param_names  # noqa: E402
from jaxft.peft import PeftConfig  # noqa: E402
from jaxft.train.state import ModelDef  # noqa: E402
from test_peft_export import random_params  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-4  # tests/test_hf_parity.py's: fp32 logits of a 2-layer model from torch and XLA
EPS32 = float(np.finfo(np.float32).eps)
V, SEQ = 100, 12
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         'data/tokenizers/quickstart-wordpiece')
BERT = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   max_position_embeddings=64, hidden_act='gelu', hidden_dropout=0.0,
                   attention_dropout=0.0, classifier_dropout=0.0)


def hf_bert_config(**kw):
  return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=64, type_vocab_size=2, **kw)


def perturbed(model, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.05)
  return model.eval()


def batch(vocab: int = V) -> dict[str, np.ndarray]:
  """Right-padded rows with mixed token types (question 0, context 1)."""
  rng = np.random.RandomState(1)
  ids = rng.randint(5, vocab, (3, SEQ)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  tt = np.zeros_like(ids)
  tt[:, 5:] = 1
  return {'input_ids': ids * mask, 'attention_mask': mask, 'token_type_ids': tt * mask}


def torch_start_end(model, inputs) -> np.ndarray:
  """transformers' (start_logits, end_logits) stacked on the last axis, as jaxft's `logits`."""
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
  return np.stack([out.start_logits.float().numpy(), out.end_logits.float().numpy()], -1)


def ours(model_def, params, inputs) -> np.ndarray:
  return np.asarray(model_def.merge(params)(inputs['input_ids'], inputs['attention_mask'],
                                            inputs['token_type_ids'])['logits'])


def assert_start_end_close(theirs, mine, tol):
  """Start (index 0) and end (index 1) each within `tol`: a swap fails either."""
  assert theirs.shape == mine.shape and mine.shape[-1] == 2, (theirs.shape, mine.shape)
  for i, which in enumerate(('start', 'end')):
    d = float(np.abs(theirs[..., i] - mine[..., i]).max())
    assert d <= tol, f'{which} logits {d:.3g} apart (allowed {tol:.3g})'


def fp32_tol(mine) -> float:
  """tests/test_peft_export.py's bound: 128 fp32 ulps of the largest logit."""
  return 128 * EPS32 * float(np.abs(mine).max())


# ----------------------------------------------------------------------------- the head

def test_qa_head_shape_axes_and_refusals():
  model = build_model(BERT, 'qa')
  out = model(*batch().values())
  assert out['logits'].shape == (3, SEQ, 2) and out['logits'].dtype == np.float32
  assert model.bert.pooler is None  # HF's QA model has no pooler either
  names = flat_params(param_names(nnx.state(model, nnx.Param)))
  assert names['qa_outputs.kernel'] == ('embed', 'classes')
  known = {name for name, _ in DEFAULT_RULES}
  assert all(a in known for axes in names.values() for a in axes)
  assert build_model(BERT, 'qa', num_labels=2) is not None
  with pytest.raises(ValueError, match="head 'qa' scores 2 labels.*num_labels=3"):
    build_model(BERT, 'qa', num_labels=3)
  gpt2 = gpt2_defaults(vocab_size=V, hidden_size=32, num_layers=1, num_heads=4)
  with pytest.raises(ValueError, match=r"head 'qa' is not available for gpt2; choose one of"):
    build_model(gpt2, 'qa')


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """A tiny random transformers BertForQuestionAnswering and BertModel (with its pooler, as
  all-MiniLM-L6-v2 is), saved once."""
  root = tmp_path_factory.mktemp('hf_qa')
  out = {}
  for i, (name, cls) in enumerate((('qa', transformers.BertForQuestionAnswering),
                                   ('plain', transformers.BertModel))):
    torch.manual_seed(i)
    model = perturbed(cls(hf_bert_config()), seed=i)
    model.save_pretrained(str(root / name))
    out[name] = (model, str(root / name))
  return out


def test_hf_qa_checkpoint_loads_with_start_end_parity(hf_dirs):
  ref, d = hf_dirs['qa']
  model, report = hf.from_pretrained(d)  # head from architectures
  assert type(model).__name__ == 'BertForQuestionAnswering'
  assert report.missing == [] and report.unused == [], report.summary()
  assert {'qa_outputs.kernel', 'qa_outputs.bias'} <= set(report.loaded)
  inputs = batch()
  mine = np.asarray(model(**inputs)['logits'])
  assert_start_end_close(torch_start_end(ref, inputs), mine, TOL)


def test_plain_bert_checkpoint_gives_the_encoder_and_a_fresh_qa_head(hf_dirs):
  """A BertModel checkpoint (all-MiniLM-L6-v2's kind): the encoder loads (its hidden states
  are transformers'), the pooler is reported unused and qa_outputs missing (initialised)."""
  ref, d = hf_dirs['plain']
  model, report = hf.from_pretrained(d, 'qa')
  assert set(report.missing) == {'qa_outputs.kernel', 'qa_outputs.bias'}
  assert set(report.unused) == {'pooler.dense.weight', 'pooler.dense.bias'}
  assert float(np.abs(np.asarray(model.qa_outputs.kernel[...])).sum()) > 0
  inputs = batch()
  out = model(**inputs)
  with torch.no_grad():
    hidden = ref(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
  diff = np.abs(np.asarray(out['last_hidden_state']) - hidden.last_hidden_state.numpy())
  assert float(diff.max()) <= TOL
  assert out['logits'].shape == (3, SEQ, 2)


# ----------------------------------------------------------------------------- exports

@functools.cache
def exported(root: str) -> dict:
  """A random jaxft QA model with the quickstart tokenizer's vocabulary, exported once with
  `export.export_hf` (workdir/export)."""
  tok = transformers.BertTokenizer.from_pretrained(TOKENIZER)
  mcfg = BERT.replace(vocab_size=len(tok))
  model_def = ModelDef.create(lambda: build_model(mcfg, 'qa'))
  params = random_params(model_def.abstract_params, seed=3)
  out = export.export_hf(params, mcfg, 'qa', root, tok)
  return dict(mcfg=mcfg, model_def=model_def, params=params, out=out, tok=tok)


@pytest.fixture(scope='module')
def exp(tmp_path_factory):
  return exported(str(tmp_path_factory.mktemp('qa_export')))


def test_export_opens_as_auto_model_for_question_answering(exp):
  conf = json.load(open(os.path.join(exp['out'], 'config.json')))
  assert conf['architectures'] == ['BertForQuestionAnswering']
  model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
      exp['out'], output_loading_info=True)
  assert type(model).__name__ == 'BertForQuestionAnswering'
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  inputs = batch(exp['mcfg'].vocab_size)
  mine = ours(exp['model_def'], exp['params'], inputs)
  assert_start_end_close(torch_start_end(model.eval(), inputs), mine, TOL)
  # back into jaxft: every tensor bit-identical, the head read off the architecture
  back, report = hf.from_pretrained(exp['out'])
  assert report.missing == [] and report.unused == [], report.summary()
  for n, x in flat_params(exp['params']).items():
    np.testing.assert_array_equal(np.asarray(flat_params(back)[n]), x, err_msg=n)


def test_question_answering_pipeline_runs_on_the_export(exp):
  """transformers 5 removed the 'question-answering' pipeline (the lock's 5.25 refuses the
  task: "Use the text-generation pipeline with a chat model instead"); pyproject allows
  transformers >= 4.45, where it runs on the export."""
  from transformers.pipelines import SUPPORTED_TASKS
  if 'question-answering' not in SUPPORTED_TASKS:
    pytest.skip(f'transformers {transformers.__version__} has no question-answering pipeline')
  qa = transformers.pipeline('question-answering', model=exp['out'], tokenizer=exp['out'],
                             device='cpu')
  context = 'The cat sat on the mat in Paris while the dog slept in the garden.'
  got = qa(question='Where did the cat sit?', context=context)
  assert set(got) >= {'answer', 'start', 'end', 'score'}, got
  assert 0 <= got['start'] < got['end'] <= len(context)
  assert got['answer'] == context[got['start']:got['end']] and got['answer'].strip()


def test_onnx_export_of_the_qa_head(exp):
  """model.onnx has outputs start_logits and end_logits ([batch, sequence] each) and passes
  export_onnx's check against jaxft's logits; a reference with start and end swapped is
  refused (the check compares each, not a symmetric summary)."""
  pytest.importorskip('onnxruntime')
  import onnxruntime as ort
  reference = export.jax_logits(exp['model_def'], exp['params'])
  with pytest.raises(export.OnnxMismatch, match='model.onnx.rejected gives logits'):
    export.export_onnx(exp['out'], 'qa', lambda b: reference(b)[..., ::-1], max_len=16)
  assert not os.path.exists(os.path.join(exp['out'], 'model.onnx'))
  check = export.export_onnx(exp['out'], 'qa', reference, max_len=16)
  assert check['max_abs_diff'] <= check['tol'] and os.path.isfile(check['path'])
  session = ort.InferenceSession(check['path'], providers=['CPUExecutionProvider'])
  assert [o.name for o in session.get_outputs()] == ['start_logits', 'end_logits']
  inputs = {k: v.astype(np.int64) for k, v in batch(exp['mcfg'].vocab_size).items()}
  start, end = session.run(['start_logits', 'end_logits'], inputs)
  mine = ours(exp['model_def'], exp['params'], inputs)
  assert_start_end_close(np.stack([start, end], -1), mine, 1e-4 * np.abs(mine).max())
  with pytest.raises(ValueError, match="no ONNX export for head 'mlm'"):
    export.export_onnx(exp['out'], 'mlm', reference, max_len=16)


# ----------------------------------------------------------------------------- PEFT

def peft_cfg(method: str, **lora) -> PeftConfig:
  p = ml_collections.ConfigDict(PeftConfig.section_defaults())
  p.method = method
  p.lora.update(rank=4, alpha=8.0, **lora)
  p.adapter.update(size=8)
  p.prompt.update(length=3, init='random')
  return PeftConfig.from_section(p, seed=0)


@functools.cache
def peft_case(method: str, root: str) -> dict:
  pcfg = peft_cfg(method, targets='all') if method == 'lora' else peft_cfg(method)
  base_def = ModelDef.create(lambda: build_model(BERT, 'qa'))
  model_def, _, mask = peft.setup(pcfg, base_def, None, None, max_len=SEQ)
  params = random_params(model_def.abstract_params, seed=0)
  out = os.path.join(root, method)
  manifest = peft.export_peft(pcfg, params, mask, BERT, 'qa', out)
  return dict(pcfg=pcfg, base_def=base_def, model_def=model_def, params=params, mask=mask,
              out=out, manifest=manifest)


@pytest.fixture(scope='module')
def peft_get(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('qa_peft'))
  return lambda method: peft_case(method, root)


def test_lora_peft_adapter_round_trip_gives_our_logits(peft_get):
  """The peft-format adapter opens with PeftModel.from_pretrained on an
  AutoModelForQuestionAnswering (the trained qa_outputs in modules_to_save) and gives jaxft's
  start / end logits on question (segment 0) + context (segment 1) rows; so does the merged
  model; base/ without the adapter does not (LoRA matters). task_type is null: with
  QUESTION_ANS, peft 0.22's PeftModelForQuestionAnswering dropped token_type_ids and this
  comparison failed (0.16 apart); the export says so in its notes and README."""
  c = peft_get('lora')
  assert c['manifest']['parts'] == {'merged': '.', 'base': 'base', 'adapter': 'adapter',
                                    'jaxft_peft': 'jaxft-peft'}
  assert c['manifest']['trained_non_peft'] == ['qa_outputs.bias', 'qa_outputs.kernel']
  conf = json.load(open(os.path.join(c['out'], 'adapter', 'adapter_config.json')))
  assert conf['task_type'] is None and conf['modules_to_save'] == ['qa_outputs']
  assert any('token_type_ids' in n for n in c['manifest']['notes'])
  assert 'QUESTION_ANS' in open(os.path.join(c['out'], 'README.md')).read()
  auto = transformers.AutoModelForQuestionAnswering
  model = hfpeft.PeftModel.from_pretrained(auto.from_pretrained(os.path.join(c['out'], 'base')),
                                           os.path.join(c['out'], 'adapter')).eval()
  inputs = batch()
  assert (inputs['token_type_ids'] == 1).any()
  mine = ours(c['model_def'], c['params'], inputs)
  assert_start_end_close(torch_start_end(model, inputs), mine, fp32_tol(mine))
  assert_start_end_close(torch_start_end(auto.from_pretrained(c['out']).eval(), inputs), mine,
                         fp32_tol(mine))
  base = torch_start_end(auto.from_pretrained(os.path.join(c['out'], 'base')).eval(), inputs)
  assert np.abs(base - mine).max() > 0.05 * np.abs(mine).max()


@pytest.mark.parametrize('method', ['lora', 'adapter', 'bitfit', 'prompt'])
def test_every_peft_method_on_qa_exports_and_loads_back(peft_get, method):
  """Every method trains the head (train_head) and its export loads back into jaxft with
  the model's logits; the soft prompt's rows are dropped from the [B, L, 2] logits."""
  c = peft_get(method)
  assert flat_params(c['mask'])['qa_outputs.kernel']
  model_def, params = peft.load_export(c['out'])
  inputs = batch()
  mine = ours(c['model_def'], c['params'], inputs)
  assert mine.shape == (3, SEQ, 2)
  np.testing.assert_allclose(ours(model_def, params, inputs), mine, rtol=0,
                             atol=fp32_tol(mine))


def test_int8_on_the_qa_head_folds_lora(peft_get):
  """int8 quantisation (predict.quantize) of the LoRA QA model: qa_outputs becomes an int8
  kernel too, with LoRA folded in before rounding: the logits are within a few % of the
  LoRA model's (two layers of absmax rounding), not equal, and far closer than the base
  model without LoRA."""
  c = peft_get('lora')
  qdef, qparams = export.int8_model(c['model_def'], c['params'])
  assert qparams['qa_outputs']['kernel_q'].dtype == np.int8
  assert qdef.names['qa_outputs']['kernel_q'] == ('embed', 'classes')
  inputs = batch()
  mine = ours(c['model_def'], c['params'], inputs)
  q = ours(qdef, qparams, inputs)
  err = float(np.abs(q - mine).max())
  assert q.shape == mine.shape and 0 < err <= 0.05 * np.abs(mine).max(), err
  base = ours(c['base_def'], peft.strip_peft(c['params']), inputs)
  assert float(np.abs(base - mine).max()) > 4 * err
