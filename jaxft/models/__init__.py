"""Model zoo: BERT and GPT-2 with task heads, built from a ModelConfig."""
from __future__ import annotations

from collections import defaultdict

import jax
import numpy as np
from flax import nnx

from jaxft.models.bert import (BertForMaskedLM, BertForSequenceClassification,
                               BertForTokenClassification, BertModel)
from jaxft.models.config import ModelConfig, gpt2_defaults
from jaxft.models.decoding import DecodeSettings, decode, generate
from jaxft.models.gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

HEADS = {
    'bert': {'none': BertModel, 'mlm': BertForMaskedLM, 'cls': BertForSequenceClassification,
             'token_cls': BertForTokenClassification},
    'gpt2': {'none': GPT2Model, 'clm': GPT2LMHeadModel, 'cls': GPT2ForSequenceClassification},
}


def build_model(cfg: ModelConfig, head: str, *, num_labels: int | None = None, seed: int = 0,
                rngs: nnx.Rngs | None = None):
  """A freshly initialised model of `cfg.model_type` with the given head."""
  heads = HEADS[cfg.model_type]
  if head not in heads:
    raise ValueError(f'head {head!r} is not available for {cfg.model_type}; '
                     f'choose one of {sorted(heads)}')
  rngs = rngs or nnx.Rngs(params=seed)
  cls = heads[head]
  if head in ('cls', 'token_cls'):
    if not num_labels:
      raise ValueError(f'head {head!r} needs num_labels')
    return cls(cfg, num_labels, rngs=rngs)
  return cls(cfg, rngs=rngs)


def abstract_model(cfg: ModelConfig, head: str, **kw):
  """The model with ShapeDtypeStructs for leaves: no memory, no compute."""
  return nnx.eval_shape(lambda: build_model(cfg, head, **kw))


def flat_params(tree) -> dict[str, object]:
  """{'a.b.c': leaf} for a module, nnx.State or nested dict."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
    out['.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)] = leaf
  return out


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in flat_params(tree).values()))


def params_by_module(tree, depth: int = 2) -> dict[str, int]:
  """Parameter counts grouped by the first `depth` path components."""
  counts: dict[str, int] = defaultdict(int)
  for name, x in flat_params(tree).items():
    counts['.'.join(name.split('.')[:depth])] += int(np.prod(x.shape))
  return dict(counts)


__all__ = ['ModelConfig', 'gpt2_defaults', 'build_model', 'abstract_model', 'count_params',
           'params_by_module', 'flat_params', 'generate', 'decode', 'DecodeSettings', 'HEADS']
