"""bench/accelerator.py, the GPU/TPU check, kept from rotting: its --smoke mode runs the
whole script on CPU (rows, table, JSON, the loss check against a CPU subprocess), and its
pieces (peak table, FLOP count, loss verdict, the attention-implementation hook) are checked
on their own."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxft.models import layers

REPO = Path(__file__).resolve().parent.parent


def _load(name):
  spec = importlib.util.spec_from_file_location(f'_bench_{name}', REPO / 'bench' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


acc = _load('accelerator')


def test_smoke_run_prints_rows_and_passes_the_loss_check(tmp_path):
  out = tmp_path / 'acc.json'
  proc = subprocess.run(
      [sys.executable, str(REPO / 'bench' / 'accelerator.py'), '--smoke', '--rows', 'gpt2,bert',
       '--steps', '2', '--warmup', '1', '--budget-s', '240', '--json', str(out)],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  result = json.loads(out.read_text())
  rows = {r['row']: r for r in result['rows']}
  assert set(rows) == {'gpt2', 'bert'}
  for name, r in rows.items():
    assert r['steps_timed'] == 2 and r['step_s'] > 0 and r['compile_s'] > 0
    assert r['tokens_per_s'] == pytest.approx(acc.SMOKE_BATCH * acc.SMOKE_SEQ / r['step_s'])
    # the FLOP formula against XLA's count of the compiled step (which adds the optimizer,
    # LayerNorm, softmax, the loss): the same work within a small factor
    assert 0.9 < r['hlo_flops'] / r['model_flops'] < 1.6, (name, r['hlo_flops'], r['model_flops'])
    assert r['program_bytes'] > 0 and math.isfinite(r['loss'])
    assert f'| {name} | {r["model"]} | 4 x 32 |' in proc.stdout
  assert rows['bert']['attention'].startswith('explicit softmax (attention dropout 0.1)')
  assert rows['bert']['max_predictions'] == math.ceil(0.15 * acc.SMOKE_SEQ)
  for model in ('gpt2', 'bert'):
    check = result['loss_check'][model]
    assert check['ok'], check
    cpu = check['cpu']['loss']
    assert len(cpu) == acc.CHECK_STEPS and cpu[0] - cpu[-1] > 0.1  # the steps train
    assert check['device']['loss'] == pytest.approx(cpu, rel=acc.LOSS_RTOL)


def test_without_an_accelerator_it_stops_at_once(capsys):
  assert jax.default_backend() == 'cpu'
  assert acc.main(['--budget-s', '60']) == 2
  assert 'no GPU or TPU visible to JAX' in capsys.readouterr().out


@pytest.mark.parametrize('kind, tflops', [
    ('NVIDIA H100 80GB HBM3', 989.0), ('NVIDIA H100 PCIe', 756.0), ('NVIDIA H200', 989.0),
    ('NVIDIA A100-SXM4-40GB', 312.0), ('NVIDIA A100 80GB PCIe', 312.0), ('NVIDIA L4', 121.0),
    ('NVIDIA L40S', 362.0), ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5p', 459.0),
    ('TPU v6 lite', 918.0), ('NVIDIA H100 NVL', None), ('NVIDIA GeForce RTX 4090', None),
    ('cpu', None)])
def test_peak_by_device_kind(kind, tflops):
  peak, source = acc.peak_for(kind)
  assert peak == tflops
  assert source


def test_model_flops_match_the_throughput_bench_formula():
  import argparse
  tp = _load('train_throughput')
  spec = acc.row_spec('gpt2', smoke=False)
  a = argparse.Namespace(model='gpt2', layers=12, hidden=768, intermediate=3072, vocab=50257,
                         seq=1024, batch=32)
  assert acc.model_flops(spec) == tp.model_flops_per_step(a)[0]
  # BERT's head projects only the masked positions: counted as such
  bert = acc.row_spec('bert', smoke=False)
  full = acc.model_flops(acc.Spec(bert.model, 32, 512, max_predictions=512))
  assert full - acc.model_flops(bert) == 6 * 32 * (512 - 77) * (30522 * 768 + 768 * 768)


def test_loss_verdict_flags_a_wrong_step():
  cpu = {'loss': [6.9, 6.5, 6.1, 5.8]}
  ok, line = acc.loss_check_verdict({'loss': [6.9, 6.501, 6.099, 5.803]}, cpu)
  assert ok and line.startswith('ok')
  ok, line = acc.loss_check_verdict({'loss': [6.9, 6.5, 6.1, 6.09]}, cpu)  # 5% off at the end
  assert not ok and 'MISMATCH' in line


def test_attention_implementation_reaches_dot_product_attention():
  att = layers.Attention(32, 2, dropout=0.0, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 32))
  y = att(x, None, causal=True)[0]
  with layers.attention_implementation('xla'):
    assert jnp.array_equal(att(x, None, causal=True)[0], y)
  with pytest.raises(Exception, match='cuDNN'), layers.attention_implementation('cudnn'):
    att(x, None, causal=True)  # cuDNN's kernel was asked for: there is none on CPU
  assert jnp.array_equal(att(x, None, causal=True)[0], y)  # the context ended


def test_a_failing_row_is_reported_and_the_next_rows_run(monkeypatch):
  def out_of_memory(name, spec, args):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0G\nmore')
  monkeypatch.setattr(acc, 'run_row', out_of_memory)
  args = acc.parse_args(['--smoke'])
  row = acc._one_row('gpt2', args, start=time.perf_counter(), platform='cpu')
  assert row == {'row': 'gpt2', 'error': 'RuntimeError: RESOURCE_EXHAUSTED: Out of memory '
                 'while trying to allocate 1.0G'}
  assert acc.row_line(row).startswith('| gpt2 | FAILED: RuntimeError: RESOURCE_EXHAUSTED')
  skipped = acc._one_row('gpt2-cudnn', args, time.perf_counter(), 'tpu')
  assert skipped['skipped'].startswith('skipped: cuDNN')


def test_the_deadline_ends_a_run_that_would_hang():
  proc = subprocess.run(
      [sys.executable, str(REPO / 'bench' / 'accelerator.py'), '--smoke', '--budget-s', '1'],
      capture_output=True, text=True, timeout=120, cwd=REPO,
      env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert proc.returncode != 0
  assert 'Timeout' in proc.stderr  # faulthandler's stack dump, then exit
