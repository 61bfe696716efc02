"""Scaling over meshes: one model, 1..8 devices, data / FSDP / tensor parallel.

For each mesh (data, fsdp, tensor) the real engine path (ModelDef + create_train_state +
make_train_step, BERT MLM task with masking inside the step) trains the same model on the
same global batch, and the table gives:
  step ms      median wall time of a train step (after compile and warmup)
  state/dev    parameter + optimizer-state bytes held by the fullest device
  x 1-dev      that, as a fraction of the one-device state; FSDP shards parameters and
               AdamW moments over `fsdp` (and tensor parallel over `tensor`), so it should
               be about 1 / (fsdp * tensor) (LayerNorm scales/biases stay replicated)
  loss         the first step's loss: the same on every mesh (same init, same batch)

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count) and
share the host's cores, so step times show the cost of partitioning, not a speed-up;
memory per device is exact. Run on 8 GPUs/TPU chips for real step times.

  python bench/scaling.py
  python bench/scaling.py --meshes 1,1,1 2,2,2 --hidden 256 --layers 4 --steps 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

DEFAULT_MESHES = ('1,1,1', '2,1,1', '1,2,1', '1,1,2', '4,1,1', '1,4,1', '2,2,1', '8,1,1',
                  '1,8,1', '2,2,2')
# BERT special ids used for the synthetic batch (any vocabulary with these ids works).
PAD, CLS, SEP, MASK, FIRST_WORD = 0, 2, 3, 4, 5


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--meshes', nargs='+', default=list(DEFAULT_MESHES),
                 help='data,fsdp,tensor triples')
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices to create')
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--intermediate', type=int, default=1024)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--batch', type=int, default=16, help='global batch (the same on every mesh)')
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--steps', type=int, default=6, help='timed steps per mesh')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compile')
  p.add_argument('--tolerance', type=float, default=0.10,
                 help='allowed excess of state/dev over the 1/(fsdp*tensor) ideal, as a '
                 'fraction of the 1-device state (replicated norms)')
  return p.parse_args(argv)


def make_batch(a, seed: int = 0):
  import numpy as np
  rs = np.random.RandomState(seed)
  ids = rs.randint(FIRST_WORD, a.vocab, (a.batch, a.seq)).astype(np.int32)
  ids[:, 0], ids[:, -1] = CLS, SEP
  special = ((ids == CLS) | (ids == SEP)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'special_tokens_mask': special}


class _Tokenizer:
  """What the MLM objective reads from a tokenizer."""

  def __init__(self, vocab):
    self.vocab, self.mask_token_id = vocab, MASK

  def __len__(self):
    return self.vocab


def run_mesh(a, dims: tuple[int, int, int], batch) -> dict:
  import jax
  from jaxft import partitioning
  from jaxft.data.masking import MaskingSettings
  from jaxft.models import ModelConfig, build_model
  from jaxft.objectives.lm import mlm
  from jaxft.train.optimizer import OptimizerSettings, make_optimizer
  from jaxft.train.state import ModelDef, create_train_state, state_bytes_per_device
  from jaxft.train.step import global_batch, make_train_step

  n = dims[0] * dims[1] * dims[2]
  mesh = partitioning.make_mesh(partitioning.MeshSettings(*dims), devices=jax.devices()[:n])
  rules = partitioning.rules_from_config(())
  mcfg = ModelConfig(model_type='bert', vocab_size=a.vocab, hidden_size=a.hidden,
                     num_layers=a.layers, num_heads=a.heads, intermediate_size=a.intermediate,
                     max_position_embeddings=max(128, a.seq), hidden_dropout=0.0,
                     attention_dropout=0.0, pad_token_id=PAD)
  model_def = ModelDef.create(lambda: build_model(mcfg, 'mlm', seed=0))
  tx, schedule = make_optimizer(OptimizerSettings(), 1000, model_def.abstract_params)
  state, shardings = create_train_state(model_def, tx, mesh, rules, seed=0)
  state_bytes = state_bytes_per_device({'params': state['params'],
                                        'opt_state': state['opt_state']})
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  task = mlm(_Tokenizer(a.vocab), MaskingSettings())
  step = make_train_step(model_def, task, tx, shardings, mesh, rules, schedule=schedule)
  gbatch = global_batch(batch, mesh, rules)
  t0 = time.perf_counter()
  state, metrics = step(state, gbatch)
  first_loss = float(metrics['loss'])
  compile_s = time.perf_counter() - t0
  for _ in range(a.warmup):
    state, metrics = step(state, gbatch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(a.steps):
    t = time.perf_counter()
    state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - t)
  return {'mesh': dims, 'devices': n, 'step_ms': 1000 * statistics.median(times),
          'compile_s': compile_s, 'state_bytes': state_bytes, 'params': n_params,
          'loss': first_loss}


def main(argv=None):
  a = parse_args(argv)
  meshes = [tuple(int(x) for x in m.split(',')) for m in a.meshes]
  if any(len(m) != 3 for m in meshes):
    raise SystemExit('--meshes: data,fsdp,tensor triples, e.g. 2,2,1')
  need = max(m[0] * m[1] * m[2] for m in meshes)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={max(need, a.devices)}')
  import jax
  if jax.device_count() < need:
    raise SystemExit(f'meshes need {need} devices, JAX has {jax.device_count()}')
  batch = make_batch(a)
  rows = []
  print(f'BERT {a.layers}x{a.hidden} (heads {a.heads}, mlp {a.intermediate}, vocab {a.vocab}), '
        f'global batch {a.batch}x{a.seq}, {jax.device_count()} {jax.default_backend()} devices; '
        f'median of {a.steps} steps', flush=True)
  for dims in meshes:
    r = run_mesh(a, dims, batch)
    rows.append(r)
    print(f'  done {dims}: {r["step_ms"]:.1f} ms/step (compile {r["compile_s"]:.1f}s)',
          file=sys.stderr, flush=True)

  base = next((r for r in rows if r['devices'] == 1), None)
  base_bytes = base['state_bytes'] if base else rows[0]['state_bytes'] * rows[0]['devices']
  print()
  print(f'{"data":>4} {"fsdp":>4} {"tensor":>6} {"devices":>7} {"step ms":>9} '
        f'{"state/dev MiB":>13} {"x 1-dev":>8} {"ideal":>6} {"loss":>8}')
  problems = []
  for r in rows:
    d, f, t = r['mesh']
    frac = r['state_bytes'] / base_bytes
    ideal = 1.0 / (f * t)
    print(f'{d:>4} {f:>4} {t:>6} {r["devices"]:>7} {r["step_ms"]:>9.1f} '
          f'{r["state_bytes"] / 2**20:>13.2f} {frac:>8.3f} {ideal:>6.3f} {r["loss"]:>8.4f}')
    if frac > ideal + a.tolerance:
      problems.append(f'mesh {r["mesh"]}: state/dev is {frac:.3f} of 1 device, expected about '
                      f'{ideal:.3f}')
  losses = [r['loss'] for r in rows]
  if max(losses) - min(losses) > 1e-3 * abs(losses[0]):
    problems.append(f'first-step losses differ across meshes: {losses}')
  print(f'\nparams: {rows[0]["params"]:,}; state = params + AdamW moments (fp32)')
  if problems:
    print('\n'.join(['FAILED:'] + problems))
    return 1
  print('per-device state falls as 1/(fsdp*tensor); the same loss on every mesh')
  return 0


if __name__ == '__main__':
  sys.exit(main())
