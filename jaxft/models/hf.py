"""Hugging Face checkpoint import/export for BERT and GPT-2.

One explicit name-by-name table per model type maps HF tensor names to jaxft parameter
paths, so that every tensor is accounted for: loaded, reported `unused` (e.g. the NSP
head of BertForPreTraining), `ignored` (buffers, tied copies) or, on our side, `missing`
(e.g. a fresh classifier head). Shapes are checked before anything is converted.

Reading never executes code from the checkpoint directory: config.json is parsed as
JSON, weights come from safetensors or from `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import files
from jaxft.data.tokenizer import refuse_remote_code, save_tokenizer
from jaxft.models import HEADS, abstract_model, build_model
from jaxft.models.config import ModelConfig
from jaxft.trees import dotted

SUPPORTED_MODEL_TYPES = ('bert', 'gpt2')

# HF architecture name -> (model_type, jaxft head), both ways.
ARCHITECTURES = {
    'BertModel': ('bert', 'none'),
    'BertForMaskedLM': ('bert', 'mlm'),
    'BertForPreTraining': ('bert', 'mlm'),
    'BertForSequenceClassification': ('bert', 'cls'),
    'BertForTokenClassification': ('bert', 'token_cls'),
    'BertForQuestionAnswering': ('bert', 'qa'),
    'GPT2Model': ('gpt2', 'none'),
    'GPT2LMHeadModel': ('gpt2', 'clm'),
    'GPT2ForSequenceClassification': ('gpt2', 'cls'),
}
EXPORT_ARCHITECTURES = {
    ('bert', 'none'): 'BertModel', ('bert', 'mlm'): 'BertForMaskedLM',
    ('bert', 'cls'): 'BertForSequenceClassification',
    ('bert', 'token_cls'): 'BertForTokenClassification',
    ('bert', 'qa'): 'BertForQuestionAnswering',
    ('gpt2', 'none'): 'GPT2Model', ('gpt2', 'clm'): 'GPT2LMHeadModel',
    ('gpt2', 'cls'): 'GPT2ForSequenceClassification',
}

# Base-model prefixes that HF adds in task models; stripped so every variant maps alike.
_PREFIXES = {'bert': 'bert.', 'gpt2': 'transformer.'}
# Buffers some checkpoints carry (not parameters): skipped, listed as ignored.
_BUFFERS = re.compile(r'^(embeddings\.position_ids|embeddings\.token_type_ids|'
                      r'h\.\d+\.attn\.(masked_)?bias)$')
# Output projections tied to the input embeddings: a copy is dropped when it is equal.
_TIED = {'bert': {'cls.predictions.decoder.weight': 'embeddings.word_embeddings.weight'},
         'gpt2': {'lm_head.weight': 'wte.weight'}}
# A second name for the same tensor (used only when the canonical one is absent).
_ALIASES = {'bert': {'cls.predictions.decoder.bias': 'cls.predictions.bias'}, 'gpt2': {}}

# Conversion kinds. HF layout -> ours:
#   EMB  identical;  VEC  flat [n] -> our shape;  LIN  torch Linear [out, in] -> [in.., out..];
#   CONV GPT-2 Conv1D [in, out] -> [in.., out..];  QKV_W / QKV_B  fused c_attn split in 3.
EMB, VEC, LIN, CONV, QKV_W, QKV_B = 'emb', 'vec', 'linear', 'conv1d', 'qkv_w', 'qkv_b'


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str                 # HF name without the base-model prefix
  ours: tuple[str, ...]   # jaxft flat param names (one, or three for a fused q/k/v)
  kind: str
  n_in: int = 1           # leading contracted dims of our kernel (2 for attention out)
  root: bool = False      # a task head: never under the HF base-model prefix


def _ln(hf: str, ours: str, root=False) -> list[Entry]:
  return [Entry(hf + '.weight', (ours + '.scale',), VEC, root=root),
          Entry(hf + '.bias', (ours + '.bias',), VEC, root=root)]


def _dense(hf: str, ours: str, kind=LIN, n_in=1, bias=True, root=False) -> list[Entry]:
  out = [Entry(hf + '.weight', (ours + '.kernel',), kind, n_in, root)]
  return out + ([Entry(hf + '.bias', (ours + '.bias',), VEC, root=root)] if bias else [])


def bert_table(num_layers: int, prefix: str) -> list[Entry]:
  """BERT: HF names (prefix `bert.` stripped) -> jaxft names (`prefix` = our encoder path)."""
  p = prefix
  t = [Entry('embeddings.word_embeddings.weight', (p + 'embeddings.word.embedding',), EMB),
       Entry('embeddings.position_embeddings.weight', (p + 'embeddings.position.embedding',), EMB),
       Entry('embeddings.token_type_embeddings.weight', (p + 'embeddings.token_type.embedding',),
             EMB)]
  t += _ln('embeddings.LayerNorm', p + 'embeddings.ln')
  for i in range(num_layers):
    h, o = f'encoder.layer.{i}.', f'{p}layers.{i}.'
    for n in ('query', 'key', 'value'):
      t += _dense(h + f'attention.self.{n}', o + f'attn.{n}')
    t += _dense(h + 'attention.output.dense', o + 'attn.out', n_in=2)
    t += _ln(h + 'attention.output.LayerNorm', o + 'attn_ln')
    t += _dense(h + 'intermediate.dense', o + 'mlp_in')
    t += _dense(h + 'output.dense', o + 'mlp_out')
    t += _ln(h + 'output.LayerNorm', o + 'mlp_ln')
  t += _dense('pooler.dense', p + 'pooler')
  # Heads live at the root on both sides.
  t += _dense('cls.predictions.transform.dense', 'mlm_dense', root=True)
  t += _ln('cls.predictions.transform.LayerNorm', 'mlm_ln', root=True)
  t += [Entry('cls.predictions.bias', ('mlm_bias',), VEC, root=True)]
  t += _dense('classifier', 'classifier', root=True)
  t += _dense('qa_outputs', 'qa_outputs', root=True)  # start / end scores, [2, hidden] in HF
  return t


def gpt2_table(num_layers: int, prefix: str) -> list[Entry]:
  """GPT-2: HF names (prefix `transformer.` stripped) -> jaxft names."""
  p = prefix
  t = [Entry('wte.weight', (p + 'wte.embedding',), EMB),
       Entry('wpe.weight', (p + 'wpe.embedding',), EMB)]
  for i in range(num_layers):
    h, o = f'h.{i}.', f'{p}layers.{i}.'
    qkv = tuple(o + f'attn.{n}' for n in ('query', 'key', 'value'))
    t += _ln(h + 'ln_1', o + 'ln_1')
    t += [Entry(h + 'attn.c_attn.weight', tuple(q + '.kernel' for q in qkv), QKV_W),
          Entry(h + 'attn.c_attn.bias', tuple(q + '.bias' for q in qkv), QKV_B)]
    t += _dense(h + 'attn.c_proj', o + 'attn.out', CONV, n_in=2)
    t += _ln(h + 'ln_2', o + 'ln_2')
    t += _dense(h + 'mlp.c_fc', o + 'mlp_in', CONV)
    t += _dense(h + 'mlp.c_proj', o + 'mlp_out', CONV)
  t += _ln('ln_f', p + 'ln_f')
  t += _dense('score', 'score', bias=False, root=True)
  return t


TABLES = {'bert': bert_table, 'gpt2': gpt2_table}


# ----------------------------------------------------------------------------- config


def read_hf_config(path: str) -> dict:
  """config.json as a dict (parsed as JSON only; nothing from the directory is run).

  A config with an `auto_map` is refused: its model is code shipped in the directory, which
  jaxft never runs, and its own BERT / GPT-2 would silently be another model."""
  fn = os.path.join(path, 'config.json')
  if not os.path.isfile(fn):
    raise FileNotFoundError(f'{fn}: no config.json; is {path!r} a Hugging Face model directory?')
  refuse_remote_code(fn, 'model')
  with open(fn) as f:
    return json.load(f)


def _check_type(hf: dict, where: str) -> str:
  mt = hf.get('model_type')
  if mt not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f'{where}: model_type {mt!r} is not supported; supported model types: '
                     f'{", ".join(SUPPORTED_MODEL_TYPES)}')
  return mt


# config.json keys checked before anything is built from them (a stage allocates what they
# say): sizes are integers in range, probabilities and epsilons numbers in range.
_SIZES = {'bert': {'vocab_size': 1, 'hidden_size': 1, 'num_hidden_layers': 1,
                   'num_attention_heads': 1, 'intermediate_size': 1,
                   'max_position_embeddings': 1, 'type_vocab_size': 0},
          'gpt2': {'vocab_size': 1, 'n_embd': 1, 'n_layer': 1, 'n_head': 1, 'n_inner': 1,
                   'n_positions': 1}}
_MAX_SIZE = 2**31 - 1  # token ids and positions are int32
_EPS = {'bert': ('layer_norm_eps',), 'gpt2': ('layer_norm_epsilon',)}
_PROBS = {'bert': ('hidden_dropout_prob', 'attention_probs_dropout_prob', 'classifier_dropout'),
          'gpt2': ('resid_pdrop', 'attn_pdrop', 'embd_pdrop', 'summary_first_dropout')}
_MAX_PARAMS = 10**11  # BERT / GPT-2 models are < 2e9; more is a wrong file, not a model


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def check_hf_config(hf: Mapping, where: str, mt: str) -> None:
  """ValueError naming `where` and the key for a size that is not a positive integer in
  range, a probability outside [0, 1), an epsilon outside (0, 1), heads that do not divide
  the hidden size, a pad id outside the vocabulary, or sizes whose model would be absurd."""
  for key, lo in _SIZES[mt].items():
    v = hf.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or
                          not lo <= v <= _MAX_SIZE):
      raise ValueError(f'{where}: {key}={v!r} is not a valid size (an integer in '
                       f'{lo}..{_MAX_SIZE})')
  for key in _EPS[mt]:
    v = hf.get(key)
    if v is not None and not (_is_number(v) and 0 < v < 1):
      raise ValueError(f'{where}: {key}={v!r} is not a number in (0, 1)')
  for key in _PROBS[mt]:
    v = hf.get(key)
    if v is not None and not (_is_number(v) and 0 <= v < 1):
      raise ValueError(f'{where}: {key}={v!r} is not a number in [0, 1) (a probability)')
  hidden_key, heads_key, layers_key, inter_key, pos_key = (
      ('hidden_size', 'num_attention_heads', 'num_hidden_layers', 'intermediate_size',
       'max_position_embeddings') if mt == 'bert' else
      ('n_embd', 'n_head', 'n_layer', 'n_inner', 'n_positions'))
  h, heads, vocab = hf[hidden_key], hf[heads_key], hf['vocab_size']
  if h % heads:
    raise ValueError(f'{where}: {heads_key}={heads!r}: {hidden_key}={h} is not divisible by it')
  pad = hf.get('pad_token_id')
  if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or
                          not 0 <= pad < vocab):
    raise ValueError(f'{where}: pad_token_id={pad!r} is outside the vocabulary '
                     f'(vocab_size={vocab})')
  inter = hf.get(inter_key) or 4 * h
  positions = hf.get(pos_key) or 0
  n = (vocab + positions + (hf.get('type_vocab_size') or 0)) * h + hf[layers_key] * (
      4 * h * h + 2 * h * inter)
  if n > _MAX_PARAMS:
    sizes = ', '.join(f'{k}={hf.get(k)!r}' for k in ('vocab_size', hidden_key, layers_key,
                                                     inter_key, pos_key))
    raise ValueError(f'{where}: {sizes} describe a model of {n:.2g} parameters (more than '
                     f'{_MAX_PARAMS:.0e}); is this the right config.json?')


def load_hf_config(path: str, **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json (`bert` or `gpt2`); `overrides` win (e.g. dtype)."""
  hf = read_hf_config(path)
  where = os.path.join(path, 'config.json')
  mt = _check_type(hf, where)
  required = {'bert': ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads'),
              'gpt2': ('vocab_size', 'n_embd', 'n_layer', 'n_head')}[mt]
  absent = [k for k in required if hf.get(k) is None]
  if absent:
    raise ValueError(f'{where}: missing key(s) {absent} for model_type {mt!r}')
  check_hf_config(hf, where, mt)
  if mt == 'bert':
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'{where}: position_embedding_type='
                       f'{hf["position_embedding_type"]!r}; jaxft BERT has absolute positions only')
    if hf.get('is_decoder') or hf.get('add_cross_attention'):
      raise ValueError(f'{where}: is_decoder/add_cross_attention BERT is not supported')
    hidden_drop = hf.get('hidden_dropout_prob', 0.1)
    kw = dict(
        model_type='bert', vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
        intermediate_size=hf.get('intermediate_size') or 4 * hf['hidden_size'],
        max_position_embeddings=hf.get('max_position_embeddings', 512),
        type_vocab_size=hf.get('type_vocab_size', 2),
        layer_norm_eps=hf.get('layer_norm_eps', 1e-12), hidden_act=hf.get('hidden_act', 'gelu'),
        hidden_dropout=hidden_drop,
        attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
        classifier_dropout=(hidden_drop if hf.get('classifier_dropout') is None
                            else hf['classifier_dropout']),
        initializer_range=hf.get('initializer_range', 0.02),
        pad_token_id=0 if hf.get('pad_token_id') is None else hf['pad_token_id'])
  else:
    if not hf.get('scale_attn_weights', True) or hf.get('scale_attn_by_inverse_layer_idx'):
      raise ValueError(f'{where}: scale_attn_weights=False / scale_attn_by_inverse_layer_idx '
                       f'are not supported by jaxft GPT-2')
    if hf.get('add_cross_attention'):
      raise ValueError(f'{where}: add_cross_attention GPT-2 is not supported')
    n_embd = hf['n_embd']
    pad = hf.get('pad_token_id')
    if pad is None:
      pad = hf.get('eos_token_id')
      pad = 50256 if not isinstance(pad, int) else pad
    kw = dict(
        model_type='gpt2', vocab_size=hf['vocab_size'], hidden_size=n_embd,
        num_layers=hf['n_layer'], num_heads=hf['n_head'],
        intermediate_size=hf.get('n_inner') or 4 * n_embd,
        max_position_embeddings=hf.get('n_positions', hf.get('max_position_embeddings', 1024)),
        type_vocab_size=0, layer_norm_eps=hf.get('layer_norm_epsilon', 1e-5),
        hidden_act=hf.get('activation_function', 'gelu_new'),
        hidden_dropout=hf.get('resid_pdrop', 0.1), attention_dropout=hf.get('attn_pdrop', 0.1),
        classifier_dropout=hf.get('summary_first_dropout', 0.1),
        initializer_range=hf.get('initializer_range', 0.02), pad_token_id=pad)
  kw.update(overrides)
  return ModelConfig(**kw)


