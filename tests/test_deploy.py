"""Deploy: export.onnx (export/model.onnx checked by onnxruntime) and int8 inference
(jaxft.models.quantize, predict.quantize=int8).

One tiny SST-2 fine-tune (the tiny pretrained model of tests/test_finetune.py, 16 steps,
32 dev rows) serves the ONNX and the predict tests. Expected values are computed
independently: the tokenizer called directly, the fine-tune's in-memory params through the
jaxft model, onnxruntime on the written file.
"""
from __future__ import annotations

import builtins
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import stages
from jaxft.config import ConfigError
from jaxft.data.classification import GLUE_TASKS
from jaxft.data.tokenizer import load_tokenizer
from jaxft.export import ExportSettings, check_onnx, export_onnx
from jaxft.models import ModelConfig, build_model, quantize
from jaxft.train.state import ModelDef

from test_finetune import (cls_config, finetune_outcome, load_config_module, read_tsv,
                           small_dev, tmp_root)
from test_predict import direct_logits, predict, softmax

ort = pytest.importorskip('onnxruntime', reason='export.onnx needs the deploy extra '
                          '(onnxruntime); the test extra installs it in CI')
pytest.importorskip('torch', reason='export.onnx exports through torch.onnx')


@pytest.fixture(scope='module')
def onnx_run():
  """(workdir, results + final params) of a fine-tune with export.onnx=True."""
  c = cls_config(num_steps=16, eval_every=0, batch_size=16)
  c.optimizer.update(lr=2e-3, warmup_ratio=0.1)
  c.model.update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  c.data.dev_file = small_dev(32)
  c.export.update(hf=True, onnx=True)
  wd = os.path.join(tmp_root(), 'deploy')
  out = finetune_outcome(c, wd)
  return wd, {**out.results, 'params': jax.device_get(out.state['params'])}


def dev_batch(wd: str, n: int = 32, padding: str = 'longest') -> tuple[list[str], dict]:
  rows = read_tsv(small_dev(n))
  tok = load_tokenizer(os.path.join(wd, 'tokenizer'))
  enc = tok([t for t, _ in rows], truncation=True, max_length=64, padding=padding,
            return_tensors='np')
  return [t for t, _ in rows], {k: np.asarray(v, np.int64) for k, v in enc.items()}


def test_onnx_export_gives_the_jaxft_logits(onnx_run):
  """export/model.onnx on real padded dev texts (a batch and length other than the export
  trace's: dynamic axes) equals the jaxft model's logits within 1e-4 of the largest; a
  mismatch is an error."""
  wd, res = onnx_run
  path = os.path.join(wd, 'export', 'model.onnx')
  assert res['onnx']['path'] == path and res['onnx']['max_abs_diff'] <= res['onnx']['tol']
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  assert [i.shape for i in session.get_inputs()] == [['batch', 'sequence']] * 3
  _, enc = dev_batch(wd)
  assert enc['input_ids'].shape[1] < 64 and (enc['attention_mask'] == 0).any()
  feed = {i.name: enc.get(i.name, np.zeros_like(enc['input_ids'])) for i in session.get_inputs()}
  got = session.run(['logits'], feed)[0]
  want = direct_logits(wd, res['params'], 'cls', enc)
  assert got.shape == want.shape == (32, 2)
  # fp32 in two op orders: a few roundings per layer, ~1e-6 of the largest logit
  assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
  assert np.abs(want[:, 1] - want[:, 0]).max() > 1e-2  # a trained head, not a constant
  # a reference 0.01 away (tol here: 1e-4 * max(1, |logit| < 10)) is an error naming it
  wrong = lambda batch: session.run(['logits'], batch)[0] + 0.01
  with pytest.raises(ValueError, match=r'model.onnx.rejected gives logits 0.01 away from '
                                       r'jaxft.s \(max abs difference; allowed 0.000'):
    export_onnx(os.path.join(wd, 'export'), 'cls', wrong, max_len=64)
  assert not os.path.exists(path)  # the re-export failed: no model.onnx, not even the old one


def _quantized_and_bound(x, kernel, contract):
  kq, scale = quantize.quantize_kernel(kernel, contract)
  return (kq, scale, quantize.int8_matmul(x, kq, scale, contract),
          quantize.error_bound(x, kernel, contract))


