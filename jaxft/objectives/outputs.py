"""Inference as an objective: a model's per-example outputs over an `indexed` dataset, so
predictions, teacher logits and speed runs go through the loop's one evaluate()."""
from __future__ import annotations

from typing import Callable

from jaxft.objectives.classification import inputs
from jaxft.train.step import Objective


def outputs(name: str = 'logits', transform: Callable | None = None, **head_kwargs) -> Objective:
  """evaluate(model, batch) -> per_example {name: out[name] (transformed), index, valid}."""
  def evaluate(model, batch):
    out = model(*inputs(batch), **head_kwargs)[name]
    if transform is not None:
      out = transform(out)
    return {'per_example': {name: out, 'index': batch['index'], 'valid': batch['valid']}}

  return Objective(loss=None, evaluate=evaluate)
