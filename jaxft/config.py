"""Config helpers: the shared ConfigDict shape every stage reads, and its validation.

Validation runs before anything is compiled, and every message names the key and what
is allowed, suggesting the closest key for a misspelling.
"""
from __future__ import annotations

import difflib
import json
import os

import ml_collections

from jaxft.models.config import ModelConfig


class ConfigError(ValueError):
  """A config that cannot run: names the key and what is allowed (raised before any compile)."""


STAGES = ('pipeline', 'model_info', 'pretrain_mlm', 'pretrain_clm', 'finetune_cls', 'finetune_ner', 'predict',
          'distill', 'finetune_lm', 'generate')


def base_config() -> ml_collections.ConfigDict:
  """Every key shared by all stages, at its default."""
  c = ml_collections.ConfigDict()
  c.stage = 'pretrain_mlm'
  c.seed = 0
  c.init_from = ''  # a jaxft workdir or a Hugging Face checkpoint directory
  c.overwrite = False  # reuse a workdir that holds a different run (its files are moved aside)

  c.model = ml_collections.ConfigDict(dict(
      type='bert', vocab_size=0,  # 0: take the tokenizer's size
      hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
      max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
      hidden_act='gelu', hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1,
      initializer_range=0.02, pad_token_id=0, dtype='float32', param_dtype='float32',
      remat=False))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.mesh.rules = ()  # ((logical_name, mesh_axis or None), ...) overriding the defaults

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, schedule='linear', warmup_steps=0, warmup_ratio=0.0, end_lr_ratio=0.0,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, num_epochs=0, batch_size=32, grad_accum=1, eval_every=200, log_every=50,
      nonfinite='skip'))
  c.train.early_stopping = ml_collections.ConfigDict(dict(metric='', mode='max', patience=0))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=500, keep=2, keep_best=1, async_save=True, allow_fresh_start=False))

  c.export = ml_collections.ConfigDict(dict(hf=True))
  c.peft = peft_config()
  return c


def peft_config() -> ml_collections.ConfigDict:
  """Parameter-efficient fine-tuning (docs/peft.md). method: none | lora | adapter | bitfit |
  prompt, or several joined by '+'. Targets are presets or regexes over Dense paths."""
  return ml_collections.ConfigDict(dict(
      method='none',
      lora=dict(rank=8, alpha=16.0, dropout=0.0, targets='qv'),  # qv | qkv | qkvo | all | regex
      adapter=dict(size=64, act='gelu', targets='houlsby', train_layernorm=True),
      prompt=dict(length=20, init='vocab'),  # init: vocab (sampled word embeddings) | random
      train_head=True,    # also train the task head (classifier / score)
      train_fresh=True,   # also train tensors init_from did not provide (e.g. a new pooler)
      train_patterns=(),  # regexes of further base tensors to train
  ))


def mlm_config() -> ml_collections.ConfigDict:
  """Dynamic masking rates; `max_predictions` > 0 projects only that many positions per row
  through the vocabulary (fixed shapes), 0 projects every position."""
  return ml_collections.ConfigDict(dict(mask_prob=0.15, mask_token_frac=0.8,
                                        random_token_frac=0.1, max_predictions=20))


def finetune_config() -> ml_collections.ConfigDict:
  """Fine-tuning options: freezing, layer-wise LR decay, label smoothing (class imbalance is
  handled by data.class_balance)."""
  return ml_collections.ConfigDict(dict(
      freeze_embeddings=False, freeze_layers=0, freeze_patterns=(), layerwise_lr_decay=1.0,
      label_smoothing=0.0))


def generate_config(**extra) -> ml_collections.ConfigDict:
  """Decoding settings (jaxft.models.decoding.DecodeSettings) of finetune_lm's validation and
  of the generate stage. early_stopping is a string ('false' | 'true' | 'never') so that a
  --config override can set any of the three."""
  return ml_collections.ConfigDict(dict(
      method='greedy', max_new_tokens=64, num_beams=4, length_penalty=1.0,
      early_stopping='false', temperature=1.0, top_k=0, top_p=1.0, **extra))


def model_config(cfg, vocab_size: int | None = None) -> ModelConfig:
  """ModelConfig from `cfg.model`; vocab_size 0 means "the tokenizer's size"."""
  d = cfg.model.to_dict()
  if not d.get('vocab_size'):
    if not vocab_size:
      raise ValueError('model.vocab_size=0 needs a tokenizer to size the vocabulary')
    d['vocab_size'] = int(vocab_size)
  return ModelConfig.from_config_dict(d)


def closest(key: str, options) -> str:
  m = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
  return f' (did you mean {m[0]!r}?)' if m else ''


# Sections of base_config() whose keys are all known: anything else there is a typo.
_CHECKED_SECTIONS = ('model', 'mesh', 'optimizer', 'train', 'checkpoint', 'export')


def _type_name(v) -> str:
  return {bool: 'a bool', int: 'an int', float: 'a number', str: 'a string',
          tuple: 'a tuple'}.get(type(v), type(v).__name__)


