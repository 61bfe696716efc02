"""Decoding speed: jaxft's jitted KV-cache decoder vs `transformers` generate (PyTorch), same
model, same prompts, same settings, in the same run.

The model is a random GPT-2 of the chosen shape, built in jaxft, exported with
`jaxft.models.hf.save_hf` and loaded by `transformers.GPT2LMHeadModel` (so both run the
same weights). Prompts are random token ids of --prompt-len; EOS is off (`min_new_tokens`
= `max_new_tokens` for transformers), so every row generates exactly --new tokens and both
sides do the same work. For each method (greedy; beam with --beams) and batch size, each
framework runs --reps timed calls after one warm-up call (jaxft's first call compiles; its
compile time is printed separately); the table holds the median.

tokens/s = batch x new tokens / seconds of one generate call (beam search: the returned
sequences only, not the beams). 'same ids' compares the generated token ids of the two
(greedy and beam are deterministic; a random model's logits can tie only by accident).

  python bench/generate.py                                # e2e recipe shape, batch 1 and 32
  python bench/generate.py --preset gpt2-small --new 32 --reps 2
  python bench/generate.py --batches 1,8 --methods greedy --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.machine import cpu_name

PRESETS = {  # layers, hidden, heads, positions
    'e2e': (4, 128, 4, 256),           # configs/finetune_lm.py:e2e
    'gpt2-small': (12, 768, 12, 1024),  # 124M
}


def build(preset: str, seed: int, out_dir: str):
  """(jaxft model, HF torch model) with the same random weights."""
  import torch
  import transformers

  from jaxft.models import build_model, gpt2_defaults, hf
  layers, hidden, heads, positions = PRESETS[preset]
  cfg = gpt2_defaults(num_layers=layers, hidden_size=hidden, num_heads=heads,
                      intermediate_size=4 * hidden, max_position_embeddings=positions,
                      hidden_dropout=0.0, attention_dropout=0.0)
  model = build_model(cfg, 'clm', seed=seed)
  hf.save_hf(model, cfg, out_dir, 'clm')
  ref = transformers.GPT2LMHeadModel.from_pretrained(out_dir, dtype=torch.float32).eval()
  return model, ref


def time_jaxft(model, ids, settings, reps):
  import jax
  from flax import nnx

  from jaxft.models.decoding import decode
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, i, m: decode(nnx.merge(graphdef, s), i, m, settings))
  mask = ids * 0 + 1
  t = time.perf_counter()
  out = jax.block_until_ready(fn(state, ids, mask))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(state, ids, mask))
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s, jax.device_get(out['tokens'])


def time_torch(ref, ids, method, new, beams, reps):
  import torch
  x = torch.from_numpy(ids.astype('int64'))
  kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0, eos_token_id=None)
  if method == 'beam':
    kw.update(num_beams=beams, early_stopping=False)
  with torch.no_grad():
    out = ref.generate(x, **kw)
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      out = ref.generate(x, **kw)
      times.append(time.perf_counter() - t)
  return statistics.median(times), out[:, ids.shape[1]:].numpy()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--preset', default='e2e', choices=sorted(PRESETS))
  ap.add_argument('--batches', default='1,32')
  ap.add_argument('--methods', default='greedy,beam')
  ap.add_argument('--beams', type=int, default=4)
  ap.add_argument('--prompt-len', type=int, default=32)
  ap.add_argument('--new', type=int, default=64)
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--threads', type=int, default=0, help='torch threads (0: all cores)')
  ap.add_argument('--json', default='')
  args = ap.parse_args(argv)

  import numpy as np
  import torch
  import transformers

  from jaxft.models.decoding import DecodeSettings
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(args.threads or os.cpu_count())
  rows = []
  with tempfile.TemporaryDirectory() as d:
    model, ref = build(args.preset, 0, d)
    vocab = model.cfg.vocab_size
    for method in args.methods.split(','):
      for b in map(int, args.batches.split(',')):
        ids = np.random.RandomState(b).randint(0, vocab, (b, args.prompt_len)).astype(np.int32)
        s = DecodeSettings(method=method, max_new_tokens=args.new, num_beams=args.beams,
                           eos_token_id=None, pad_token_id=0)
        tj, compile_s, toks_j = time_jaxft(model, ids, s, args.reps)
        tt, toks_t = time_torch(ref, ids, method, args.new, args.beams, args.reps)
        rows.append(dict(method=method if method == 'greedy' else f'beam {args.beams}', batch=b,
                         jaxft_tok_s=b * args.new / tj, torch_tok_s=b * args.new / tt,
                         speedup=tt / tj, compile_s=compile_s,
                         same_ids=bool(np.array_equal(toks_j, toks_t))))
        print(rows[-1], flush=True)
  layers, hidden, heads, _ = PRESETS[args.preset]
  print(f'\n{cpu_name()}; GPT-2 {args.preset} (L{layers} H{hidden} '
        f'A{heads}, vocab {vocab}), prompt {args.prompt_len}, {args.new} new tokens, fp32; '
        f'jax {__import__("jax").__version__}, torch {torch.__version__}, transformers '
        f'{transformers.__version__}\n')
  print('| method | batch | jaxft tok/s | transformers tok/s | jaxft / transformers | jaxft '
        'compile s | same ids |\n|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['method']} | {r['batch']} | {r['jaxft_tok_s']:.0f} | {r['torch_tok_s']:.0f} | "
          f"{r['speedup']:.2f}x | {r['compile_s']:.1f} | {'yes' if r['same_ids'] else 'no'} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'cpu': cpu_name(), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
