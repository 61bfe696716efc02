"""Parameter-efficient fine-tuning: LoRA, Houlsby adapters, BitFit, prompt tuning, freezing.

`setup(pcfg, model_def, init_params, trainable)` turns a stage's ModelDef into its PEFT
version (module surgery, see `modules`), extends the starting parameters with the new
PEFT tensors, and returns the `trainable` mask the train step and optimizer already honour
(frozen leaves: stop_gradient and no optimizer state). Nothing else in the engine changes:
params stay a pure nested dict, PEFT params carry logical axes and shard on any mesh.

  python -m jaxft.main --config configs/finetune_cls.py:sst2 --config.peft.method=lora ...

After training, `load_trained` rebuilds the model exactly as evaluated (what predict runs)
and `export_peft` writes every form the method allows: a merged plain model, a Hugging Face
`peft` adapter, and jaxft's own PEFT checkpoint with its base (`export.py`, `hf_peft.py`).

See docs/peft.md.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxft.peft.checkpoint import (apply_lora_checkpoint, checkpoint_dir, is_peft_name,
                                   load_checkpoint, load_into, merged_params, save_checkpoint,
                                   strip_peft, write_checkpoint)
from jaxft.peft.config import ADAPTER_TARGETS, LORA_TARGETS, METHODS, PeftConfig
from jaxft.peft.export import EXPORT_MANIFEST, export_peft, load_export, load_trained, trained_def
from jaxft.peft.modules import PeftDense, PeftModel, inject, layernorm_paths
from jaxft.trees import dotted, flat_params

# Task heads created fresh for fine-tuning: trained alongside the PEFT params by default.
HEAD_RE = re.compile(r'^(classifier|score|qa_outputs)\.')
_BIAS_RE = re.compile(r'(^|[._])bias$')
_WORD_EMBEDDINGS = ('bert.embeddings.word.embedding', 'embeddings.word.embedding',
                    'transformer.wte.embedding', 'wte.embedding')


def _host_kernel(name: str) -> str | None:
  """The base kernel a PEFT tensor belongs to (its freeze flag is inherited)."""
  m = re.match(r'^(.*)\.(lora_a|lora_b|adapter\..*)$', name)
  return f'{m.group(1)}.kernel' if m else None


def trainable_mask(pcfg: PeftConfig, model, abstract_params, base_trainable=None,
                   fresh: Sequence[str] = ()):
  """Bool tree over `abstract_params` (the PEFT model's): PEFT tensors, plus per method
  biases (bitfit), LayerNorms (adapter.train_layernorm), the task head (train_head),
  `train_patterns` and freshly initialised tensors (train_fresh). `base_trainable` (the
  finetune.freeze_* mask over the base tree) can only freeze more; a PEFT tensor follows
  the flag of the kernel it adapts, so freezing a layer freezes its LoRA too."""
  ln = tuple(p + '.' for p in layernorm_paths(model))
  fresh = set(fresh) if pcfg.train_fresh else set()
  extra = [re.compile(p) for p in pcfg.train_patterns]
  base = flat_params(base_trainable) if base_trainable is not None else {}

  def selected(n: str) -> bool:
    if is_peft_name(n):
      return True
    return (('bitfit' in pcfg.methods and bool(_BIAS_RE.search(n)))
            or ('adapter' in pcfg.methods and pcfg.adapter_train_layernorm and n.startswith(ln))
            or (pcfg.train_head and bool(HEAD_RE.match(n)))
            or n in fresh or any(p.search(n) for p in extra))

  def allowed(n: str) -> bool:
    if n in base:
      return bool(base[n])
    host = _host_kernel(n)
    return bool(base.get(host, True)) if host else True

  return jax.tree_util.tree_map_with_path(
      lambda path, _: selected(dotted(path)) and allowed(dotted(path)), abstract_params)


def count(params, trainable=None) -> dict[str, int]:
  """{'params', 'trainable', 'peft'} element counts."""
  flat = flat_params(params)
  mask = flat_params(trainable) if trainable is not None else {n: True for n in flat}
  size = lambda x: int(np.prod(x.shape))
  return {'params': sum(size(x) for x in flat.values()),
          'trainable': sum(size(x) for n, x in flat.items() if mask[n]),
          'peft': sum(size(x) for n, x in flat.items() if is_peft_name(n))}


def _vocab_prompt(word: np.ndarray, k: int, seed: int) -> np.ndarray:
  """k rows of the word embeddings at random ids from the common-token range (Lester et al.:
  sampled-vocabulary init beats random init)."""
  v = word.shape[0]
  lo = min(1000, v // 4)
  hi = min(v, lo + 5000)
  ids = np.random.RandomState(seed).choice(np.arange(lo, hi), size=k, replace=(hi - lo) < k)
  return np.asarray(word[ids])


def setup(pcfg: PeftConfig, model_def, init_params=None, trainable=None, *,
          fresh: Sequence[str] = (), max_len: int = 0):
  """(peft ModelDef, starting params or None, trainable mask), or None without a method.

  `init_params`: host params of the base model (from init_from) or None (fresh init of
  everything). `trainable`: the freeze mask over the base tree, or None. `fresh`: dotted
  names init_from did not provide (trained when peft.train_fresh). `max_len`: the data's
  row length (a soft prompt must fit beside it in the position table).
  """
  if not pcfg.enabled:
    return None
  new_def = trained_def(pcfg, model_def)
  build = new_def.build
  model = nnx.merge(new_def.graphdef, new_def.abstract_state)
  if 'prompt' in pcfg.methods:
    limit = model.cfg.max_position_embeddings
    if max_len + pcfg.prompt_length > limit:
      raise ValueError(f'data.max_len={max_len} + peft.prompt.length={pcfg.prompt_length} '
                       f'exceeds the model\'s max_position_embeddings={limit}')
  mask = trainable_mask(pcfg, model, new_def.abstract_params, trainable, fresh)

  params = None
  if init_params is not None:
    names = {n for n in flat_params(new_def.abstract_params) if is_peft_name(n)}
    new = jax.device_get(jax.jit(lambda: {
        n: v for n, v in flat_params(nnx.state(build(), nnx.Param)).items() if n in names})())
    flat = {**flat_params(init_params), **{n: np.asarray(v) for n, v in new.items()}}
    if 'prompt' in pcfg.methods and pcfg.prompt_init == 'vocab':
      word = next(flat[n] for n in _WORD_EMBEDDINGS if n in flat)
      flat['prompt'] = _vocab_prompt(word, pcfg.prompt_length, pcfg.seed).astype(
          flat['prompt'].dtype)
    params = jax.tree_util.tree_map_with_path(lambda path, _: flat[dotted(path)],
                                              new_def.abstract_params)

  c = count(new_def.abstract_params, mask)
  targets = sorted({n.rsplit('.', 1)[0] if n.endswith(('lora_a', 'lora_b')) else
                    n.split('.adapter.')[0] for n in flat_params(mask) if is_peft_name(n)
                    and n != 'prompt'})
  if jax.process_index() == 0:
    logging.info('peft %s: %s trainable of %s params (%.3f%%), %s in PEFT tensors; adapted '
                 'layers: %s', '+'.join(pcfg.methods), f'{c["trainable"]:,}',
                 f'{c["params"]:,}', 100.0 * c['trainable'] / max(c['params'], 1),
                 f'{c["peft"]:,}', targets or 'none')
  if not c['trainable']:
    raise ValueError(f'peft.method={"+".join(pcfg.methods)} with the freeze settings leaves no '
                     'trainable parameter')
  return new_def, params, mask


__all__ = ['PeftConfig', 'METHODS', 'LORA_TARGETS', 'ADAPTER_TARGETS', 'PeftDense', 'PeftModel',
           'inject', 'setup', 'trainable_mask', 'count', 'merged_params', 'save_checkpoint',
           'load_checkpoint', 'apply_lora_checkpoint', 'load_into', 'checkpoint_dir',
           'is_peft_name', 'strip_peft', 'write_checkpoint', 'EXPORT_MANIFEST', 'export_peft',
           'load_export', 'load_trained', 'trained_def']