def load_hf_labels(path: str) -> dict[int, str] | None:
  """id2label from config.json (int keys), or None when the config names no labels."""
  hf = read_hf_config(path)
  if hf.get('id2label'):
    return {int(k): v for k, v in sorted(hf['id2label'].items(), key=lambda kv: int(kv[0]))}
  if hf.get('num_labels'):
    return {i: f'LABEL_{i}' for i in range(int(hf['num_labels']))}
  return None


# ----------------------------------------------------------------------------- weights

_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64,
              'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _load_safetensors(fn: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(fn)
  except TypeError:  # bf16 / fp8: numpy has no such dtype; parse the (trivial) format here
    return _load_safetensors_ml_dtypes(fn)


def _load_safetensors_ml_dtypes(fn: str) -> dict[str, np.ndarray]:
  """safetensors with bf16/fp8 tensors, via ml_dtypes (numpy cannot name those dtypes)."""
  import ml_dtypes
  dtypes = dict(_ST_DTYPES, BF16=ml_dtypes.bfloat16, F8_E4M3=ml_dtypes.float8_e4m3fn,
                F8_E5M2=ml_dtypes.float8_e5m2)
  raw = np.memmap(fn, dtype=np.uint8, mode='r')
  n = int(np.frombuffer(raw[:8].tobytes(), '<u8')[0])
  header = json.loads(raw[8:8 + n].tobytes())
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in dtypes:
      raise ValueError(f'{fn}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    b, e = info['data_offsets']
    buf = raw[8 + n + b:8 + n + e].tobytes()
    out[name] = np.frombuffer(buf, dtypes[info['dtype']]).reshape(info['shape'])
  return out


def _load_torch_bin(fn: str) -> dict[str, np.ndarray]:
  """A pytorch_model.bin with `weights_only=True`: pickled code is refused, never run."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{fn}: reading a PyTorch .bin checkpoint needs torch; or convert it to '
                      f'safetensors') from e
  try:
    sd = torch.load(fn, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001  (UnpicklingError and friends from the safe loader)
    raise ValueError(f'{fn}: refused to load: not a plain tensor checkpoint under '
                     f'torch.load(weights_only=True) ({type(e).__name__}: {e})') from e
  if not isinstance(sd, Mapping):
    raise ValueError(f'{fn}: expected a state dict (name -> tensor), got {type(sd).__name__}')
  out = {}
  for k, t in sd.items():
    if not isinstance(t, torch.Tensor):
      raise ValueError(f'{fn}: entry {k!r} is a {type(t).__name__}, not a tensor')
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16,) or t.dtype.is_floating_point and t.element_size() == 1:
      t = t.float()
    out[k] = t.contiguous().numpy()
  return out


def _shards(path: str, index_name: str) -> list[str]:
  with open(os.path.join(path, index_name)) as f:
    files = sorted(set(json.load(f)['weight_map'].values()))
  for f in files:  # shard names are plain files next to the index
    if os.path.basename(f) != f or f.startswith('.'):
      raise ValueError(f'{os.path.join(path, index_name)}: bad shard file name {f!r}')
  return [os.path.join(path, f) for f in files]


def read_raw_hf_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of an HF checkpoint directory under their original names."""
  candidates = [('model.safetensors', _load_safetensors),
                ('model.safetensors.index.json', _load_safetensors),
                ('pytorch_model.bin', _load_torch_bin),
                ('pytorch_model.bin.index.json', _load_torch_bin)]
  for name, loader in candidates:
    fn = os.path.join(path, name)
    if not os.path.isfile(fn):
      continue
    files = _shards(path, name) if name.endswith('.index.json') else [fn]
    out: dict[str, np.ndarray] = {}
    for f in files:
      part = loader(f)
      dup = set(part) & set(out)
      if dup:
        raise ValueError(f'{f}: tensor(s) {sorted(dup)[:3]} appear in more than one shard')
      out.update(part)
    return out
  raise FileNotFoundError(f'{path}: no {" / ".join(n for n, _ in candidates)} '
                          f'(TF / Flax checkpoints are not read: convert them with transformers)')


def _weights_file(path: str, name: str) -> str:
  """The file of `path` that holds tensor `name` (the one read_raw_hf_weights read)."""
  if not os.path.isdir(path):
    return path
  for fn in ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
             'pytorch_model.bin.index.json'):
    full = os.path.join(path, fn)
    if os.path.isfile(full):
      if not fn.endswith('.index.json'):
        return full
      with open(full) as f:
        return os.path.join(path, json.load(f)['weight_map'].get(name, fn))
  return path


