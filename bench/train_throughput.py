"""Training throughput: jaxft's engine vs Hugging Face transformers (PyTorch), same machine.

Times full training steps (forward + backward + AdamW update, dropout on) of one model
shape, batch and sequence length, in one process:

  jaxft   the real engine path: ModelDef + create_train_state + make_train_step from
          jaxft/train, with the MLM / CLM task of jaxft/train/pretrain.py (dynamic masking
          or label shifting happens inside the jitted step). Modes are '+'-joined options:
            fp32      fp32 compute, full-vocab head at every position (the reference work)
            bf16      model.dtype='bfloat16' (bf16 matmul inputs, fp32 accumulation,
                      fp32 params / LayerNorm / softmax / loss)
            mp        MLM head only at masked positions (mlm.max_predictions)
            nodonate  the same jitted step without donating the train state
            noattndrop  attention dropout 0 for this row only. This changes the
                      training recipe: not comparable work to rows with attention dropout.
                      (jaxft's fp32 rows then take jax.nn.dot_product_attention; bf16 rows
                      on CPU keep the explicit softmax, whose matmuls stay bf16.)
          'fast' = bf16+mp (BERT) or bf16 (GPT-2, where mp does not apply).
  torch   transformers BertForMaskedLM / GPT2LMHeadModel from a config (random init),
          model.train() (dropout on), torch.optim.AdamW + clip_grad_norm_(1.0) like jaxft's
          optimizer, MLM masking (15%, 80/10/10) in the step as DataCollatorForLanguageModeling
          does. Modes: fp32, bf16 (= torch.autocast('cpu', dtype=torch.bfloat16)).

Examples:
  python bench/train_throughput.py --preset bert-mini
  python bench/train_throughput.py --preset gpt2-small --steps 10 --warmup 2 --json out.json
  python bench/train_throughput.py --model bert --layers 2 --hidden 128 --heads 2 \\
      --intermediate 512 --batch 16 --seq 128 --jax-modes fp32,mp,bf16,bf16+mp
  python bench/train_throughput.py --preset bert-mini --compile-cache /tmp/jax_cc  # twice

FLOPs (model FLOPs, PaLM appendix B style; printed with the table):
  per step = 6 * T * N_mm + 12 * L * H * S * T,   T = B * S tokens
  N_mm = L * (4 H^2 + 2 H I)  (attention q/k/v/o and MLP kernels)
       + H^2                  (BERT MLM transform dense; 0 for GPT-2)
       + V * H                (output projection, tied to the word embeddings)
  The head terms count every position for every row, jaxft's masked-position mode
  included: that is the work the reference (HF, full-vocab logits everywhere) does, so
  both implementations are credited with the same work and tokens/s ratios equal
  TFLOP/s ratios (and an mp row's MFU can exceed 100%). Biases, LayerNorm, GELU,
  softmax, the loss and the optimizer are left out (< 1-2%), as is the causal halving of
  attention (PaLM convention).
MFU = achieved TFLOP/s / matmul peak measured in the same run (--peak-size^3 matmuls,
compiled once the rows are set up): fp32 rows use the best of the JAX and torch fp32
peaks, bf16 rows the best of the bf16 peaks (JAX: bf16 x bf16 with
preferred_element_type=f32; torch: bf16 mm). The table says which peak each row's MFU uses. Only the peaks of the precisions the
rows use are measured (without bf16 hardware one torch bf16 2048^3 mm takes about a minute).

Timing: every row is set up first (jaxft: trace, lower().compile() timed separately, then
--warmup steps; torch: --warmup steps), then --steps rounds each time one step of every
row and one matmul of every peak kind, in rotating order, so load from other processes
hits all entries alike; each figure is the median over the rounds. Every step blocks
(jax.block_until_ready on the new state and metrics; torch on CPU is synchronous).
With --compile-cache DIR, JAX's persistent compilation cache is on (thresholds 0): run
twice to see the second run's compile time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from bench.machine import cpu_name

PRESETS = {
    'bert-mini': dict(model='bert', layers=4, hidden=256, heads=4, intermediate=1024,
                      vocab=30522, batch=32, seq=128),
    'bert-base': dict(model='bert', layers=12, hidden=768, heads=12, intermediate=3072,
                      vocab=30522, batch=8, seq=128),
    'gpt2-small': dict(model='gpt2', layers=12, hidden=768, heads=12, intermediate=3072,
                       vocab=50257, batch=4, seq=256),
}
BERT_IDS = dict(pad=0, cls=101, sep=102, mask=103, first_word=1000)
GPT2_PAD = 50256
MASK_PROB = 0.15
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- flops


def model_flops_per_step(a) -> tuple[float, str]:
  L, H, I, V, S, B = a.layers, a.hidden, a.intermediate, a.vocab, a.seq, a.batch
  T = B * S
  head_dense = H * H if a.model == 'bert' else 0
  n_mm = L * (4 * H * H + 2 * H * I) + head_dense + V * H
  flops = 6 * T * n_mm + 12 * L * H * S * T
  formula = (f'FLOPs/step = 6*T*N_mm + 12*L*H*S*T with T=B*S={T}, '
             f'N_mm = L*(4H^2+2HI){" + H^2" if head_dense else ""} + V*H = {n_mm:,} '
             f'(LM head over all T positions for every impl) -> {flops / 1e9:.1f} GFLOP/step')
  return float(flops), formula


# ----------------------------------------------------------------------------- data


def make_batch(a, seed: int = 0) -> dict:
  """A numpy batch of random tokens: packed rows (pad_frac=0) or right-padded rows whose
  lengths make ~pad_frac of the tokens padding."""
  import numpy as np
  rs = np.random.RandomState(seed)
  B, S = a.batch, a.seq
  lengths = np.full((B,), S)
  if a.pad_frac > 0:
    # Lengths spread uniformly around (1 - pad_frac) * S, at least 8 tokens.
    mean = (1 - a.pad_frac) * S
    lengths = np.clip(np.round(rs.uniform(2 * mean - S, S, B)), 8, S).astype(int)
  pos = np.arange(S)[None, :]
  attn = (pos < lengths[:, None]).astype(np.int32)
  if a.model == 'bert':
    first = BERT_IDS['first_word'] if a.vocab > 2 * BERT_IDS['first_word'] else BERT_IDS['mask'] + 1
    ids = rs.randint(first, a.vocab, (B, S)).astype(np.int32)
    ids[:, 0] = BERT_IDS['cls']
    ids[np.arange(B), lengths - 1] = BERT_IDS['sep']
    ids = np.where(attn > 0, ids, BERT_IDS['pad']).astype(np.int32)
    special = ((ids == BERT_IDS['cls']) | (ids == BERT_IDS['sep']) | (attn == 0)).astype(np.int32)
    return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special}
  pad_id = gpt2_pad(a)
  ids = rs.randint(0, pad_id, (B, S)).astype(np.int32)
  ids = np.where(attn > 0, ids, pad_id).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': attn}


def gpt2_pad(a) -> int:
  """<|endoftext|> (50256) for the GPT-2 vocabulary, else the last id."""
  return min(GPT2_PAD, a.vocab - 1)


def max_predictions(a) -> int:
  # jaxft selects floor(p * n + u) <= ceil(p * n) tokens of n maskable ones per row, so
  # this cap never truncates and the masked-position loss equals the full one.
  return int(math.ceil(MASK_PROB * a.seq))


# ----------------------------------------------------------------------------- peaks


def peak_matmuls(n: int, precisions: set[str]) -> dict:
  """{name: blocking n x n x n matmul} for the precisions the rows use: JAX fp32, JAX bf16 x
  bf16 with preferred_element_type=f32, torch fp32 mm, torch bf16 mm (fp32 accumulation
  inside). Only those: without bf16 hardware one torch bf16 mm of 2048^3 takes about a
  minute, and an fp32-only run has no use for it."""
  import jax
  import jax.numpy as jnp
  import torch
  k1, k2 = jax.random.split(jax.random.key(0))
  x, y = jax.random.normal(k1, (n, n), jnp.float32), jax.random.normal(k2, (n, n), jnp.float32)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.float32))
  tx, ty = torch.randn(n, n), torch.randn(n, n)
  txb, tyb = tx.bfloat16(), ty.bfloat16()

  def torch_mm(u, v):
    with torch.no_grad():
      torch.mm(u, v)

  fns = {'jax_fp32': lambda: dot(x, y).block_until_ready(),
         'jax_bf16': lambda: dot(xb, yb).block_until_ready(),
         'torch_fp32': lambda: torch_mm(tx, ty),
         'torch_bf16': lambda: torch_mm(txb, tyb)}
  return {k: fn for k, fn in fns.items() if k.split('_')[1] in precisions}


class Row:
  """One implementation x mode, set up and warmed: `step()` runs one blocking train step."""

  def __init__(self, impl, mode, precision, options, step, info):
    self.impl, self.mode, self.precision, self.options = impl, mode, precision, options
    self.step, self.info, self.times = step, info, []


# ----------------------------------------------------------------------------- jaxft


class _Tokenizer:
  """What the MLM objective reads from a tokenizer: len() and mask_token_id."""

  def __init__(self, vocab: int, mask_id: int):
    self.vocab, self.mask_token_id = vocab, mask_id

  def __len__(self):
    return self.vocab


def parse_jax_mode(mode: str, model: str) -> set[str]:
  opts = set(mode.split('+')) if mode else set()
  if 'fast' in opts:
    opts.discard('fast')
    opts |= {'bf16', 'mp'} if model == 'bert' else {'bf16'}
  opts.discard('fp32')
  unknown = opts - {'bf16', 'mp', 'nodonate', 'noattndrop'}
  if unknown:
    raise ValueError(f'jaxft mode {mode!r}: unknown option(s) {sorted(unknown)}; '
                     "known: fp32, bf16, mp, nodonate, noattndrop, fast")
  if 'mp' in opts and model != 'bert':
    raise ValueError(f'jaxft mode {mode!r}: mp (masked-position head) is for BERT MLM only')
  return opts


def jax_model_config(a, bf16: bool, attn_dropout: float):
  from jaxft.models import ModelConfig, gpt2_defaults
  common = dict(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                num_heads=a.heads, intermediate_size=a.intermediate,
                hidden_dropout=a.hidden_dropout, attention_dropout=attn_dropout,
                dtype='bfloat16' if bf16 else 'float32', param_dtype='float32')
  if a.model == 'bert':
    return ModelConfig(model_type='bert', max_position_embeddings=max(512, a.seq),
                       pad_token_id=BERT_IDS['pad'], **common)
  return gpt2_defaults(max_position_embeddings=max(1024, a.seq), pad_token_id=gpt2_pad(a),
                       **common)


def setup_jax(a, mode: str, log) -> Row:
  import jax
  import numpy as np

  from jaxft import partitioning
  from jaxft.data.masking import MaskingSettings
  from jaxft.models import build_model
  from jaxft.objectives.lm import clm, mlm
  from jaxft.partitioning import MeshSettings
  from jaxft.train.optimizer import OptimizerSettings, make_optimizer
  from jaxft.train.state import ModelDef, create_train_state
  from jaxft.train.step import global_batch, make_train_step

  opts = parse_jax_mode(mode, a.model)
  bf16, mp, donate = 'bf16' in opts, 'mp' in opts, 'nodonate' not in opts
  attn_dropout = 0.0 if 'noattndrop' in opts else a.attn_dropout
  mcfg = jax_model_config(a, bf16, attn_dropout)
  head = 'mlm' if a.model == 'bert' else 'clm'
  mesh, rules = MeshSettings().build()
  model_def = ModelDef.create(lambda: build_model(mcfg, head, seed=0))
  tx, schedule = make_optimizer(OptimizerSettings(lr=LR, weight_decay=WEIGHT_DECAY,
                                                  clip_norm=CLIP), 1000,
                                model_def.abstract_params)
  state, shardings = create_train_state(model_def, tx, mesh, rules, seed=0)
  if head == 'mlm':
    masking = MaskingSettings(mask_prob=MASK_PROB,
                              max_predictions=max_predictions(a) if mp else 0)
    task = mlm(_Tokenizer(a.vocab, BERT_IDS['mask']), masking)
  else:
    task = clm(mask_boundaries=False)
  train_step = make_train_step(model_def, task, tx, shardings, mesh, rules, schedule=schedule)
  local = make_batch(a)
  batch = global_batch(local, mesh, rules)
  jitted, barrier = train_step.jitted, 'on (built-in rule)'
  if a.choices == 'measure':  # what a run's first step does (jaxft/measured.py)
    t = time.perf_counter()
    with partitioning.use_mesh(mesh, rules):
      barrier = train_step.choose(state, batch)
    jitted = train_step.variant(barrier)
    barrier += f' (measured choice, {time.perf_counter() - t:.1f}s)'
  if not donate:  # the same step function, jitted without donating the state
    jitted = jax.jit(train_step.jitted.__wrapped__, in_shardings=(shardings, None),
                     out_shardings=(shardings, partitioning.replicated(mesh)))

  t0 = time.perf_counter()
  with partitioning.use_mesh(mesh, rules):
    lowered = jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
  t2 = time.perf_counter()
  del compiled  # the jitted call below reuses this executable (checked: no second compile)

  holder = {'state': state}

  def step():
    with partitioning.use_mesh(mesh, rules):
      holder['state'], holder['metrics'] = jitted(holder['state'], batch)
    jax.block_until_ready((holder['state'], holder['metrics']))

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(a.warmup - 1):
    step()
  loss = float(holder['metrics']['loss'])
  if not np.isfinite(loss):
    raise RuntimeError(f'jaxft {mode}: non-finite loss {loss}')
  options = ['dtype=bfloat16' if bf16 else 'dtype=float32', 'param_dtype=float32']
  if head == 'mlm':
    options.append(f'mlm.max_predictions={max_predictions(a)}' if mp else
                   'mlm.max_predictions=0 (full-vocab head at all positions)')
  from jaxft.models.layers import use_fused_attention
  if attn_dropout > 0:
    options.append('attention=explicit softmax (attention dropout > 0)')
  else:
    options.append(('attention=jax.nn.dot_product_attention' if use_fused_attention(mcfg.dtype)
                    else 'attention=explicit softmax (bf16 on CPU)') + (
                        ' (attention dropout 0: NOT the same recipe)' if a.attn_dropout > 0 else ''))
  options.append('state donated' if donate else 'no donation')
  if not bf16:
    options.append(f'fp32_cotangent_barrier={barrier}')
  info = dict(trace_s=t1 - t0, compile_s=t2 - t1, first_step_s=first, warmup_loss=loss)
  log(f'  jaxft {mode}: trace {t1 - t0:.1f}s, compile {t2 - t1:.1f}s, first step {first:.1f}s, '
      f'loss {loss:.3f}')
  return Row('jaxft', mode, 'bf16' if bf16 else 'fp32', '; '.join(options), step, info)


# ----------------------------------------------------------------------------- torch


def setup_torch(a, mode: str, log) -> Row:
  import numpy as np
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  if mode not in ('fp32', 'bf16'):
    raise ValueError(f'torch mode {mode!r}; known: fp32, bf16')
  torch.manual_seed(0)
  if a.model == 'bert':
    cfg = transformers.BertConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, intermediate_size=a.intermediate,
        max_position_embeddings=max(512, a.seq), hidden_dropout_prob=a.hidden_dropout,
        attention_probs_dropout_prob=a.attn_dropout, hidden_act='gelu',
        pad_token_id=BERT_IDS['pad'])
    model = transformers.BertForMaskedLM(cfg)
  else:
    cfg = transformers.GPT2Config(
        vocab_size=a.vocab, n_embd=a.hidden, n_layer=a.layers, n_head=a.heads,
        n_inner=a.intermediate, n_positions=max(1024, a.seq), resid_pdrop=a.hidden_dropout,
        embd_pdrop=a.hidden_dropout, attn_pdrop=a.attn_dropout,
        activation_function='gelu_new', pad_token_id=gpt2_pad(a))
    model = transformers.GPT2LMHeadModel(cfg)
  model.train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': WEIGHT_DECAY},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=LR,
                          betas=(0.9, 0.999), eps=1e-8)
  local = make_batch(a)
  ids = torch.from_numpy(local['input_ids']).long()
  attn = torch.from_numpy(local['attention_mask']).long()
  special = (torch.from_numpy(local['special_tokens_mask']).bool() if a.model == 'bert'
             else None)
  gen = torch.Generator().manual_seed(0)

  def inputs():
    if a.model != 'bert':
      return ids, ids.masked_fill(attn == 0, -100)
    # DataCollatorForLanguageModeling.torch_mask_tokens: 15%, then 80/10/10.
    prob = torch.full(ids.shape, MASK_PROB).masked_fill(special, 0.0)
    selected = torch.bernoulli(prob, generator=gen).bool()
    labels = ids.masked_fill(~selected, -100)
    corrupted = ids.clone()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & selected
    corrupted[to_mask] = BERT_IDS['mask']
    to_rand = (torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool() & selected
               & ~to_mask)
    corrupted[to_rand] = torch.randint(a.vocab, ids.shape, generator=gen)[to_rand]
    return corrupted, labels

  def step():
    x, labels = inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=(mode == 'bf16')):
      loss = model(input_ids=x, attention_mask=attn, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  t = time.perf_counter()
  loss = step()
  first = time.perf_counter() - t
  for _ in range(a.warmup - 1):
    loss = step()
  if not np.isfinite(loss):
    raise RuntimeError(f'torch {mode}: non-finite loss {loss}')
  attn_impl = getattr(model.config, '_attn_implementation', None) or 'eager'
  options = ['fp32' if mode == 'fp32' else "torch.autocast('cpu', bfloat16), fp32 params",
             f'attn_implementation={attn_impl}', 'AdamW (foreach default) + clip_grad_norm_ 1.0',
             f'threads={torch.get_num_threads()}']
  info = dict(trace_s=None, compile_s=None, first_step_s=first, warmup_loss=loss)
  log(f'  torch {mode}: first step {first:.1f}s, loss {loss:.3f}')
  return Row('torch', mode, 'fp32' if mode == 'fp32' else 'bf16', '; '.join(options), step, info)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                 help='model shape + batch + sequence length (flags below override)')
  p.add_argument('--model', choices=('bert', 'gpt2'))
  for k in ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'batch', 'seq'):
    p.add_argument(f'--{k}', type=int)
  p.add_argument('--steps', type=int, default=10, help='timed steps (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps first (incl. compile)')
  p.add_argument('--jax-modes', default='fp32,fast',
                 help="comma list of '+'-joined options: fp32, bf16, mp, nodonate, "
                      "noattndrop, fast")
  p.add_argument('--torch-modes', default='fp32,bf16', help='comma list of fp32, bf16')
  p.add_argument('--impls', default='jaxft,torch', help='which implementations to run')
  p.add_argument('--hidden-dropout', type=float, default=0.1)
  p.add_argument('--attn-dropout', type=float, default=0.1,
                 help='attention-probability dropout (both impls); > 0 makes jaxft use the '
                      'explicit softmax path (as bf16 on CPU always does) instead of '
                      'jax.nn.dot_product_attention')
  p.add_argument('--pad-frac', type=float, default=0.0,
                 help='target fraction of padding tokens (0 = packed rows)')
  p.add_argument('--peak-size', type=int, default=2048, help='n of the n^3 peak matmul')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0 = cores)')
  p.add_argument('--compile-cache', default='',
                 help="enable JAX's persistent compilation cache in this directory")
  p.add_argument('--json', default='', help='write the rows and run info here')
  p.add_argument('--choices', choices=('default', 'measure'), default='default',
                 help="hardware choices (jaxft/measured.py): the built-in rules, or measured "
                      "on first use as a run does (JAXFT_CHOICES still overrides)")
  a = p.parse_args(argv)
  name = a.preset or ('gpt2-small' if a.model == 'gpt2' else 'bert-mini')
  for k, v in PRESETS[name].items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  if a.steps < 1 or a.warmup < 1:
    p.error('--steps and --warmup must be >= 1 (the first warm-up step includes compile)')
  if not 0 <= a.pad_frac < 0.9:
    p.error('--pad-frac must be in [0, 0.9)')
  if a.model == 'bert' and a.vocab <= 2 * BERT_IDS['mask']:
    p.error(f'--vocab must be > {2 * BERT_IDS["mask"]} for BERT ([MASK] = {BERT_IDS["mask"]})')
  if a.hidden % a.heads:
    p.error(f'--hidden {a.hidden} is not divisible by --heads {a.heads}')
  return a


def fmt_table(rows, headers) -> str:
  cells = [[str(r.get(h, '')) for h in headers] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
  line = lambda vals: '  '.join(v.rjust(w) if i > 1 else v.ljust(w)
                                for i, (v, w) in enumerate(zip(vals, widths)))
  return '\n'.join([line(headers), line(['-' * w for w in widths])] + [line(c) for c in cells])


def main(argv=None) -> list[dict]:
  a = parse_args(argv)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  n_cores = cores()
  import jax
  cache_entries = None
  if a.compile_cache:
    os.makedirs(a.compile_cache, exist_ok=True)
    cache_entries = len(os.listdir(a.compile_cache))
    jax.config.update('jax_compilation_cache_dir', a.compile_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if a.choices == 'measure':  # its one log line per choice
    import logging
    logging.getLogger('jaxft.measured').setLevel(logging.INFO)
    logging.getLogger('jaxft.measured').addHandler(logging.StreamHandler(sys.stderr))
  import numpy as np
  import torch
  torch.set_num_threads(a.threads or n_cores)
  impls = [s for s in a.impls.split(',') if s]
  jax_modes = [m for m in a.jax_modes.split(',') if m] if 'jaxft' in impls else []
  torch_modes = [m for m in a.torch_modes.split(',') if m] if 'torch' in impls else []
  for m in jax_modes:
    parse_jax_mode(m, a.model)

  flops, formula = model_flops_per_step(a)
  tokens = a.batch * a.seq
  batch = make_batch(a)
  pad = 1.0 - float(np.mean(batch['attention_mask']))
  log(f'{a.model} L{a.layers} H{a.hidden} A{a.heads} I{a.intermediate} V{a.vocab}, batch {a.batch} '
      f'x seq {a.seq}, padding {pad:.3f}; {n_cores} cores; jax {jax.__version__} '
      f'({jax.devices()[0].platform}, {jax.device_count()} device(s)), torch {torch.__version__}')
  rows: list[Row] = []
  for m in jax_modes:
    log(f'jaxft {m}: compile + {a.warmup} warm-up step(s) ...')
    rows.append(setup_jax(a, m, log))
  for m in torch_modes:
    log(f'torch {m}: {a.warmup} warm-up step(s) ...')
    rows.append(setup_torch(a, m, log))
  precisions = {r.precision for r in rows}
  peak_fns = peak_matmuls(a.peak_size, precisions)
  for fn in peak_fns.values():  # compile / warm
    fn()
    fn()

  # Timed rounds: each round times one matmul of each peak kind and one step of each row,
  # in a rotating order, so that load from other processes hits every entry alike.
  entries = [(k, fn) for k, fn in peak_fns.items()] + [(r, r.step) for r in rows]
  peak_times = {k: [] for k in peak_fns}
  log(f'timing {a.steps} interleaved rounds ...')
  for i in range(a.steps):
    shift = i % len(entries)
    for key, fn in entries[shift:] + entries[:shift]:
      t = time.perf_counter()
      fn()
      dt = time.perf_counter() - t
      (peak_times[key] if isinstance(key, str) else key.times).append(dt)
  peak_flops = 2.0 * a.peak_size ** 3
  peaks = {k: peak_flops / statistics.median(v) / 1e12 for k, v in peak_times.items()}
  peak_name = {p: max((k for k in peaks if k.endswith(p)), key=peaks.get) for p in precisions}
  peak_for = {p: peaks[k] for p, k in peak_name.items()}

  out_rows = []
  for r in rows:
    step_s = statistics.median(r.times)
    out_rows.append(dict(impl=r.impl, mode=r.mode, precision=r.precision, options=r.options,
                         step_s=step_s, step_s_all=r.times, **r.info))
  rows = out_rows
  best_torch = min((r for r in rows if r['impl'] == 'torch'), key=lambda r: r['step_s'],
                   default=None)
  for r in rows:
    r['tokens_per_s'] = tokens / r['step_s']
    r['tflops'] = flops / r['step_s'] / 1e12
    r['mfu'] = r['tflops'] / peak_for[r['precision']]
    r['mfu_peak'] = peak_name[r['precision']]
    r['vs_best_torch'] = (best_torch['step_s'] / r['step_s']) if best_torch else None
    r['padding_frac'] = pad

  disp = []
  for r in rows:
    disp.append({
        'impl': r['impl'], 'mode': r['mode'],
        'step ms': f'{r["step_s"] * 1e3:.1f}',
        'min ms': f'{min(r["step_s_all"]) * 1e3:.1f}',
        'tokens/s': f'{r["tokens_per_s"]:,.0f}',
        'TFLOP/s': f'{r["tflops"]:.3f}',
        'MFU': f'{100 * r["mfu"]:.1f}% ({r["mfu_peak"]})',
        'x best torch': '' if r['vs_best_torch'] is None else f'{r["vs_best_torch"]:.2f}',
        'compile s': '' if r['compile_s'] is None else f'{r["compile_s"]:.1f}',
        'first step s': f'{r["first_step_s"]:.1f}',
    })
  headers = ['impl', 'mode', 'step ms', 'min ms', 'tokens/s', 'TFLOP/s', 'MFU', 'x best torch',
             'compile s', 'first step s']
  print(f'\n{a.model}: L{a.layers} H{a.hidden} A{a.heads} I{a.intermediate} V{a.vocab}; '
        f'batch {a.batch} x seq {a.seq} = {tokens} tokens/step; padding fraction {pad:.3f}; '
        f'dropout hidden {a.hidden_dropout} attention {a.attn_dropout}; median of {a.steps} '
        f'interleaved rounds after {a.warmup} warm-up step(s); {n_cores} threads; '
        f'CPU: {cpu_name()}')
  print('matmul peaks (TFLOP/s, %d^3, median over the rounds): %s' % (a.peak_size, ', '.join(
      f'{k} {v:.3f}' for k, v in peaks.items())))
  print('MFU peaks: ' + ', '.join(f'{p} rows -> {peak_name[p]} ({peak_for[p]:.3f})'
                                 for p in sorted(precisions)))
  print(formula)
  print()
  print(fmt_table(disp, headers))
  print()
  for r in rows:
    print(f'  {r["impl"]} {r["mode"]}: {r["options"]}')
  print('step ms = median over the rounds (tokens/s, TFLOP/s, MFU and ratios use it); '
        'min ms = fastest round.')
  if any('mp' in parse_jax_mode(r['mode'], a.model) for r in rows if r['impl'] == 'jaxft'):
    print('rows with mp are credited with the full-vocab head FLOPs (equal work), so their '
          'MFU can exceed 100%.')
  if best_torch:
    print(f'x best torch = step time of the fastest torch mode ({best_torch["mode"]}) '
          "/ this row's.")
  jrows = [r for r in rows if r['impl'] == 'jaxft']
  if jrows:
    cache = ('no persistent compilation cache' if not a.compile_cache else
             f'persistent compilation cache {a.compile_cache} ({cache_entries} entries at start'
             f'{": cold" if not cache_entries else ": warm if this shape ran before"})')
    print(f'compile s = lower().compile() of the jaxft step; trace (jit lowering) took '
          + ', '.join(f'{r["mode"]} {r["trace_s"]:.1f}s' for r in jrows) + f'; {cache}.')
  if a.json:
    info = dict(args=vars(a), peaks=peaks, mfu_peaks={p: peak_name[p] for p in peak_name},
                flops_per_step=flops, flops_formula=formula, tokens_per_step=tokens,
                padding_frac=pad, cores=n_cores, jax=jax.__version__, torch=torch.__version__,
                compile_cache_entries_at_start=cache_entries, time=time.time())
    with open(a.json, 'w') as f:
      json.dump({'info': info, 'rows': rows}, f, indent=1)
    log(f'wrote {a.json}')
  return rows


if __name__ == '__main__':
  main()
