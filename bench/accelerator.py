"""Accelerator check: GPT-2 124M and BERT-base train steps on one GPU or TPU, in under 5 minutes.

Runs jaxft's own engine path, as a user's pretraining run gets it by default: the model
sections of configs/gpt2_clm.py:small and configs/bert_mlm.py:base (model.dtype='auto': bf16
on a GPU with compute capability >= 8 and on TPU; attention through
jax.nn.dot_product_attention where the row has no attention dropout, the explicit softmax
where it has; model.remat as configured, off), ModelDef + create_train_state +
make_train_step (one jax.jit, AdamW + clipping, the train state donated), the MLM / CLM
objectives of jaxft/objectives/lm.py. One device (the first): MFU is per chip.

Rows (--rows, comma list):
  gpt2        GPT-2 124M, batch 32 x 1024, CLM (configs/gpt2_clm.py: attention dropout 0)
  bert        BERT-base, batch 32 x 512, MLM with mlm.max_predictions = ceil(0.15 * 512)
              (configs/bert_mlm.py: attention dropout 0.1, so the explicit softmax path)
  bert-nodrop the same with attention dropout 0 (jax.nn.dot_product_attention)
  gpt2-cudnn  gpt2 with jax.nn.dot_product_attention(implementation='cudnn'), through
              layers.attention_implementation; jax 0.10's default (None) is XLA's attention
Then the loss check: a small GPT-2 and BERT (dropout 0, plain SGD so that no Adam amplifies
rounding), a few steps on one fixed batch, on the device and in a CPU subprocess
(JAX_PLATFORMS=cpu, the same dtype); the loss after each step must agree within
LOSS_RTOL (see `loss_check_verdict`).

Printed as it goes (each row when it finishes; --json rewritten after each), with a hard
deadline (--budget-s, default 270 s: faulthandler ends the process after dumping the stacks),
so it never hangs. Without a GPU/TPU it stops at once unless --smoke (tiny shapes, CPU: the
test suite runs it). Compile time is cold unless JAX_COMPILATION_CACHE_DIR is set (it says).

MFU = model FLOPs / step time / the device's dense bf16 peak (PEAKS, by device kind; or
--peak-tflops). Model FLOPs (PaLM appendix B / nanoGPT's estimate_mfu convention):
6 * T * N_body + 6 * T_head * N_head + 12 * L * H * S * T, T = B * S, N_body = L * (4H^2 +
2HI), N_head = V * H (+ H^2 for BERT's transform), T_head = the positions the head projects
(B * max_predictions for BERT's masked-position head, T for GPT-2); no causal halving.
The XLA cost-analysis FLOPs of the compiled step are printed beside them.

  python bench/accelerator.py                       # on the GPU / TPU machine
  python bench/accelerator.py --smoke               # tiny shapes, any backend (CPU)
  python bench/accelerator.py --rows gpt2 --steps 20 --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Dense (no sparsity) bf16 peaks per device, TFLOP/s, matched on jax's device_kind (lower
# case): (test, TFLOP/s, source). First match wins; kinds not listed print no MFU.
PEAKS = (
    (lambda k: 'h100' in k and 'pcie' in k, 756.0,
     'NVIDIA H100 datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity'),
    (lambda k: 'h100' in k and 'nvl' not in k, 989.0,
     'NVIDIA H100 datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity'),
    (lambda k: 'h200' in k and 'nvl' not in k, 989.0,
     'NVIDIA H200 datasheet: H200 SXM BF16 1,979 TFLOPS with sparsity (GH200: the same GPU)'),
    (lambda k: 'a100' in k, 312.0, 'NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity)'),
    (lambda k: 'l40s' in k, 362.0, 'NVIDIA L40S datasheet: BF16 362 TFLOPS (733 with sparsity)'),
    (lambda k: k.split() == ['nvidia', 'l4'], 121.0,
     'NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity'),
    (lambda k: k == 'tpu v4', 275.0, 'Cloud TPU docs, TPU v4: 275 bf16 TFLOPS per chip'),
    (lambda k: k in ('tpu v5 lite', 'tpu v5e'), 197.0,
     'Cloud TPU docs, TPU v5e: 197 bf16 TFLOPS per chip'),
    (lambda k: k in ('tpu v5', 'tpu v5p'), 459.0,
     'Cloud TPU docs, TPU v5p: 459 bf16 TFLOPS per chip'),
    (lambda k: k in ('tpu v6 lite', 'tpu v6e'), 918.0,
     'Cloud TPU docs, TPU v6e (Trillium): 918 bf16 TFLOPS per chip'),
)

SHAPES = {  # name: (config file, variant, batch, seq)
    'gpt2': ('gpt2_clm.py', 'small', 32, 1024),
    'bert': ('bert_mlm.py', 'base', 32, 512),
}
ROWS = {  # row: (shape, attention dropout override, attention implementation)
    'gpt2': ('gpt2', None, None),
    'bert': ('bert', None, None),
    'bert-nodrop': ('bert', 0.0, None),
    'gpt2-cudnn': ('gpt2', None, 'cudnn'),
}
DEFAULT_ROWS = 'gpt2,bert,gpt2-cudnn,bert-nodrop'
SMOKE = dict(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128, vocab_size=512,
             max_position_embeddings=64)
SMOKE_BATCH, SMOKE_SEQ = 4, 32
VOCAB = {'gpt2': 50257, 'bert': 30522}
MASK_ID, CLS_ID, SEP_ID = 103, 101, 102
# the loss check's small shape (on the device and on CPU)
CHECK = dict(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512, vocab_size=1024,
             max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0)
CHECK_BATCH, CHECK_SEQ, CHECK_STEPS, CHECK_LR = 8, 64, 6, 0.5
# Two bf16 runs of the same step on different back ends differ by their accumulation order
# and by the bf16 roundings that order flips. The whole bf16-vs-fp32 gap of these 6 steps on
# CPU is <= 3e-4 relative (gpt2 2.8e-4, bert 5.5e-5: bf16 changes far more than a back end
# does); 5e-3 leaves 15x that. Measured breakages of the gpt2 check: no causal mask 1.8e-2,
# a 1.25x attention scale 1.1e-2 (a 2e-2 tolerance would have passed both).
LOSS_RTOL = 5e-3


def log(msg: str) -> None:
  print(msg, flush=True)


def peak_for(device_kind: str) -> tuple[float | None, str]:
  kind = device_kind.lower().strip()
  for test, tflops, source in PEAKS:
    if test(kind):
      return tflops, source
  return None, f'device kind {device_kind!r} not in the table: pass --peak-tflops'


def load_config(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(f'_cfg_{name[:-3]}',
                                                os.path.join(REPO, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@dataclasses.dataclass
class Spec:
  """One train step to build: model config, batch shape, objective, attention kernel."""
  model: object  # ModelConfig
  batch: int
  seq: int
  max_predictions: int  # MLM: masked positions projected per row (0 for CLM)
  attention_impl: str | None = None

  @property
  def head(self) -> str:
    return 'mlm' if self.model.model_type == 'bert' else 'clm'


def row_spec(row: str, smoke: bool, dtype: str | None = None) -> Spec:
  from jaxft.models import ModelConfig
  shape, attn_drop, impl = ROWS[row]
  cfg_file, variant, batch, seq = SHAPES[shape]
  section = dict(load_config(cfg_file, variant).model)
  section['vocab_size'] = VOCAB[shape]
  if smoke:
    section.update(SMOKE)
    batch, seq = SMOKE_BATCH, SMOKE_SEQ
  if attn_drop is not None:
    section['attention_dropout'] = attn_drop
  if dtype:
    section['dtype'] = dtype
  model = ModelConfig.from_config_dict(section)
  max_pred = math.ceil(0.15 * seq) if model.model_type == 'bert' else 0
  return Spec(model, batch, seq, max_pred, impl)


def check_spec(model_type: str, dtype: str, smoke: bool) -> Spec:
  from jaxft.models import ModelConfig
  cfg_file, variant = SHAPES[model_type][:2]
  section = {**dict(load_config(cfg_file, variant).model), **CHECK, 'dtype': dtype}
  batch, seq = CHECK_BATCH, CHECK_SEQ
  if smoke:
    section.update(SMOKE)
    batch, seq = SMOKE_BATCH, SMOKE_SEQ
  model = ModelConfig.from_config_dict(section)
  return Spec(model, batch, seq, math.ceil(0.15 * seq) if model_type == 'bert' else 0)


def model_flops(spec: Spec) -> float:
  m = spec.model
  L, H, I, V = m.num_layers, m.hidden_size, m.intermediate_size, m.vocab_size
  T = spec.batch * spec.seq
  head_positions = spec.batch * spec.max_predictions if spec.head == 'mlm' else T
  n_head = V * H + (H * H if spec.head == 'mlm' else 0)
  return float(6 * T * L * (4 * H * H + 2 * H * I) + 6 * head_positions * n_head
               + 12 * L * H * spec.seq * T)


def make_batch(spec: Spec, seed: int = 0) -> dict:
  """Packed rows of random token ids (BERT: [CLS] ... [SEP])."""
  import numpy as np
  rs = np.random.RandomState(seed)
  B, S, V = spec.batch, spec.seq, spec.model.vocab_size
  attn = np.ones((B, S), np.int32)
  if spec.head == 'clm':
    return {'input_ids': rs.randint(0, V - 1, (B, S)).astype(np.int32), 'attention_mask': attn}
  ids = rs.randint(2 * MASK_ID, V, (B, S)).astype(np.int32)
  ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
  special = ((ids == CLS_ID) | (ids == SEP_ID)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special}


class _Tokenizer:
  """What the MLM objective reads from a tokenizer: len() and mask_token_id."""

  def __init__(self, vocab: int):
    self.vocab, self.mask_token_id = vocab, MASK_ID

  def __len__(self):
    return self.vocab


def build_step(spec: Spec, tx=None, lr: float = 1e-4):
  """(jitted step, state, batch, mesh, rules): the engine's own train step on one device."""
  import jax

  from jaxft.data.masking import MaskingSettings
  from jaxft.models import build_model
  from jaxft.objectives.lm import clm, mlm
  from jaxft.partitioning import MeshSettings
  from jaxft.train.optimizer import OptimizerSettings, make_optimizer
  from jaxft.train.state import ModelDef, create_train_state
  from jaxft.train.step import global_batch, make_train_step

  mesh, rules = MeshSettings().build(devices=jax.devices()[:1])
  model_def = ModelDef.create(lambda: build_model(spec.model, spec.head, seed=0))
  schedule = None
  if tx is None:
    tx, schedule = make_optimizer(OptimizerSettings(lr=lr), 1000, model_def.abstract_params)
  state, shardings = create_train_state(model_def, tx, mesh, rules, seed=0)
  if spec.head == 'mlm':
    task = mlm(_Tokenizer(spec.model.vocab_size),
               MaskingSettings(max_predictions=spec.max_predictions))
  else:
    task = clm(mask_boundaries=False)
  step = make_train_step(model_def, task, tx, shardings, mesh, rules, schedule=schedule)
  batch = global_batch(make_batch(spec), mesh, rules)
  return step, state, batch, mesh, rules