def _normalize(raw: Mapping[str, np.ndarray], model_type: str | None) -> dict[str, tuple]:
  """{name without base prefix: (original name, array)}; old TF names gamma/beta renamed."""
  prefixes = [_PREFIXES[model_type]] if model_type else list(_PREFIXES.values())
  out: dict[str, tuple] = {}
  for orig, arr in raw.items():
    name = orig
    for p in prefixes:
      if name.startswith(p):
        name = name[len(p):]
        break
    name = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', name)
    name = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name)
    if name in out:
      raise ValueError(f'checkpoint has both {out[name][0]!r} and {orig!r} for {name!r}')
    out[name] = (orig, arr)
  return out


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
  """Tensors of an HF checkpoint with the base-model prefix (`bert.`, `transformer.`) stripped."""
  mt = None
  if os.path.isfile(os.path.join(path, 'config.json')):
    mt = read_hf_config(path).get('model_type')
    mt = mt if mt in SUPPORTED_MODEL_TYPES else None
  return {k: a for k, (_, a) in _normalize(read_raw_hf_weights(path), mt).items()}


# ----------------------------------------------------------------------------- tree helpers


def _pure(model_or_params):
  if isinstance(model_or_params, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
  if isinstance(model_or_params, nnx.State):
    return nnx.to_pure_dict(model_or_params)
  return model_or_params


def _flatten(tree) -> tuple[dict[str, Any], list[str], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [dotted(path) for path, _ in leaves]
  return dict(zip(names, (x for _, x in leaves))), names, treedef


def _describe(flat: Mapping[str, Any]) -> tuple[str, str, int, str]:
  """(model_type, our encoder prefix, num_layers, head) read off a flat param dict."""
  for mt, marker, base in (('bert', 'embeddings.word.embedding', 'bert.'),
                           ('gpt2', 'wte.embedding', 'transformer.')):
    hits = [n for n in flat if n.endswith(marker)]
    if not hits:
      continue
    prefix = hits[0][:-len(marker)]
    if prefix not in ('', base):
      raise ValueError(f'unexpected param path {hits[0]!r}; expected {base + marker!r} or '
                       f'{marker!r}')
    layer_re = re.compile(re.escape(prefix) + r'layers\.(\d+)\.')
    layers = {int(m.group(1)) for m in map(layer_re.match, flat) if m}
    num_layers = max(layers) + 1 if layers else 0
    if mt == 'bert':
      if 'mlm_bias' in flat:
        head = 'mlm'
      elif 'classifier.kernel' in flat:
        head = 'cls' if prefix + 'pooler.kernel' in flat else 'token_cls'
      elif 'qa_outputs.kernel' in flat:
        head = 'qa'
      else:
        head = 'none'
    else:
      head = 'cls' if 'score.kernel' in flat else ('clm' if prefix else 'none')
    return mt, prefix, num_layers, head
  raise ValueError('params are neither a jaxft BERT nor GPT-2 tree (no word/wte embedding found)')


def _hf_shape(kind: str, shapes: list[tuple], n_in: int) -> tuple:
  s = shapes[0]
  if kind == EMB:
    return tuple(s)
  if kind == VEC:
    return (int(np.prod(s)),)
  fan_in, fan_out = int(np.prod(s[:n_in])), int(np.prod(s[n_in:]))
  if kind == LIN:
    return (fan_out, fan_in)
  if kind == CONV:
    return (fan_in, fan_out)
  if kind == QKV_W:
    return (fan_in, sum(int(np.prod(x[1:])) for x in shapes))
  if kind == QKV_B:
    return (sum(int(np.prod(x)) for x in shapes),)
  raise AssertionError(kind)


def _to_ours(a: np.ndarray, kind: str, shapes: list[tuple]) -> list[np.ndarray]:
  if kind == LIN:
    return [a.T.reshape(shapes[0])]
  if kind in (EMB, VEC, CONV):
    return [a.reshape(shapes[0])]
  parts = np.split(a, 3, axis=-1)  # QKV_W / QKV_B: [.., q | k | v]
  return [p.reshape(s) for p, s in zip(parts, shapes)]


def _to_hf(arrs: list[np.ndarray], kind: str, n_in: int) -> np.ndarray:
  a = arrs[0]
  if kind == EMB:
    return a
  if kind == VEC:
    return a.reshape(-1)
  fan_in = int(np.prod(a.shape[:n_in]))
  if kind == LIN:
    return a.reshape(fan_in, -1).T
  if kind == CONV:
    return a.reshape(fan_in, -1)
  if kind == QKV_W:
    return np.concatenate([x.reshape(x.shape[0], -1) for x in arrs], axis=1)
  return np.concatenate([x.reshape(-1) for x in arrs])  # QKV_B


# ----------------------------------------------------------------------------- import


@dataclasses.dataclass
class LoadReport:
  """What happened to every tensor; `missing` params keep their current (init) values."""
  loaded: list[str]            # jaxft params set from the checkpoint
  missing: list[str]           # jaxft params with no tensor in the checkpoint
  unused: list[str]            # HF tensors (original names) that went nowhere
  ignored: list[str]           # HF buffers and tied copies equal to their source
  id2label: dict[int, str] | None = None

  def __getitem__(self, key):
    return getattr(self, key)

  def summary(self) -> str:
    return (f'loaded {len(self.loaded)} params; missing {self.missing or "none"}; '
            f'unused HF tensors {self.unused or "none"}')


def _place(arr: np.ndarray, like):
  """As a jax array with `like`'s dtype (and sharding, when it has one)."""
  arr = np.ascontiguousarray(arr.astype(like.dtype))
  sharding = getattr(like, 'sharding', None)
  return jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)


def load_hf_into(model_or_params, path_or_weights, *, model_type: str | None = None):
  """HF weights mapped onto a jaxft param tree -> (pure param dict, LoadReport).

  `model_or_params`: a module (abstract from `nnx.eval_shape` is fine), an nnx.State or a pure
  dict. `path_or_weights`: a checkpoint directory or a {HF name: array} mapping. Leaves with
  no checkpoint tensor are returned unchanged and listed in `report.missing`.
  """
  tree = _pure(model_or_params)
  mt = _describe(_flatten(tree)[0])[0]
  if model_type and model_type != mt:
    raise ValueError(f'model_type={model_type!r} but the params are a jaxft {mt} tree')
  if not isinstance(path_or_weights, (str, os.PathLike)):
    return _load_into(tree, dict(path_or_weights), 'weights')
  path = os.fspath(path_or_weights)
  if os.path.isfile(os.path.join(path, 'config.json')):
    ckpt_type = _check_type(read_hf_config(path), os.path.join(path, 'config.json'))
    if ckpt_type != mt:
      raise ValueError(f'{path}: checkpoint model_type {ckpt_type!r} does not match the '
                       f'jaxft {mt} model it is loaded into')
  return _load_into(tree, read_raw_hf_weights(path), path)


def _load_into(tree, raw: Mapping[str, np.ndarray], where: str):
  """load_hf_into on already-read tensors; `where` names the source in errors."""
  flat, names, treedef = _flatten(tree)
  mt, prefix, num_layers, _ = _describe(flat)
  weights = _normalize(raw, mt)

  ignored = [orig for n, (orig, _) in weights.items() if _BUFFERS.match(n)]
  unused: list[str] = []
  for alias, canon in _ALIASES[mt].items():
    if alias in weights:
      if canon not in weights:
        weights[canon] = weights.pop(alias)
      else:
        (ignored if np.array_equal(weights[alias][1], weights[canon][1]) else unused).append(
            weights[alias][0])
  for tied, src in _TIED[mt].items():
    if tied in weights:
      same = src in weights and np.array_equal(weights[tied][1], weights[src][1])
      # Our output projection is always the embedding: an untied copy cannot be kept.
      (ignored if same else unused).append(weights[tied][0])

  new = dict(flat)
  loaded: list[str] = []
  consumed = set(ignored) | set(unused)
  for e in TABLES[mt](num_layers, prefix):
    if e.hf not in weights or not all(o in flat for o in e.ours):
      continue
    orig, a = weights[e.hf]
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f'{_weights_file(where, orig)}: tensor {orig!r} has dtype '
                       f'{np.dtype(a.dtype).name}, not floating point (converting it to '
                       f'{np.dtype(flat[e.ours[0]].dtype).name} would silently change it)')
    shapes = [tuple(flat[o].shape) for o in e.ours]
    expected = _hf_shape(e.kind, shapes, e.n_in)
    if tuple(a.shape) != expected:
      raise ValueError(f'{where}: HF tensor {orig!r} has shape {tuple(a.shape)} but '
                       f'{", ".join(e.ours)} {"expect" if len(e.ours) > 1 else "expects"} '
                       f'{expected} (HF layout; our shape {", ".join(map(str, shapes))})')
    for o, x in zip(e.ours, _to_ours(np.asarray(a), e.kind, shapes)):
      new[o] = _place(x, flat[o])
      loaded.append(o)
    consumed.add(orig)
  unused += [orig for orig, _ in weights.values() if orig not in consumed]
  done = set(loaded)
  report = LoadReport(loaded=loaded, missing=[n for n in names if n not in done],
                      unused=sorted(unused), ignored=sorted(ignored))
  params = jax.tree_util.tree_unflatten(treedef, [new[n] for n in names])
  return params, report


