"""A trained PEFT run in and out: the model exactly as evaluated (`load_trained`), and every
form its method allows on disk (`export_peft`).

Why one loader: a PEFT model is the base model after module surgery plus its PEFT tensors.
Loading a checkpoint into the *base* definition keeps the base and head and silently drops
every LoRA/adapter/prompt tensor (the model predicts as if never adapted). `load_trained`
rebuilds the definition the run trained (`trained_def`) and takes every tensor or fails.

export_peft(out_dir) writes, per method (docs/peft.md):

  out_dir/                 merged plain HF model (LoRA folded into W, BitFit, lora+bitfit):
                           config.json, model.safetensors, tokenizer; transformers opens it
  out_dir/base/            plain HF model = the trained model without its PEFT tensors (the
                           frozen weights, and the head etc. at their trained values)
  out_dir/adapter/         Hugging Face peft adapter (LoRA; prompt tuning on GPT-2), which
                           applies to base/ (and to the init_from model: it carries every
                           trained non-PEFT module in modules_to_save)
  out_dir/jaxft-peft/      jaxft's own PEFT checkpoint (every method; all PEFT tensors and
                           every trained tensor), which applies to base/ via `load_export`
  out_dir/export.json      what is where, and why a part is absent
  out_dir/README.md        the same, with the code to open each part
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxft.models import ModelConfig, build_model, flat_params, hf
from jaxft.peft import hf_peft
from jaxft.peft.checkpoint import (is_peft_name, load_checkpoint, merged_params, strip_peft,
                                   write_checkpoint)
from jaxft.peft.config import PeftConfig
from jaxft.peft.modules import inject
from jaxft.train.state import ModelDef, to_host
from jaxft.trees import dotted

EXPORT_MANIFEST = 'export.json'
FORMAT = 'jaxft-export'
AUTO_CLASSES = {'cls': 'AutoModelForSequenceClassification',
                'token_cls': 'AutoModelForTokenClassification', 'clm': 'AutoModelForCausalLM',
                'mlm': 'AutoModelForMaskedLM', 'none': 'AutoModel',
                'qa': 'AutoModelForQuestionAnswering'}


def trained_def(pcfg: PeftConfig, base_def: ModelDef) -> ModelDef:
  """The ModelDef a run with these PEFT settings trained: `base_def` after the run's PEFT
  surgery (`base_def` itself when the run used no PEFT)."""
  if not pcfg.enabled:
    return base_def
  base_build = base_def.build
  return ModelDef.create(lambda: inject(base_build(), pcfg))


def load_trained(pcfg: PeftConfig, base_def: ModelDef, checkpoint, *, where: str):
  """(model_def, host params) of the model exactly as trained and evaluated, for any PEFT
  method or none: `trained_def(cfg, base_def)` with every tensor of `checkpoint` (a nested
  or flat {dotted name: array} of the run's checkpointed params, PEFT tensors included) in
  place. A tensor the model lacks, or one the checkpoint lacks, is an error naming `where`
  and the tensors; nothing is dropped or freshly initialised."""
  model_def = trained_def(pcfg, base_def)
  target = flat_params(model_def.abstract_params)
  source = flat_params(checkpoint)
  missing = [n for n in target if n not in source]
  unused = sorted(set(source) - set(target))
  if missing or unused:
    more = lambda names: f'{names[:6]}{" ..." if len(names) > 6 else ""}'
    method = '+'.join(pcfg.methods) or 'none'
    raise ValueError(f'{where}: the checkpoint does not match the trained model (peft.method='
                     f'{method}): missing {more(missing)}, not in the model {more(unused)}')
  for n, x in target.items():
    if tuple(source[n].shape) != tuple(x.shape):
      raise ValueError(f'{where}: {n} has shape {tuple(source[n].shape)} but the trained model '
                       f'has {tuple(x.shape)}')
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.asarray(source[dotted(path)], dtype=x.dtype),
      model_def.abstract_params)
  return model_def, params


def load_export(export_dir: str, base_def: ModelDef | None = None):
  """(model_def, host params) from a directory written by `export_peft`: base/ plus the
  jaxft-peft checkpoint, or the merged model when there is no PEFT tensor (BitFit).
  `base_def` (the plain model's ModelDef) defaults to the one export.json describes."""
  manifest = read_manifest(export_dir)
  parts = manifest['parts']
  if base_def is None:
    mcfg = ModelConfig.from_config_dict(manifest['model'])
    base_def = ModelDef.create(lambda: build_model(mcfg, manifest['head'],
                                                   num_labels=manifest['num_labels']))
  if not parts.get('jaxft_peft'):
    params, report = hf.load_hf_into(base_def.abstract_params, export_dir)
    _complete(report, export_dir)
    return base_def, jax.tree.map(np.asarray, params)
  meta, tensors = load_checkpoint(os.path.join(export_dir, parts['jaxft_peft']))
  base_dir = os.path.join(export_dir, parts['base'])
  base, report = hf.load_hf_into(base_def.abstract_params, base_dir)
  _complete(report, base_dir)
  flat = {n: np.asarray(x) for n, x in flat_params(base).items()}
  flat.update(tensors)
  return load_trained(PeftConfig.from_dict(meta['peft']), base_def, flat, where=export_dir)


def _complete(report, where):
  if report.missing or report.unused:
    raise ValueError(f'{where}: does not match the model: missing {report.missing[:6]}, '
                     f'unused {report.unused[:6]}')


def read_manifest(export_dir: str) -> dict:
  fn = os.path.join(export_dir, EXPORT_MANIFEST)
  if not os.path.isfile(fn):
    raise FileNotFoundError(f'{fn} does not exist: {export_dir} was not written by export_peft')
  with open(fn) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{fn}: format {manifest.get("format")!r} is not {FORMAT!r}')
  return manifest


def export_peft(pcfg: PeftConfig, params, trainable, mcfg, head: str, out_dir: str, *,
                tokenizer=None,
                id2label=None, base_model_name_or_path: str | None = None,
                extra: dict | None = None) -> dict:
  """Write every form the run's PEFT method allows into `out_dir` (module docstring) and
  return the manifest (also out_dir/export.json). `params`/`trainable`: the trained PEFT
  tree and its mask; `base_model_name_or_path`: what adapter_config.json names as the base
  (default: the absolute path of out_dir/base; pass the final path when out_dir is a
  temporary directory renamed afterwards). Every process calls it; process 0 writes."""
  if not pcfg.enabled:
    raise ValueError('export_peft: the run used no PEFT method; export it with hf.save_hf')
  host = to_host(params)
  mask = flat_params(trainable)
  has_peft = any(is_peft_name(n) for n in flat_params(host))
  parts, why, notes = {'merged': None, 'base': None, 'adapter': None, 'jaxft_peft': None}, {}, []
  hf_kw = dict(tokenizer=tokenizer, id2label=id2label)
  main = jax.process_index() == 0
  if pcfg.mergeable:
    if main:
      hf.save_hf(merged_params(pcfg, host), mcfg, out_dir, head, **hf_kw)
    parts['merged'] = '.'
  else:
    why['merged'] = ('adapters and soft prompts change the computation itself; they cannot be '
                     'folded into a plain transformers model')
  if has_peft:
    parts['base'], parts['jaxft_peft'] = 'base', 'jaxft-peft'
    base_dir = os.path.join(out_dir, 'base')
    # All PEFT tensors (frozen ones too, e.g. a frozen layer's LoRA) plus every trained one:
    # with base/ that is the whole model.
    keep = jax.tree_util.tree_map_with_path(
        lambda path, m: bool(m) or is_peft_name(dotted(path)), trainable)
    try:
      config, tensors, notes = hf_peft.adapter(
          pcfg, host, trainable, mcfg, head,
          base_model_name_or_path=base_model_name_or_path or os.path.abspath(base_dir))
      parts['adapter'] = 'adapter'
    except hf_peft.NotRepresentable as e:
      why['adapter'] = str(e)
    if main:
      hf.save_hf(strip_peft(host), mcfg, base_dir, head, **hf_kw)
      write_checkpoint(pcfg, host, keep, os.path.join(out_dir, parts['jaxft_peft']),
                       extra={'head': head, 'model': mcfg.to_dict(), **(extra or {})})
      if parts['adapter']:
        hf_peft.write(os.path.join(out_dir, parts['adapter']), config, tensors)
  else:
    why['adapter'] = hf_peft.why_not(pcfg, mcfg.model_type, head) or 'no PEFT tensors'
    why['base'] = why['jaxft_peft'] = 'no PEFT tensors: the merged model is the whole model'
  trained = sorted(n for n, m in mask.items() if m and not is_peft_name(n))
  head_kernel = [x for n, x in flat_params(host).items() if n in ('classifier.kernel',
                                                                  'score.kernel')]
  manifest = {'format': FORMAT, 'version': 1, 'method': '+'.join(pcfg.methods), 'head': head,
              'model_type': mcfg.model_type, 'parts': parts, 'absent': why, 'notes': notes,
              'trained_non_peft': trained, 'model': mcfg.to_dict(),
              'num_labels': int(head_kernel[0].shape[-1]) if head_kernel else None}
  if main:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, EXPORT_MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2)
      f.write('\n')
    with open(os.path.join(out_dir, 'README.md'), 'w') as f:
      f.write(readme(manifest))
  return manifest


def readme(manifest: dict) -> str:
  """README.md of an export: each part, how to open it, and why a part is absent."""
  parts, why, auto = manifest['parts'], manifest['absent'], AUTO_CLASSES[manifest['head']]
  title = (f'# jaxft export: peft.method={manifest["method"]} ({manifest["model_type"]}, '
           f'head {manifest["head"]})')
  lines = [title, '']
  if parts['merged']:
    lines += [('This directory is the trained model as a plain Hugging Face model (the PEFT '
               'update merged into its weights):'), '', '```python', 'import transformers',
              "EXPORT_DIR = '.'  # this directory",
              f'model = transformers.{auto}.from_pretrained(EXPORT_DIR)', '```', '']
  else:
    lines += [f'No merged model here: {why["merged"]}.', '']
  if parts['adapter']:
    lines += ['`adapter/` is a Hugging Face `peft` adapter for `base/`:', '', '```python',
              'import peft, transformers', "EXPORT_DIR = '.'  # this directory",
              f'base = transformers.{auto}.from_pretrained(EXPORT_DIR + "/base")',
              'model = peft.PeftModel.from_pretrained(base, EXPORT_DIR + "/adapter")', '```', '']
  else:
    lines += [f'No Hugging Face `peft` adapter: {why["adapter"]}.', '']
  if parts['base']:
    lines += [('`base/` alone is **not** the trained model: it lacks the PEFT tensors (the '
               'trained head and other trained non-PEFT tensors are in it at their trained '
               'values). `jaxft-peft/` holds every PEFT tensor and every trained tensor; with '
               '`base/` it is the exact trained model in jaxft:'), '', '```python',
              'from jaxft import peft', "EXPORT_DIR = '.'  # this directory",
              'model_def, params = peft.load_export(EXPORT_DIR)',
              '# logits = model_def.merge(params)(input_ids, attention_mask)["logits"]', '```',
              '']
  lines += [f'Note: {n}.' for n in manifest['notes']]
  return '\n'.join(lines).rstrip() + '\n'
