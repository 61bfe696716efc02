"""The boundary between a ConfigDict and the typed settings every layer below reads.

`base_config()` is the shared ConfigDict shape, built from the settings dataclasses'
defaults (one place for every default). A stage parses its ConfigDict once, section by
section, with `section()`: an unknown key fails naming the closest one, a wrong type names
the key, and the dataclass checks the values; all before anything is loaded or compiled.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import os
import tokenize
import typing

import ml_collections

from jaxft import compilation_cache, files
from jaxft.data.masking import MaskingSettings
from jaxft.export import ExportSettings
from jaxft.models.config import ModelConfig
from jaxft.partitioning import MeshSettings
from jaxft.peft import PeftConfig
from jaxft.train.loop import CheckpointSettings, LoopSettings, TrainSettings
from jaxft.train.optimizer import FreezeSettings, OptimizerSettings


class ConfigError(ValueError):
  """A config that cannot run: names the key and what is allowed (raised before any compile)."""


# Top-level keys that jaxft.main reads before any stage runs: every stage accepts them.
ENTRY_KEYS = ('compilation_cache_dir',)


def as_section(settings) -> ml_collections.ConfigDict:
  """A settings dataclass (its defaults) as a ConfigDict section."""
  return ml_collections.ConfigDict(dataclasses.asdict(settings))


def base_config() -> ml_collections.ConfigDict:
  """Every key shared by all stages, at its default."""
  c = ml_collections.ConfigDict()
  c.stage = 'pretrain_mlm'
  c.seed = 0
  c.init_from = ''  # a jaxft workdir or a Hugging Face checkpoint directory
  c.overwrite = False  # reuse a workdir that holds a different run (its files are moved aside)
  c.compilation_cache_dir = compilation_cache.DEFAULT_DIR  # compiled programs on disk; '' = off
  c.model = ml_collections.ConfigDict(ModelConfig.section_defaults())
  c.mesh = as_section(MeshSettings())
  c.optimizer = as_section(OptimizerSettings())
  c.train = as_section(TrainSettings())
  c.checkpoint = as_section(CheckpointSettings())
  c.export = as_section(ExportSettings())
  c.peft = ml_collections.ConfigDict(PeftConfig.section_defaults())
  return c


def mlm_config() -> ml_collections.ConfigDict:
  return as_section(MaskingSettings())


def finetune_config() -> ml_collections.ConfigDict:
  return as_section(FreezeSettings())


# ----------------------------------------------------------------------------- parsing

def closest(key: str, options) -> str:
  m = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
  return f' (did you mean {m[0]!r}?)' if m else ''


def _plain(value):
  return value.to_dict() if hasattr(value, 'to_dict') else value


def section(cls, values, key: str):
  """`cls` (a settings dataclass) from a config section: every key known, every type right."""
  values = _plain(values) or {}
  if not isinstance(values, dict):
    raise ConfigError(f'{key} must be a section, got {values!r}')
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  for k in values:
    if k not in fields:
      raise ConfigError(f'unknown config key {key}.{k}{closest(k, fields)}; keys of {key}: '
                        f'{sorted(fields)}')
  kwargs = {}
  for name, value in values.items():
    kwargs[name] = _coerce(value, _default(fields[name]), hints[name], f'{key}.{name}')
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def _default(f: dataclasses.Field):
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return None


def _coerce(value, default, hint, key: str):
  """`value` checked against the type of the field's default (None: not checked)."""
  if dataclasses.is_dataclass(default):
    return section(type(default), value, key)
  if value is None or default is None or hint is typing.Any:
    return _plain(value)
  kind = type(default)
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
    if ok and not math.isfinite(value):  # nan passes every range check written as a < x
      raise ConfigError(f'{key}={value!r} is not a finite number')
  elif kind is str:  # a str field typed `str | tuple` also takes a list / tuple of str
    ok = isinstance(value, str) or (isinstance(value, (tuple, list)) and 'tuple' in str(hint))
    value = tuple(value) if ok and not isinstance(value, str) else value
  elif kind is tuple:
    ok = isinstance(value, (tuple, list)) or (isinstance(value, str) and 'str' in str(hint))
    value = tuple(value) if isinstance(value, (tuple, list)) else value
  else:
    ok = True
  if not ok:
    raise ConfigError(f'{key}={value!r} has the wrong type: it must be {_type_name(default)} '
                      f'(like the default {default!r})')
  return value