def _head_from_architectures(path: str) -> str:
  hf = read_hf_config(path)
  for arch in hf.get('architectures') or ():
    if arch in ARCHITECTURES:
      return ARCHITECTURES[arch][1]
  raise ValueError(f'{path}/config.json: cannot tell the head from architectures='
                   f'{hf.get("architectures")}; pass head=')


def from_pretrained(path: str, head: str | None = None, num_labels: int | None = None, *,
                    seed: int = 0, **config_overrides):
  """(model, LoadReport): a jaxft model built from an HF directory's config and weights.

  `head=None` takes it from config.json `architectures`. Classification heads take
  `num_labels` from the argument, else the checkpoint's classifier, else config.json labels.
  Params absent from the checkpoint (a fresh head) are initialised with `seed`.
  """
  cfg = load_hf_config(path, **config_overrides)
  head = head or _head_from_architectures(path)
  if head not in HEADS[cfg.model_type]:
    raise ValueError(f'head {head!r} is not available for {cfg.model_type}; choose one of '
                     f'{sorted(HEADS[cfg.model_type])}')
  id2label = load_hf_labels(path)
  raw = read_raw_hf_weights(path)
  if head in ('cls', 'token_cls') and not num_labels:
    norm = _normalize(raw, cfg.model_type)
    w = norm.get('classifier.weight' if cfg.model_type == 'bert' else 'score.weight')
    if w is not None:
      num_labels = int(w[1].shape[0])
    elif id2label:
      num_labels = len(id2label)
    else:
      raise ValueError(f'{path}: head {head!r} needs num_labels (the checkpoint has no '
                       f'classifier and config.json names no labels)')
  abstract = abstract_model(cfg, head, num_labels=num_labels)
  params, report = _load_into(_pure(abstract), raw, path)
  if report.missing:
    model = build_model(cfg, head, num_labels=num_labels, seed=seed)
    init = _flatten(_pure(model))[0]
    flat, names, treedef = _flatten(params)
    params = jax.tree_util.tree_unflatten(
        treedef, [init[n] if n in report.missing else flat[n] for n in names])
  else:
    model = abstract
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)
  if id2label and head in ('cls', 'token_cls') and len(id2label) == num_labels:
    report.id2label = id2label
  return nnx.merge(graphdef, state), report


