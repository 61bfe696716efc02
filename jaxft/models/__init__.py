"""Model zoo: BERT and GPT-2 with task heads, built from a ModelConfig."""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
from flax import nnx

from jaxft.models.bert import (BertForMaskedLM, BertForQuestionAnswering,
                               BertForSequenceClassification, BertForTokenClassification,
                               BertModel)
from jaxft.models.config import ModelConfig, gpt2_defaults
from jaxft.models.decoding import DecodeSettings, decode, generate
from jaxft.models.gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from jaxft.trees import flat_params

HEADS = {
    'bert': {'none': BertModel, 'mlm': BertForMaskedLM, 'cls': BertForSequenceClassification,
             'token_cls': BertForTokenClassification, 'qa': BertForQuestionAnswering},
    'gpt2': {'none': GPT2Model, 'clm': GPT2LMHeadModel, 'cls': GPT2ForSequenceClassification},
}


def build_model(cfg: ModelConfig, head: str, *, num_labels: int | None = None, seed: int = 0,
                rngs: nnx.Rngs | None = None):
  """A freshly initialised model of `cfg.model_type` with the given head (`num_labels` for
  'cls' / 'token_cls' only; 'qa' always scores 2: span start and end)."""
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
  if head == 'qa' and num_labels not in (None, 2):
    raise ValueError(f"head 'qa' scores 2 labels per token (span start, end), not "
                     f'num_labels={num_labels}')
  return cls(cfg, rngs=rngs)


def abstract_model(cfg: ModelConfig, head: str, **kw):
  """The model with ShapeDtypeStructs for leaves: no memory, no compute."""
  return nnx.eval_shape(lambda: build_model(cfg, head, **kw))


def word_embeddings(model):
  """The word-embedding module (`Embed`) of any of the models here, wrapped or not (a
  PEFT model re-hangs the base model's children): what `inputs_embeds` replaces."""
  for path in (('bert', 'embeddings', 'word'), ('embeddings', 'word'), ('transformer', 'wte'),
               ('wte',)):
    node = model
    try:
      for p in path:
        node = getattr(node, p)
    except AttributeError:
      continue
    return node
  raise ValueError(f'cannot find the word embeddings of {type(model).__name__}')


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in flat_params(tree).values()))


_LAYER = re.compile(r'\.layers\.(\d+)\.')
_EMBEDDINGS = ('bert.embeddings.', 'transformer.wte.', 'transformer.wpe.')


def layer_index(name: str) -> int | None:
  """The transformer layer a parameter's dotted name belongs to, or None."""
  m = _LAYER.search(name + '.')
  return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
  return name.startswith(_EMBEDDINGS)


def params_by_module(tree, depth: int = 2) -> dict[str, int]:
  """Parameter counts grouped by the first `depth` path components."""
  counts: dict[str, int] = defaultdict(int)
  for name, x in flat_params(tree).items():
    counts['.'.join(name.split('.')[:depth])] += int(np.prod(x.shape))
  return dict(counts)


__all__ = ['ModelConfig', 'gpt2_defaults', 'build_model', 'abstract_model', 'count_params',
           'params_by_module', 'flat_params', 'generate', 'decode', 'DecodeSettings', 'HEADS',
           'layer_index', 'is_embedding', 'word_embeddings']