def _type_name(v) -> str:
  return {bool: 'a bool', int: 'an int', float: 'a number', str: 'a string',
          tuple: 'a tuple'}.get(type(v), type(v).__name__)


def scalar(cfg, key: str, default):
  """A top-level key (seed, init_from, ...) with its type checked."""
  return _coerce(cfg.get(key, default), default, None, key)


def model_section(cfg) -> ModelConfig:
  """The `model` section as a ModelConfig (vocab_size 0 = the tokenizer's, resolved later)."""
  d = dict(_plain(cfg.get('model', {})) or {})
  defaults = ModelConfig.section_defaults()
  for k, v in d.items():
    if k not in defaults:
      raise ConfigError(f'unknown config key model.{k}{closest(k, defaults)}; keys of model: '
                        f'{sorted(defaults)}')
    _coerce(v, defaults[k], None, f'model.{k}')
  try:
    return ModelConfig.from_config_dict({**defaults, **d})
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def loop_settings(cfg, name: str | None = None) -> LoopSettings:
  """The `train`, `checkpoint`, `optimizer` and `mesh` sections and the seed."""
  return LoopSettings(train=section(TrainSettings, cfg.get('train'), 'train'),
                      checkpoint=section(CheckpointSettings, cfg.get('checkpoint'), 'checkpoint'),
                      optimizer=section(OptimizerSettings, cfg.get('optimizer'), 'optimizer'),
                      mesh=section(MeshSettings, cfg.get('mesh'), 'mesh'),
                      seed=scalar(cfg, 'seed', 0), name=name or cfg.get('stage', 'train'))


def peft_settings(cfg) -> PeftConfig:
  section = _plain(cfg.get('peft', {})) or {}
  defaults = PeftConfig.section_defaults()
  for group in ('lora', 'adapter', 'prompt'):  # nested: checked here, like section() does
    for k, v in (section.get(group) or {}).items():
      if k in defaults[group]:
        _coerce(v, defaults[group][k], None, f'peft.{group}.{k}')
  try:
    return PeftConfig.from_section(section, seed=scalar(cfg, 'seed', 0))
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def check_sections(cfg, known) -> None:
  """Top-level keys a stage does not read are typos (the closest known key named); the
  entry point's own keys (ENTRY_KEYS) are known to every stage, and type-checked here."""
  known = tuple(known) + ENTRY_KEYS
  for key in ENTRY_KEYS:
    scalar(cfg, key, '')
  for k in cfg.keys():
    if k not in known:
      raise ConfigError(f'unknown config key {k}{closest(k, known)}; this stage reads '
                        f'{sorted(known)}')


def save_config(cfg, workdir: str) -> None:
  files.atomic_write(os.path.join(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))


# ----------------------------------------------------------------------------- describing

def field_docs(cls) -> dict[str, str]:
  """{field: the comment on its line} of a settings dataclass: the one-line meaning of each
  key, read from the source where it is written beside the default."""
  names = {f.name for f in dataclasses.fields(cls)}
  docs = {}
  for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
    try:
      source = inspect.getsource(klass)
    except (OSError, TypeError):
      continue
    line_field = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
      if tok.type == tokenize.NAME and tok.string in names and tok.start[1] == 2:
        line_field[tok.start[0]] = tok.string
      elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
        docs[line_field[tok.start[0]]] = tok.string.lstrip('# ').strip()
  return docs


def describe(cfg, types: dict[str, type], prefix: str = '') -> list[str]:
  """'key = value  # meaning' for every leaf of `cfg`; `types` maps a section's dotted name
  to its settings dataclass (where the meanings are written)."""
  lines = []
  docs = field_docs(types[prefix[:-1]]) if prefix[:-1] in types else {}
  if prefix[:-1] in types and (types[prefix[:-1]].__doc__ or '').strip():
    lines.append(f'# {prefix[:-1]}: ' + types[prefix[:-1]].__doc__.strip().splitlines()[0])
  for key in cfg.keys():
    value = cfg[key]
    if hasattr(value, 'keys'):
      lines += describe(value, types, f'{prefix}{key}.')
      continue
    doc = docs.get(key, '')
    lines.append(f'{prefix}{key} = {value!r}' + (f'  # {doc}' if doc else ''))
  return lines