# ----------------------------------------------------------------------------- export


def _export_name(e: Entry, base: str) -> str:
  return e.hf if e.root else base + e.hf


@dataclasses.dataclass(frozen=True)
class HfSlot:
  """Where one jaxft tensor lives in the exported HF model."""
  name: str    # full HF tensor name, e.g. 'bert.encoder.layer.0.attention.self.query.weight'
  kind: str    # conversion kind (LIN, CONV, QKV_W, ...)
  n_in: int    # leading contracted dims of our kernel
  part: int    # index among a fused tensor's parts (GPT-2 c_attn: 0 q, 1 k, 2 v), else 0

  @property
  def module(self) -> str:
    return self.name.rsplit('.', 1)[0]


def hf_slots(names, head: str) -> dict[str, HfSlot]:
  """{jaxft dotted name: HfSlot} for the plain-model `names` (an iterable of dotted names or
  a param tree) exported as the HF architecture of `head`: the same table `save_hf` uses,
  so PEFT exports name modules exactly as the exported base model does."""
  flat = (dict.fromkeys(names) if isinstance(names, (list, tuple, set, frozenset))
          else _flatten(_pure(names))[0])
  mt, prefix, num_layers, _ = _describe(flat)
  base = _PREFIXES[mt] if head != 'none' else ''
  out = {}
  for e in TABLES[mt](num_layers, prefix):
    if all(o in flat for o in e.ours):
      for i, o in enumerate(e.ours):
        out[o] = HfSlot(_export_name(e, base), e.kind, e.n_in, i)
  return out