def test_int8_dense_error_within_the_absmax_bound():
  """int8_matmul against the exact fp32 product: within the rounding bound (half a step of
  each per-token activation scale and per-channel weight scale, absmax / 127), also for a
  channel 1000x smaller than the rest (a per-tensor scale would round it to ~0) and a
  2-dim contraction (attention's output kernel)."""
  rng = np.random.default_rng(0)
  for contract, x_shape, k_shape in ((1, (4, 9, 48), (48, 24)), (2, (3, 5, 4, 8), (4, 8, 16))):
    x = rng.standard_normal(x_shape).astype(np.float32)
    x[0, 0, ...] *= 50.0  # an outlier token gets its own scale
    kernel = (0.05 * rng.standard_normal(k_shape)).astype(np.float32)
    kernel[..., 3] *= 1e-3  # a tiny output channel
    kq, scale, got, bound = jax.jit(_quantized_and_bound, static_argnums=2)(x, kernel, contract)
    assert kq.dtype == jnp.int8 and int(jnp.abs(kq).max()) == 127
    # each weight within half a step of its channel's scale (rounding to nearest)
    half_step = np.asarray(scale) / 2 * (1 + 4 * np.finfo(np.float32).eps)
    assert (np.abs(kernel - np.asarray(kq, np.float32) * np.asarray(scale)) <= half_step).all()
    exact = np.tensordot(x.astype(np.float64), kernel.astype(np.float64), contract)
    got, bound = np.asarray(got, np.float64), np.asarray(bound)
    err = np.abs(got - exact)
    # + fp32 rounding of the final products and of the bound itself: a few eps of |y|
    slack = 4 * np.finfo(np.float32).eps * (np.abs(exact) + bound)
    assert (err <= bound + slack).all(), (contract, (err - bound).max())
    assert err.max() > 0 and (err <= 0.05 * np.abs(exact).max()).all()
    tiny = np.abs(exact[..., 3]).max()
    assert err[..., 3].max() <= 0.02 * tiny  # per channel: the small channel keeps its digits


def test_int8_model_keeps_embeddings_layernorm_biases_fp32():
  """Every dense kernel becomes int8 with an fp32 per-channel scale; embeddings, LayerNorm
  and biases stay fp32 (abstract shapes: nothing is compiled)."""
  mcfg = ModelConfig(model_type='bert', vocab_size=64, hidden_size=16, num_layers=1,
                     num_heads=2, intermediate_size=32, max_position_embeddings=16)
  md = ModelDef.create(lambda: build_model(mcfg, 'cls', num_labels=2))
  qdef = ModelDef.create(lambda: quantize.int8(md.build()))
  kinds = {jax.tree_util.keystr(path): str(x.dtype) for path, x in
           jax.tree_util.tree_flatten_with_path(qdef.abstract_params)[0]}
  int8s = {k for k, v in kinds.items() if v == 'int8'}
  assert len(int8s) == 8  # q, k, v, out, mlp_in, mlp_out, pooler, classifier
  assert all(k.endswith("['kernel_q']") for k in int8s)
  assert not any(k.endswith("['kernel']") for k in kinds)
  assert all(v == 'float32' for k, v in kinds.items() if k not in int8s)
  assert qdef.names['bert']['layers'][0]['attn']['out']['kernel_q'] == ('heads', 'kv', 'embed')
  dense = sum(x.size for k, x in jax.tree_util.tree_flatten_with_path(md.abstract_params)[0]
              if jax.tree_util.keystr(k).endswith("['kernel']"))
  scales = sum(x.size for k, x in jax.tree_util.tree_flatten_with_path(qdef.abstract_params)[0]
               if jax.tree_util.keystr(k).endswith("['scale']") and 'ln' not in
               jax.tree_util.keystr(k))
  # 4 bytes -> 1 byte per dense weight, plus 4 bytes per output channel's scale
  assert (quantize.param_bytes(md.abstract_params) - quantize.param_bytes(qdef.abstract_params)
          == 3 * dense - 4 * scales)


