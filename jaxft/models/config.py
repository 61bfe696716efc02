"""ModelConfig: the architecture and dtypes of a BERT or GPT-2 model."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

MODEL_TYPES = ('bert', 'gpt2')

_DTYPES = {'float32': jnp.float32, 'fp32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'bf16': jnp.bfloat16, 'float16': jnp.float16, 'fp16': jnp.float16}

ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


AUTO_ENV = 'JAXFT_AUTO_DTYPE'  # forces what dtype='auto' means (e.g. float32 in the tests)
_BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')


def to_dtype(name: Any):
  if not isinstance(name, str):
    return name
  if name == 'auto':
    return _DTYPES[auto_dtype()[0]]
  if name not in _DTYPES:
    raise ValueError(f'unknown dtype {name!r}; allowed: {sorted(_DTYPES)} or auto')
  return _DTYPES[name]


def cpu_flags() -> set[str]:
  """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


def bf16_hardware(platform: str, *, compute_capability: str = '',
                  flags: set[str] | None = None) -> tuple[bool, str]:
  """(whether the device computes bf16 matmuls natively, why): TPUs; NVIDIA GPUs from
  Ampere (compute capability 8.0); CPUs with avx512_bf16 or AMX. Elsewhere bf16 is emulated
  and slower than fp32 (PyTorch's own bf16 autocast runs 2-3x slower than its fp32 there)."""
  if platform == 'tpu':
    return True, 'TPU'
  if platform == 'gpu':
    major = int(str(compute_capability or '0').split('.')[0] or 0)
    return major >= 8, f'GPU compute capability {compute_capability or "unknown"}'
  flags = cpu_flags() if flags is None else flags
  found = [f for f in _BF16_CPU_FLAGS if f in flags]
  return bool(found), f'CPU with {found[0]}' if found else f'CPU without {"/".join(_BF16_CPU_FLAGS)}'


@functools.cache
def auto_dtype() -> tuple[str, str]:
  """(dtype name, why) that model.dtype='auto' means on this machine's first device: bf16
  compute where the hardware has bf16 units, fp32 elsewhere; logged once."""
  forced = os.environ.get(AUTO_ENV, '')
  if forced:
    name, why = forced, f'{AUTO_ENV}={forced}'
  else:
    dev = jax.devices()[0]
    native, why = bf16_hardware(dev.platform,
                                compute_capability=getattr(dev, 'compute_capability', ''))
    name = 'bfloat16' if native else 'float32'
  logging.info('model.dtype=auto -> %s (%s)', name, why)
  return name, why


# How a model runs, not what its checkpoint holds: a stage takes these from its own config
# when the architecture comes from init_from, and they may change between restarts of a run.
RUNTIME_FIELDS = ('hidden_dropout', 'attention_dropout', 'classifier_dropout', 'dtype',
                  'param_dtype', 'remat')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str = 'bert'        # bert | gpt2 (the config key is model.type)
  vocab_size: int = 30522         # in a config, 0 = the tokenizer's size
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072   # the MLP's inner width
  max_position_embeddings: int = 512  # the longest input (data.max_len <= this)
  type_vocab_size: int = 2        # BERT segment types; 0 for GPT-2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'        # gelu | gelu_new | relu | ...
  hidden_dropout: float = 0.1     # on embeddings and every residual branch
  attention_dropout: float = 0.1  # on the attention probabilities
  classifier_dropout: float = 0.1  # before a task head
  initializer_range: float = 0.02  # std of the normal initializer
  pad_token_id: int = 0
  dtype: Any = jnp.float32        # compute dtype of matmul inputs; auto = bf16 where native
  param_dtype: Any = jnp.float32  # storage dtype of parameters (master weights)
  remat: bool = False             # rematerialise each layer in the backward pass

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f'model.type={self.model_type!r} is not supported; known: {MODEL_TYPES}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'model.hidden_act={self.hidden_act!r}; known: {sorted(ACTIVATIONS)}')
    object.__setattr__(self, 'dtype', to_dtype(self.dtype))
    object.__setattr__(self, 'param_dtype', to_dtype(self.param_dtype))
    if self.hidden_size % self.num_heads:
      raise ValueError(f'model.hidden_size={self.hidden_size} is not divisible by '
                       f'model.num_heads={self.num_heads}')

  @property
  def act(self):
    return ACTIVATIONS[self.hidden_act]

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def with_runtime_of(self, other: 'ModelConfig') -> 'ModelConfig':
    """This architecture, run as `other` says (dropout, dtypes, remat)."""
    return self.replace(**{k: getattr(other, k) for k in RUNTIME_FIELDS})

  @classmethod
  def from_config_dict(cls, d) -> 'ModelConfig':
    """From the `model` section of a ConfigDict (key `type` -> model_type)."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    if 'type' in d:
      d['model_type'] = d.pop('type')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'unknown model config key(s) {unknown}; allowed: {sorted(fields)}')
    return cls(**d)

  @classmethod
  def from_section(cls, values: dict) -> 'ModelConfig':
    """From the `model` section's keys (jaxft.config.section checked them): the rest at the
    section's defaults."""
    return cls.from_config_dict({**cls.section_defaults(), **values})

  @classmethod
  def section_defaults(cls) -> dict:
    """The `model` config section at its defaults; vocab_size 0 = the tokenizer's size, and
    dtype 'auto' = bf16 compute where the hardware has bf16 units, fp32 elsewhere."""
    d = cls().to_dict()
    return {'type': d.pop('model_type'), **d, 'vocab_size': 0, 'dtype': 'auto'}

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['dtype'] = jnp.dtype(self.dtype).name
    d['param_dtype'] = jnp.dtype(self.param_dtype).name
    return d


def gpt2_defaults(**kw) -> ModelConfig:
  base = dict(model_type='gpt2', vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
              intermediate_size=3072, max_position_embeddings=1024, type_vocab_size=0,
              layer_norm_eps=1e-5, hidden_act='gelu_new', pad_token_id=50256)
  base.update(kw)
  return ModelConfig(**base)