def to_hf_state_dict(model_or_params, head: str) -> dict[str, np.ndarray]:
  """{HF name: contiguous fp32 array} for the HF architecture of `head`, tied copies included."""
  flat, _, _ = _flatten(_pure(model_or_params))
  mt, prefix, num_layers, tree_head = _describe(flat)
  if head != tree_head:
    raise ValueError(f'head {head!r} does not match the params, which are a jaxft {mt} '
                     f'{tree_head!r} model')
  base = _PREFIXES[mt] if head != 'none' else ''
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()
  for e in TABLES[mt](num_layers, prefix):
    if not all(o in flat for o in e.ours):
      continue
    arrs = [np.asarray(jax.device_get(flat[o]), dtype=np.float32) for o in e.ours]
    out[_export_name(e, base)] = np.ascontiguousarray(_to_hf(arrs, e.kind, e.n_in))
    used.update(e.ours)
  left = sorted(set(flat) - used)
  if left:
    raise ValueError(f'params {left[:5]}{"..." if len(left) > 5 else ""} have no Hugging Face '
                     f'equivalent (merge or drop PEFT params before exporting)')
  if mt == 'bert' and head == 'mlm':  # the decoder is tied: write it where HF looks for it
    out['cls.predictions.decoder.weight'] = out[base + 'embeddings.word_embeddings.weight'].copy()
    out['cls.predictions.decoder.bias'] = out['cls.predictions.bias'].copy()
  if mt == 'gpt2' and head == 'clm':
    out['lm_head.weight'] = out[base + 'wte.weight'].copy()
  return out