def _attention_context(impl):
  import contextlib

  from jaxft.models import layers
  return layers.attention_implementation(impl) if impl else contextlib.nullcontext()


def _hlo_facts(compiled) -> dict:
  """FLOPs of XLA's cost analysis, the program's memory, and whether a cuDNN fused
  attention kernel is in it."""
  facts = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    facts['hlo_flops'] = float(cost.get('flops', float('nan')))
  except Exception as e:  # not every backend implements it
    facts['hlo_flops_error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
  try:
    mem = compiled.memory_analysis()
    facts['program_bytes'] = int(getattr(mem, 'peak_memory_in_bytes', 0) or (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes))
  except Exception as e:
    facts['program_bytes_error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
  try:
    text = compiled.as_text()
    facts['cudnn_attention'] = '__cudnn$fmha' in text
  except Exception:
    pass
  return facts


def device_peak_bytes() -> int | None:
  """The allocator's peak since the process started (GPU / TPU); None where the backend
  keeps no statistics (CPU)."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return None if not stats else stats.get('peak_bytes_in_use')


def attention_path(spec: Spec, facts: dict) -> str:
  from jaxft.models.layers import use_fused_attention
  m = spec.model
  if m.attention_dropout > 0:
    return f'explicit softmax (attention dropout {m.attention_dropout})'
  if not use_fused_attention(m.dtype):
    return 'explicit softmax (low precision on CPU)'
  kernel = ' -> cuDNN fused kernel' if facts.get('cudnn_attention') else ''
  return f'dot_product_attention({spec.attention_impl or "default"}){kernel}'


def run_row(name: str, spec: Spec, args) -> dict:
  """Compile, warm up and time one row's train step; the row's result dict."""
  import jax
  import numpy as np

  from jaxft import partitioning
  m = spec.model
  out = dict(row=name, model=f'{m.model_type} L{m.num_layers} H{m.hidden_size}',
             batch=spec.batch, seq=spec.seq, dtype=np.dtype(m.dtype).name, remat=m.remat,
             max_predictions=spec.max_predictions, model_flops=model_flops(spec))
  with _attention_context(spec.attention_impl):
    step, state, batch, mesh, rules = build_step(spec)
    with partitioning.use_mesh(mesh, rules):
      t0 = time.perf_counter()
      lowered = step.jitted.lower(state, batch)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
  out.update(trace_s=t1 - t0, compile_s=t2 - t1, **_hlo_facts(compiled))
  out['attention'] = attention_path(spec, out)
  holder = {'state': state}
  del state

  def one_step():
    holder['state'], holder['metrics'] = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], holder['metrics']))

  t = time.perf_counter()
  one_step()
  out['first_step_s'] = time.perf_counter() - t
  for _ in range(args.warmup - 1):
    one_step()
  times, stop_at = [], time.perf_counter() + args.row_seconds
  while len(times) < args.steps and (not times or time.perf_counter() < stop_at):
    t = time.perf_counter()
    one_step()
    times.append(time.perf_counter() - t)
  out['loss'] = float(holder['metrics']['loss'])
  if not np.isfinite(out['loss']):
    raise FloatingPointError(f'non-finite loss {out["loss"]}')
  out.update(step_s=statistics.median(times), steps_timed=len(times),
             device_peak_bytes=device_peak_bytes())
  out['tokens_per_s'] = spec.batch * spec.seq / out['step_s']
  out['tflops'] = out['model_flops'] / out['step_s'] / 1e12
  if args.peak_tflops:
    out['mfu'] = out['tflops'] / args.peak_tflops
  holder.clear()
  del compiled, lowered, batch
  gc.collect()
  return out


def loss_trajectory(model_type: str, dtype: str, smoke: bool) -> dict:
  """The loss after each of CHECK_STEPS SGD steps on one fixed batch, on the default
  device: the same program on every back end (dropout off, masks from jax.random)."""
  import numpy as np
  import optax
  spec = check_spec(model_type, dtype, smoke)
  step, state, batch, _, _ = build_step(spec, tx=optax.sgd(CHECK_LR))
  losses, norms = [], []
  for _ in range(CHECK_STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    norms.append(float(metrics['grad_norm']))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f'{model_type}: non-finite loss in {losses}')
  return {'loss': losses, 'grad_norm': norms}


def loss_check_verdict(device: dict, cpu: dict) -> tuple[bool, str]:
  """Whether the device's losses equal the CPU's within LOSS_RTOL (relative to the CPU's
  loss, at every step), and the line that says so."""
  worst = max(abs(d - c) / max(abs(c), 1.0) for d, c in zip(device['loss'], cpu['loss']))
  fell = cpu['loss'][0] - cpu['loss'][-1]
  ok = len(device['loss']) == len(cpu['loss']) and worst <= LOSS_RTOL
  return ok, (f'{"ok" if ok else "MISMATCH"}: loss {cpu["loss"][0]:.4f} -> {cpu["loss"][-1]:.4f} '
              f'on CPU (fell {fell:.3f}), device {device["loss"][0]:.4f} -> '
              f'{device["loss"][-1]:.4f}; worst relative difference {worst:.2e} '
              f'(tolerance {LOSS_RTOL:.0e})')


def start_cpu_reference(dtype: str, smoke: bool, budget_s: float):
  """The CPU side of the loss check, in a process that sees only the CPU (it must not take
  the accelerator's memory). Its output goes to files, not pipes: a child blocked on a full
  pipe nobody reads would hang until the deadline."""
  import tempfile
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, os.path.abspath(__file__), '--cpu-reference', '--dtype', dtype,
         '--budget-s', str(max(10, int(budget_s)))] + (['--smoke'] if smoke else [])
  out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
  proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
  proc.outputs = (out, err)
  return proc


def collect_cpu_reference(proc, timeout_s: float) -> dict:
  try:
    proc.wait(timeout=max(1.0, timeout_s))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise TimeoutError(f'the CPU reference did not finish in {timeout_s:.0f} s')
  stdout, stderr = (f.seek(0) or f.read() for f in proc.outputs)
  for line in reversed(stdout.splitlines()):
    if line.startswith('CPU_REFERENCE '):
      return json.loads(line[len('CPU_REFERENCE '):])
  tail = (stderr or stdout).strip().splitlines()[-3:]
  raise RuntimeError(f'the CPU reference failed (exit {proc.returncode}): ' + ' | '.join(tail))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--rows', default=DEFAULT_ROWS, help=f'comma list of {sorted(ROWS)}')
  p.add_argument('--smoke', action='store_true',
                 help='tiny shapes on any backend (CPU included): what the test suite runs')
  p.add_argument('--steps', type=int, default=10, help='timed steps per row (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  p.add_argument('--row-seconds', type=float, default=30.0,
                 help='stop timing a row after this many seconds of timed steps (at least one)')
  p.add_argument('--budget-s', type=float, default=270.0,
                 help='hard deadline for the whole script: rows that would start too close to '
                      'it are skipped, and at it the process dumps its stacks and exits')
  p.add_argument('--peak-tflops', type=float, default=0.0,
                 help='dense bf16 peak of the device (default: from the table by device kind)')
  p.add_argument('--no-loss-check', action='store_true')
  p.add_argument('--json', default='', help='write the rows here (rewritten after each row)')
  p.add_argument('--cpu-reference', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--dtype', default='', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  unknown = [r for r in a.rows.split(',') if r and r not in ROWS]
  if unknown:
    p.error(f'--rows: unknown {unknown}; known: {sorted(ROWS)}')
  if a.steps < 1 or a.warmup < 1:
    p.error('--steps and --warmup must be >= 1')
  return a


def _gib(n) -> str:
  return '-' if n is None else f'{n / 2**30:.2f}'


def row_line(r: dict) -> str:
  """One markdown table row (HEADER's columns)."""
  if 'error' in r or 'skipped' in r:
    return f'| {r["row"]} | {r.get("skipped") or "FAILED: " + r["error"]} |' + ' |' * 11
  mfu = f'{100 * r["mfu"]:.1f}%' if 'mfu' in r else '-'
  hlo = f'{r["hlo_flops"] / 1e12:.2f}' if 'hlo_flops' in r else '-'
  return (f'| {r["row"]} | {r["model"]} | {r["batch"]} x {r["seq"]} | {r["dtype"]} | '
          f'{r["attention"]} | {r["step_s"] * 1e3:.1f} | {r["tokens_per_s"]:,.0f} | '
          f'{r["model_flops"] / 1e12:.2f} / {hlo} | {r["tflops"]:.1f} | {mfu} | '
          f'{r["compile_s"]:.1f} | {_gib(r.get("program_bytes"))} | '
          f'{_gib(r.get("device_peak_bytes"))} |')


HEADER = ('| row | model | batch x seq | dtype | attention | step ms | tokens/s | '
          'TFLOP/step model / XLA | TFLOP/s | MFU | compile s | program GiB | device peak GiB |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|---|---|')


def cpu_reference_main(a) -> int:
  import jax
  out = {t: loss_trajectory(t, a.dtype, a.smoke) for t in ('gpt2', 'bert')}
  out['device'] = jax.devices()[0].device_kind
  print('CPU_REFERENCE ' + json.dumps(out), flush=True)
  return 0


def header_lines(a, dtype: str) -> list[str]:
  import jax
  import jaxlib
  dev = jax.devices()[0]
  peak_line = (f'{a.peak_tflops:g} TFLOP/s dense bf16 ({a.peak_source})' if a.peak_tflops
               else f'no MFU: {a.peak_source}')
  cache = jax.config.jax_compilation_cache_dir
  return [f'device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s); the '
          f'first is used), jax {jax.__version__}, jaxlib {jaxlib.__version__}',
          f'peak: {peak_line}',
          f"model.dtype='auto' -> {dtype}; compilation cache: "
          f'{cache if cache else "off (compile times are cold)"}; '
          f'budget {a.budget_s:.0f} s' + ('; SMOKE shapes' if a.smoke else '')]


def _save(a, info, rows, check):
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'info': info, 'rows': rows, 'loss_check': check}, f, indent=1)


def main(argv=None) -> int:
  a = parse_args(argv)
  # never hangs past the budget (sys.__stderr__: a file descriptor even under pytest)
  faulthandler.dump_traceback_later(a.budget_s, exit=True, file=sys.__stderr__)
  try:
    return _main(a, time.perf_counter())
  finally:
    faulthandler.cancel_dump_traceback_later()


def _main(a, start: float) -> int:
  import jax
  if a.cpu_reference:
    return cpu_reference_main(a)
  platform = jax.default_backend()
  if platform == 'cpu' and not a.smoke:
    log('no GPU or TPU visible to JAX (backend: cpu). Check the jax[cuda] / jax[tpu] install '
        '(python -c "import jax; print(jax.devices())"); --smoke runs tiny shapes on CPU.')
    return 2
  from jaxft.models.config import auto_dtype
  dtype = auto_dtype()[0]
  if not a.peak_tflops:
    a.peak_tflops, a.peak_source = peak_for(jax.devices()[0].device_kind)
  else:
    a.peak_source = '--peak-tflops'
  info = dict(device=jax.devices()[0].device_kind, platform=platform, jax=jax.__version__,
              peak_tflops=a.peak_tflops, peak_source=a.peak_source, dtype=dtype,
              smoke=a.smoke, budget_s=a.budget_s)
  for line in header_lines(a, dtype):
    log(line)
  # The loss check's device side first (the correctness check must not lose the budget to
  # the rows), then its CPU process runs beside the rows (with a compilation cache, on CPU,
  # it loads what the device side compiled).
  started = None if a.no_loss_check else _start_loss_check(dtype, a, start)
  rows, check = [], {}
  log('\n' + HEADER)
  for name in [r for r in a.rows.split(',') if r]:
    print(f'[{time.perf_counter() - start:.0f} s] {name}: compiling and timing ...',
          file=sys.stderr, flush=True)
    rows.append(_one_row(name, a, start, platform))
    log(row_line(rows[-1]))
    _save(a, info, rows, check)
  ok = all('error' not in r for r in rows)
  if started is not None:
    check_ok, check = _finish_loss_check(started, dtype, a, start + a.budget_s - 5)
    ok = ok and check_ok
    _save(a, info, rows, check)
  log(f'\ntotal {time.perf_counter() - start:.0f} s; MFU = model FLOPs / step time / peak '
      '(PaLM convention, bench/accelerator.py); device peak = the allocator\'s peak since the '
      'process started (so far, over the rows above it)')
  return 0 if ok else 1


def _one_row(name: str, a, start: float, platform: str) -> dict:
  spec = row_spec(name, a.smoke)
  left = start + a.budget_s - time.perf_counter()
  if spec.attention_impl == 'cudnn' and platform != 'gpu':
    return dict(row=name, skipped=f'skipped: cuDNN attention needs an NVIDIA GPU ({platform})')
  if left < (0 if a.smoke else 60):
    return dict(row=name, skipped=f'skipped: {left:.0f} s left of the budget')
  try:
    return run_row(name, spec, a)
  except Exception as e:  # OOM, an unsupported kernel: report it and go on
    msg = f'{type(e).__name__}: {e}'.strip().splitlines()[0][:300]
    return dict(row=name, error=msg)


def _start_loss_check(dtype: str, a, start: float):
  """(device losses or the exception that stopped them, the CPU reference process)."""
  try:
    device = {t: loss_trajectory(t, dtype, a.smoke) for t in ('gpt2', 'bert')}
  except Exception as e:
    return e, None
  return device, start_cpu_reference(dtype, a.smoke, start + a.budget_s - 20 - time.perf_counter())


def _finish_loss_check(started, dtype: str, a, stop_at: float) -> tuple[bool, dict]:
  device, ref = started
  try:
    if isinstance(device, Exception):
      raise device
    cpu = collect_cpu_reference(ref, stop_at - time.perf_counter())
  except Exception as e:
    log(f'\nloss check FAILED to run: {type(e).__name__}: {e}'.splitlines()[0])
    return False, {'error': f'{type(e).__name__}: {e}'}
  spec = check_spec('gpt2', dtype, a.smoke)
  log(f'\nloss check (L{spec.model.num_layers} H{spec.model.hidden_size}, batch {spec.batch} x '
      f'{spec.seq}, {dtype}, dropout 0, {CHECK_STEPS} SGD steps at lr {CHECK_LR} on one '
      f'batch) vs the same step on CPU ({cpu["device"]}):')
  check, ok = {}, True
  for t in ('gpt2', 'bert'):
    passed, line = loss_check_verdict(device[t], cpu[t])
    ok = ok and passed
    check[t] = dict(device=device[t], cpu=cpu[t], ok=passed)
    log(f'  {t}: {line}')
  return ok, check


if __name__ == '__main__':
  sys.exit(main())
