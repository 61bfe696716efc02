"""PeftConfig: the `peft` config section, parsed and checked once.

Kept separate from the modules so that validation (unknown method, bad regex, rank <= 0)
runs before anything is built or compiled, and so a saved checkpoint can record exactly
what produced it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxft.models.config import ACTIVATIONS

METHODS = ('lora', 'adapter', 'bitfit', 'prompt')

# Named target sets for LoRA (regexes over the dotted path of a Dense module).
LORA_TARGETS = {
    'qv': r'(^|\.)attn\.(query|value)$',
    'qkv': r'(^|\.)attn\.(query|key|value)$',
    'qkvo': r'(^|\.)attn\.(query|key|value|out)$',
    'all': r'(^|\.)layers\.\d+\.(attn\.(query|key|value|out)|mlp_in|mlp_out)$',
}
ADAPTER_TARGETS = {
    'houlsby': r'(^|\.)layers\.\d+\.(attn\.out|mlp_out)$',  # after attention and after FFN
    'ffn': r'(^|\.)layers\.\d+\.mlp_out$',  # after FFN only (Pfeiffer placement)
}


def _regex(value: str, presets: dict, key: str) -> str:
  pattern = presets.get(value, value)
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f'{key}={value!r} is neither a preset {sorted(presets)} nor a valid '
                     f'regex: {e}') from None
  return pattern


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  methods: tuple[str, ...] = ()
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = LORA_TARGETS['qv']
  adapter_size: int = 64
  adapter_act: str = 'gelu'
  adapter_targets: str = ADAPTER_TARGETS['houlsby']
  adapter_train_layernorm: bool = True
  prompt_length: int = 20
  prompt_init: str = 'vocab'
  train_head: bool = True
  train_fresh: bool = True
  train_patterns: tuple[str, ...] = ()
  seed: int = 0

  @property
  def enabled(self) -> bool:
    return bool(self.methods)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  @property
  def mergeable(self) -> bool:
    """LoRA and BitFit change only existing tensors (or add a linear delta): the result is a
    plain model. Adapters and soft prompts change the computation itself."""
    return not ({'adapter', 'prompt'} & set(self.methods))

  @classmethod
  def from_section(cls, p, seed: int = 0) -> 'PeftConfig':
    """From the `peft` config section (or a dict of it); `seed` draws the prompt init."""
    method = str(p.get('method', 'none') or 'none')
    methods = tuple(m.strip() for m in method.replace(',', '+').split('+') if m.strip())
    methods = tuple(m for m in methods if m != 'none')
    for m in methods:
      if m not in METHODS:
        raise ValueError(f'peft.method={method!r}: unknown method {m!r}; choose none or one of '
                         f'{METHODS} (join with + to combine, e.g. lora+bitfit)')
    lora, adapter, prompt = (dict(p.get(k, {}) or {}) for k in ('lora', 'adapter', 'prompt'))
    d = cls()
    c = cls(
        methods=methods,
        lora_rank=int(lora.get('rank', d.lora_rank)),
        lora_alpha=float(lora.get('alpha', d.lora_alpha)),
        lora_dropout=float(lora.get('dropout', d.lora_dropout)),
        lora_targets=_regex(str(lora.get('targets', 'qv')), LORA_TARGETS, 'peft.lora.targets'),
        adapter_size=int(adapter.get('size', d.adapter_size)),
        adapter_act=str(adapter.get('act', d.adapter_act)),
        adapter_targets=_regex(str(adapter.get('targets', 'houlsby')), ADAPTER_TARGETS,
                               'peft.adapter.targets'),
        adapter_train_layernorm=bool(adapter.get('train_layernorm', d.adapter_train_layernorm)),
        prompt_length=int(prompt.get('length', d.prompt_length)),
        prompt_init=str(prompt.get('init', d.prompt_init)),
        train_head=bool(p.get('train_head', d.train_head)),
        train_fresh=bool(p.get('train_fresh', d.train_fresh)),
        train_patterns=tuple(p.get('train_patterns', ()) or ()), seed=int(seed))
    c.check()
    return c

  @staticmethod
  def section_defaults() -> dict:
    """The `peft` config section at its defaults. method: none | lora | adapter | bitfit |
    prompt, or several joined by '+'; targets are presets or regexes over Dense paths."""
    d = PeftConfig()
    return dict(
        method='none',
        lora=dict(rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout,
                  targets='qv'),  # qv | qkv | qkvo | all | regex
        adapter=dict(size=d.adapter_size, act=d.adapter_act, targets='houlsby',
                     train_layernorm=d.adapter_train_layernorm),
        prompt=dict(length=d.prompt_length, init=d.prompt_init),  # vocab | random
        train_head=d.train_head,    # also train the task head (classifier / score / qa_outputs)
        train_fresh=d.train_fresh,  # also train tensors init_from did not provide
        train_patterns=(),          # regexes of further base tensors to train
    )

  def check(self):
    if self.lora_rank <= 0:
      raise ValueError(f'peft.lora.rank={self.lora_rank} must be > 0')
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f'peft.lora.dropout={self.lora_dropout} must be in [0, 1)')
    if self.adapter_size <= 0:
      raise ValueError(f'peft.adapter.size={self.adapter_size} must be > 0')
    if self.adapter_act not in ACTIVATIONS:
      raise ValueError(f'peft.adapter.act={self.adapter_act!r}; known: {sorted(ACTIVATIONS)}')
    if self.prompt_length <= 0:
      raise ValueError(f'peft.prompt.length={self.prompt_length} must be > 0')
    if self.prompt_init not in ('vocab', 'random'):
      raise ValueError(f"peft.prompt.init={self.prompt_init!r}; allowed: 'vocab', 'random'")
    for pat in self.train_patterns:
      try:
        re.compile(pat)
      except re.error as e:
        raise ValueError(f'peft.train_patterns: {pat!r} is not a valid regex: {e}') from None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['methods'] = list(self.methods)
    d['train_patterns'] = list(self.train_patterns)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> 'PeftConfig':
    d = dict(d)
    d['methods'] = tuple(d.get('methods', ()))
    d['train_patterns'] = tuple(d.get('train_patterns', ()))
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})