def hf_config_dict(cfg: ModelConfig, head: str, *, num_labels: int | None = None,
                   id2label: Mapping[int, str] | None = None, tokenizer=None) -> dict:
  """config.json content for `cfg` exported as the HF architecture of `head`."""
  arch = EXPORT_ARCHITECTURES.get((cfg.model_type, head))
  if arch is None:
    raise ValueError(f'no HF architecture for {cfg.model_type} head {head!r}; known: '
                     f'{sorted(EXPORT_ARCHITECTURES)}')
  if cfg.model_type == 'bert':
    d = dict(model_type='bert', vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
             hidden_dropout_prob=cfg.hidden_dropout,
             attention_probs_dropout_prob=cfg.attention_dropout,
             max_position_embeddings=cfg.max_position_embeddings,
             type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range,
             layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
             classifier_dropout=cfg.classifier_dropout, position_embedding_type='absolute')
  else:
    eos = getattr(tokenizer, 'eos_token_id', None)
    bos = getattr(tokenizer, 'bos_token_id', None)
    if eos is None and cfg.vocab_size > 50256:
      eos = 50256
    if bos is None:
      bos = eos
    d = dict(model_type='gpt2', vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
             n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
             n_inner=cfg.intermediate_size, activation_function=cfg.hidden_act,
             resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
             attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.layer_norm_eps,
             initializer_range=cfg.initializer_range, summary_first_dropout=cfg.classifier_dropout,
             pad_token_id=cfg.pad_token_id, bos_token_id=bos, eos_token_id=eos,
             scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
  d.update(architectures=[arch], tie_word_embeddings=True, dtype='float32')
  if head in ('cls', 'token_cls'):
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()} or {
        i: f'LABEL_{i}' for i in range(num_labels)}
    if num_labels is not None and len(id2label) != num_labels:
      raise ValueError(f'id2label has {len(id2label)} labels but the classifier has {num_labels}')
    d['id2label'] = {str(i): id2label[i] for i in sorted(id2label)}
    d['label2id'] = {v: i for i, v in sorted(id2label.items())}
    d['num_labels'] = len(id2label)
  return d


