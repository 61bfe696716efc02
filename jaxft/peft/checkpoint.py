"""PEFT weights in and out: merge LoRA into the base for export, save the trained tensors
alone (small), and re-apply them to a base model.

On disk (workdir/lora/ for LoRA, workdir/<method>/ otherwise):
  adapter_model.safetensors   the trainable tensors only, by dotted jaxft path
  peft_config.json            the PeftConfig, the LoRA scale and a tensor inventory
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from safetensors.numpy import load_file, save_file

from jaxft.peft.config import PeftConfig
from jaxft.peft.modules import PEFT_KEYS
from jaxft.train.state import to_host
from jaxft.trees import flat_params

WEIGHTS = 'adapter_model.safetensors'
CONFIG = 'peft_config.json'
FORMAT = 'jaxft-peft'


def is_peft_name(name: str) -> bool:
  """A dotted path added by jaxft.peft (LoRA pair, adapter, the top-level soft prompt)."""
  parts = name.split('.')
  return parts[0] == 'prompt' or any(p in PEFT_KEYS for p in parts[1:])


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def _lora_delta(a, b, scale: float, dtype):
  xp = _xp(a)
  return (scale * xp.tensordot(xp.asarray(a, np.float32), xp.asarray(b, np.float32),
                               axes=1)).astype(dtype)


def strip_peft(tree):
  """The nested param dict without its PEFT tensors (LoRA pairs, adapters, the prompt): the
  base model's tree, with whatever else trained (head, biases) at its trained values."""
  if not isinstance(tree, dict):
    return tree
  return {k: strip_peft(v) for k, v in tree.items() if str(k) not in PEFT_KEYS}


def _merge_tree(tree, scale: float):
  """Nested dict: fold every {kernel, lora_a, lora_b} into kernel, drop the LoRA leaves."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _merge_tree(v, scale) for k, v in tree.items() if k not in ('lora_a', 'lora_b')}
  if 'lora_a' in tree:
    k = tree['kernel']
    out['kernel'] = k + _lora_delta(tree['lora_a'], tree['lora_b'], scale, k.dtype)
  return out


def merged_params(pcfg: PeftConfig, params):
  """A plain-model parameter tree: LoRA folded into its kernels (W + alpha/r * A B), so the
  result exports to Hugging Face and runs without jaxft.peft. BitFit/freezing change no
  structure. Adapters and soft prompts cannot be folded into a plain model: ValueError."""
  if not pcfg.mergeable:
    raise ValueError(f'peft.method={"+".join(pcfg.methods)}: adapters and soft prompts change '
                     'the computation and cannot be merged into a plain model; keep the PEFT '
                     'weights (workdir/<method>/) and load them with peft.load_into')
  left = [n for n in flat_params(params) if is_peft_name(n) and not n.endswith(('.lora_a',
                                                                              '.lora_b'))]
  if left:
    raise ValueError(f'cannot merge PEFT tensors {left[:4]} into a plain model')
  return _merge_tree(params, pcfg.lora_scale)


def checkpoint_dir(workdir: str, pcfg: PeftConfig) -> str:
  return os.path.join(workdir, '_'.join(pcfg.methods))


def save_checkpoint(pcfg: PeftConfig, params, trainable, workdir: str, *,
                    extra: dict | None = None) -> str:
  """Write the trainable tensors (PEFT params + whatever else trained, e.g. the task head)
  with their config to workdir/<method>/; returns the directory. Process 0 writes."""
  return write_checkpoint(pcfg, params, trainable, checkpoint_dir(workdir, pcfg), extra=extra)


def write_checkpoint(pcfg: PeftConfig, params, trainable, out: str, *,
                     extra: dict | None = None) -> str:
  """save_checkpoint into the directory `out` itself (export_peft puts one in export/)."""
  flat = flat_params(params)
  mask = flat_params(trainable) if trainable is not None else {n: True for n in flat}
  keep = {n: x for n, x in flat.items() if bool(mask[n])}
  host = to_host(keep)
  if jax.process_index() != 0:
    return out
  os.makedirs(out, exist_ok=True)
  tensors = {n: np.ascontiguousarray(np.asarray(x)) for n, x in host.items()}
  save_file(tensors, os.path.join(out, WEIGHTS), metadata={'format': FORMAT})
  meta = {'format': FORMAT, 'version': 1, 'peft': pcfg.to_dict(), 'lora_scale': pcfg.lora_scale,
          'tensors': {n: {'shape': list(t.shape), 'dtype': str(t.dtype),
                          'kind': 'peft' if is_peft_name(n) else 'base'}
                      for n, t in sorted(tensors.items())}}
  meta.update(extra or {})
  with open(os.path.join(out, CONFIG), 'w') as f:
    json.dump(meta, f, indent=2)
  return out


def load_checkpoint(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(meta, {dotted name: array}) of a directory written by save_checkpoint."""
  cfg_path, w_path = os.path.join(directory, CONFIG), os.path.join(directory, WEIGHTS)
  for p in (cfg_path, w_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f'{p} does not exist: not a jaxft PEFT checkpoint directory')
  with open(cfg_path) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{cfg_path}: format {meta.get("format")!r} is not {FORMAT!r}')
  return meta, load_file(w_path)