def check_keys_and_types(cfg, ref=None, prefix: str = '') -> None:
  """Unknown keys (with the closest known one) and wrong value types in the shared sections,
  against base_config(): a config file can add keys that --config overrides never could."""
  if ref is None:
    base = base_config()
    for name in _CHECKED_SECTIONS:
      if name in cfg and isinstance(cfg[name], ml_collections.ConfigDict):
        check_keys_and_types(cfg[name], base[name], f'{prefix}{name}.')
    for key in ('seed', 'init_from', 'overwrite'):
      if key in cfg:
        _check_type(cfg[key], base[key], f'{prefix}{key}')
    return
  for key in cfg.keys():
    if key not in ref:
      raise ConfigError(f'unknown config key {prefix}{key}{closest(key, ref.keys())}; keys of '
                        f'{prefix[:-1]}: {sorted(ref.keys())}')
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f'{prefix}{key} must be a section with keys {sorted(ref[key].keys())}, '
                          f'got {cfg[key]!r}')
      check_keys_and_types(cfg[key], ref[key], f'{prefix}{key}.')
    else:
      _check_type(cfg[key], ref[key], f'{prefix}{key}')


def _check_type(value, default, key: str) -> None:
  if default is None or value is None:  # None: unset, the reader's default applies
    return
  ok = {bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: isinstance(v, (tuple, list))}.get(type(default))
  if ok is not None and not ok(value):
    raise ConfigError(f'{key}={value!r} has the wrong type: it must be {_type_name(default)} '
                      f'(like the default {default!r})')


def validate(cfg) -> None:
  """Checks that need no devices and no data: stage, model shapes, schedule, policies."""
  try:
    _validate(cfg)
  except ConfigError:
    raise
  except (ValueError, TypeError, ArithmeticError) as e:  # from ModelConfig and friends: same one-line report
    raise ConfigError(str(e)) from e


def _validate(cfg) -> None:
  if 'stage' not in cfg:
    raise ConfigError(f'the config has no `stage`; stages: {STAGES}')
  if cfg.stage not in STAGES:
    raise ConfigError(f'stage={cfg.stage!r} does not exist{closest(cfg.stage, STAGES)}; '
                      f'stages: {STAGES}')
  if cfg.stage == 'pipeline':
    for name in cfg.pipeline:
      if name not in cfg:
        raise ConfigError(f'pipeline step {name!r} has no config section config.{name}'
                          f'{closest(name, cfg.keys())}')
      try:
        validate(cfg[name])
      except ConfigError as e:
        raise ConfigError(f'config.{name}: {e}') from e
    return
  check_keys_and_types(cfg)
  m = cfg.model
  if m.hidden_size % m.num_heads:
    raise ConfigError(f'model.hidden_size={m.hidden_size} is not divisible by '
                      f'model.num_heads={m.num_heads}')
  max_len = cfg.get('data', {}).get('max_len', None) if 'data' in cfg else None
  # with init_from the model shape comes from that checkpoint; the stage checks it there
  if max_len and not cfg.get('init_from', '') and max_len > m.max_position_embeddings:
    raise ConfigError(f'data.max_len={max_len} exceeds model.max_position_embeddings='
                      f'{m.max_position_embeddings}')
  if cfg.train.batch_size <= 0 or cfg.train.num_steps < 0:
    raise ConfigError('train.batch_size must be > 0 and train.num_steps >= 0')
  if cfg.train.grad_accum < 1:
    raise ConfigError(f'train.grad_accum={cfg.train.grad_accum} must be >= 1')
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError(f'train.batch_size={cfg.train.batch_size} is not divisible by '
                      f'train.grad_accum={cfg.train.grad_accum}')
  if cfg.train.nonfinite not in ('skip', 'halt', 'rollback'):
    raise ConfigError(f"train.nonfinite={cfg.train.nonfinite!r}; allowed: 'skip', 'halt', "
                      "'rollback'")
  if cfg.train.early_stopping.mode not in ('max', 'min'):
    raise ConfigError(f"train.early_stopping.mode={cfg.train.early_stopping.mode!r}; allowed: "
                      "'max', 'min'")
  from jaxft.train.optimizer import SCHEDULES
  if cfg.optimizer.schedule not in SCHEDULES:
    raise ConfigError(f'optimizer.schedule={cfg.optimizer.schedule!r}; allowed: {SCHEDULES}')
  for axis in ('data', 'fsdp', 'tensor'):
    v = cfg.mesh.get(axis, 1)
    if not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f'mesh.{axis}={v!r}: a positive int, or -1 for the remaining devices')
  ModelConfig.from_config_dict(dict(m.to_dict(), vocab_size=m.vocab_size or 1))


def check_mesh(cfg, num_devices: int) -> None:
  """Mesh axes against the device count, global batch against the data-parallel size."""
  from jaxft import partitioning
  if cfg.get('stage') == 'pipeline':
    for name in cfg.pipeline:
      try:
        check_mesh(cfg[name], num_devices)
      except ConfigError as e:
        raise ConfigError(f'config.{name}: {e}') from e
    return
  try:
    dims = partitioning.mesh_shape(cfg.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  rules = partitioning.rules_from_config(cfg.mesh.get('rules', None))
  spec = partitioning.logical_to_mesh(('batch',), rules)[0]
  axes = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
  dp = 1
  for a in axes:
    dp *= dims[partitioning.MESH_AXES.index(a)]
  if cfg.train.batch_size % (dp * cfg.train.grad_accum):
    raise ConfigError(f'train.batch_size={cfg.train.batch_size} is not divisible by the '
                      f'data-parallel size {dp} (mesh.data*mesh.fsdp) x train.grad_accum='
                      f'{cfg.train.grad_accum}')


def save_config(cfg, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  os.replace(tmp, path)


def load_workdir_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