def _check_matches_config(model_or_params, cfg: ModelConfig, head: str, num_labels):
  """Refuse a config.json that would not describe these params (HF would fail later)."""
  want = {k: tuple(v.shape) for k, v in
          _flatten(_pure(abstract_model(cfg, head, num_labels=num_labels)))[0].items()}
  have = {k: tuple(v.shape) for k, v in _flatten(_pure(model_or_params))[0].items()}
  for k in sorted(set(want) | set(have)):
    if want.get(k) != have.get(k):
      raise ValueError(f'params do not match the ModelConfig: {k} has shape {have.get(k)} but '
                       f'cfg ({cfg.model_type}, head {head!r}) gives {want.get(k)}')


def save_hf(model_or_params, cfg: ModelConfig, out_dir: str, head: str, tokenizer=None,
            id2label: Mapping[int, str] | None = None) -> str:
  """Write an HF model directory (config.json, model.safetensors, tokenizer) -> out_dir.

  The result opens with `transformers.AutoModelFor*.from_pretrained(out_dir)`; the
  tokenizer's model_max_length is capped at the model's positions. Written to a hidden
  sibling directory and renamed into place: a crash or a full disk leaves the previous
  export (or none), never a mix; a full or read-only disk raises files.OutputWriteError.
  """
  from safetensors.numpy import save_file
  sd = to_hf_state_dict(model_or_params, head)
  num_labels = None
  if head in ('cls', 'token_cls'):
    name = 'classifier.weight' if cfg.model_type == 'bert' else 'score.weight'
    num_labels = int(sd[name].shape[0])
  _check_matches_config(model_or_params, cfg, head, num_labels)
  conf = hf_config_dict(cfg, head, num_labels=num_labels, id2label=id2label, tokenizer=tokenizer)
  try:
    import transformers
    conf['transformers_version'] = transformers.__version__
  except ImportError:
    pass
  with files.AtomicDir(out_dir, 'the Hugging Face export') as tmp:
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(conf, f, indent=2, sort_keys=True)
      f.write('\n')
    save_file(sd, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    if tokenizer is not None:
      save_tokenizer(tokenizer, tmp, max_length=cfg.max_position_embeddings)
  return out_dir


__all__ = ['load_hf_config', 'load_hf_labels', 'read_hf_config', 'read_hf_weights',
           'read_raw_hf_weights', 'load_hf_into', 'from_pretrained', 'save_hf',
           'to_hf_state_dict', 'hf_config_dict', 'hf_slots', 'HfSlot', 'LoadReport', 'bert_table',
           'gpt2_table', 'SUPPORTED_MODEL_TYPES']