def _copy(tree):
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _locate(tree, name: str, where: str):
  """(parent dict, key) of the leaf `name` in a nested dict (list indices may be int keys)."""
  parts = name.split('.')
  node = tree
  for i, p in enumerate(parts):
    key = p if p in node else (int(p) if p.isdigit() and int(p) in node else None)
    if key is None:
      raise KeyError(f'{where}: tensor {name!r} has no place in the parameters (no '
                     f'{".".join(parts[:i + 1])!r})')
    if i == len(parts) - 1:
      return node, key
    node = node[key]


def _put(parent, key, value, name, where):
  old = parent[key]
  if tuple(old.shape) != tuple(value.shape):
    raise ValueError(f'{where}: {name} has shape {tuple(value.shape)} but the parameters '
                     f'have {tuple(old.shape)}')
  parent[key] = np.asarray(value, dtype=old.dtype) if isinstance(old, np.ndarray) else \
      jnp.asarray(value, dtype=old.dtype)


def apply_lora_checkpoint(base_params, directory: str):
  """The base parameter tree with a saved LoRA run applied: W + alpha/r * A B for each
  adapted kernel, and the other saved tensors (task head, biases) put in place. The
  result is a plain model (no LoRA leaves), like the exported HF directory."""
  meta, tensors = load_checkpoint(directory)
  scale = float(meta['lora_scale'])
  out = _copy(base_params)
  bad = [n for n in tensors if is_peft_name(n) and not n.endswith(('.lora_a', '.lora_b'))]
  if bad:
    raise ValueError(f'{directory}: {bad[:4]} are adapter/prompt tensors, which cannot be '
                     'merged into a plain model; use peft.load_into on a PEFT model instead')
  for name, x in sorted(tensors.items()):
    if name.endswith('.lora_b'):
      continue
    if name.endswith('.lora_a'):
      host = name[:-len('.lora_a')]
      b = tensors.get(host + '.lora_b')
      if b is None:
        raise ValueError(f'{directory}: {name} has no matching {host}.lora_b')
      parent, key = _locate(out, host + '.kernel', directory)
      k = parent[key]
      delta = _lora_delta(x, b, scale, np.float32)
      if tuple(delta.shape) != tuple(k.shape):
        raise ValueError(f'{directory}: LoRA for {host} gives shape {delta.shape} but the '
                         f'kernel is {tuple(k.shape)}')
      parent[key] = (np.asarray(k, np.float32) + delta).astype(k.dtype)
    else:
      parent, key = _locate(out, name, directory)
      _put(parent, key, x, name, directory)
  return out


def load_into(params, directory: str):
  """`params` (a PEFT-structured tree, e.g. from the same peft config) with every saved
  tensor put in place: re-applies adapters, prompts and unmerged LoRA."""
  _, tensors = load_checkpoint(directory)
  out = _copy(params)
  for name, x in tensors.items():
    parent, key = _locate(out, name, directory)
    _put(parent, key, x, name, directory)
  return out