def test_predict_int8_agrees_with_fp32(onnx_run, tmp_path):
  """predict.quantize=int8 on the fine-tuned tiny model against fp32 softmax(logits) of the
  same params (computed directly): the same label wherever fp32's margin exceeds twice the
  largest probability change, probabilities within 0.02 (int8 rounding through 2 layers;
  measured ~3e-3), fewer parameter bytes."""
  wd, res = onnx_run
  r8, recs = predict(wd, small_dev(32), tmp_path / 'int8', quantize='int8')
  assert r8['quantize'] == 'int8' and r8['n'] == 32
  texts, enc = dev_batch(wd, padding='max_length')
  assert [rec['text'] for rec in recs] == [t.strip() for t in texts]
  p32 = softmax(direct_logits(wd, res['params'], 'cls', enc))
  names = list(GLUE_TASKS['sst2'].label_names)  # ['negative', 'positive'] for ids 0, 1
  p8 = np.array([[rec['probs'][k] for k in names] for rec in recs])
  diff = np.abs(p8 - p32).max()
  assert 0 < diff <= 0.02, diff  # > 0: the int8 path really ran
  margin = np.abs(p32[:, 1] - p32[:, 0])
  same = p8.argmax(1) == p32.argmax(1)
  assert same[margin > 2 * diff].all() and same.mean() >= 0.9
  fp32_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(res['params']))
  assert r8['param_bytes'] < fp32_bytes


def test_onnx_config_errors(monkeypatch):
  """export.onnx on a stage without it, or without its packages, fails at parse time
  naming what to change / install."""
  c = load_config_module('quickstart').pretrain_config(smoke=True)
  c.export.onnx = True
  with pytest.raises(ConfigError, match='export.onnx=True: stage pretrain_mlm has no ONNX'):
    stages.parse(c)
  with pytest.raises(ValueError, match='needs export.hf=True'):
    check_onnx(ExportSettings(hf=False, onnx=True))
  real_import = builtins.__import__

  def no_onnxruntime(name, *a, **k):
    if name == 'onnxruntime':
      raise ImportError(name)
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, '__import__', no_onnxruntime)
  with pytest.raises(ValueError, match=r"needs onnxruntime, not installed: pip install "
                                       r"'jaxft\[deploy\]'"):
    check_onnx(ExportSettings(onnx=True))


def _tiny_onnx_run(name: str, **model) -> tuple[str, dict]:
  c = cls_config(num_steps=2, eval_every=0, batch_size=16)
  c.model.update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, **model)
  c.data.dev_file = small_dev(32)
  c.export.update(hf=True, onnx=True)
  wd = os.path.join(tmp_root(), name)
  return wd, finetune_outcome(c, wd).results


def test_onnx_check_of_a_bf16_run_compares_fp32_forwards():
  """A run that computes in bf16 (model.dtype='auto' on a CPU with bf16 units) exports an
  fp32 ONNX model: the check compares it with jaxft's fp32 forward of the same weights, not
  with the bf16 forward (~1e-3 of the largest logit away), and passes."""
  wd, res = _tiny_onnx_run('deploy-bf16', dtype='bfloat16')
  assert res['onnx']['max_abs_diff'] <= res['onnx']['tol']
  assert os.path.isfile(os.path.join(wd, 'export', 'model.onnx'))


def test_a_failed_onnx_check_leaves_no_model_onnx_and_writes_results(monkeypatch):
  """A mismatch keeps the file only as model.onnx.rejected, and results.json (the run's
  metrics, the failed check) is written before the error."""
  import json

  from jaxft import export, finetuning
  real = export.jax_logits
  monkeypatch.setattr(finetuning, 'jax_logits',
                      lambda *a: (lambda batch, f=real(*a): f(batch) + 0.5))
  with pytest.raises(export.OnnxMismatch, match='model.onnx.rejected gives logits 0.5 away'):
    _tiny_onnx_run('deploy-mismatch')
  wd = os.path.join(tmp_root(), 'deploy-mismatch')
  assert not os.path.exists(os.path.join(wd, 'export', 'model.onnx'))
  assert os.path.isfile(os.path.join(wd, 'export', 'model.onnx.rejected'))
  results = json.load(open(os.path.join(wd, 'results.json')))
  assert results['onnx']['passed'] is False and results['onnx']['max_abs_diff'] > 0.4
  assert results['step'] == 2
