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

from jaxft import compilation_cache, files, measured
from jaxft.data.masking import MaskingSettings
from jaxft.export import ExportSettings
from jaxft.models.config import ModelConfig
from jaxft.partitioning import MeshSettings
from jaxft.peft import PeftConfig
from jaxft.train.loop import CheckpointSettings, TrainSettings
from jaxft.train.optimizer import FreezeSettings, OptimizerSettings


class ConfigError(ValueError):
  """A config that cannot run: names the key and what is allowed (raised before any compile)."""


# Top-level keys that jaxft.main reads before any stage runs: every stage accepts them.
ENTRY_KEYS = ('compilation_cache_dir', 'choices')


def as_section(settings) -> ml_collections.ConfigDict:
  """A settings dataclass (its defaults) as a ConfigDict section."""
  return ml_collections.ConfigDict(dataclasses.asdict(settings))


def run_config(stage: str) -> ml_collections.ConfigDict:
  """The keys of every config, whatever its stage reads."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.overwrite = False  # reuse a workdir that holds a different run (its files are moved aside)
  c.compilation_cache_dir = compilation_cache.DEFAULT_DIR  # compiled programs on disk; '' = off
  c.choices = ''  # measured choices: 'name=candidate|default|measure,...' ('*' = all; measured.py)
  return c


def base_config() -> ml_collections.ConfigDict:
  """The keys every training stage reads, at their defaults; a config file adds its stage's
  own sections (`peft_config()`, `mlm_config()`, ...)."""
  c = run_config('pretrain_mlm')
  c.seed = 0
  c.init_from = ''  # a jaxft workdir or a Hugging Face checkpoint directory
  c.model = ml_collections.ConfigDict(ModelConfig.section_defaults())
  c.mesh = as_section(MeshSettings())
  c.optimizer = as_section(OptimizerSettings())
  c.train = as_section(TrainSettings())
  c.checkpoint = as_section(CheckpointSettings())
  c.export = as_section(ExportSettings())
  return c


def peft_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(PeftConfig.section_defaults())


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
  """`cls` (a settings dataclass) from a config section: every key known, every type right.

  The one parser. A class whose config shape is not its fields (the `model` section's `type`,
  `peft`'s nested groups) declares it: `section_defaults()` gives the section's keys at their
  defaults (checked here like fields) and `from_section(values)` builds the class."""
  values = _plain(values) or {}
  where = key or 'the config'
  if not isinstance(values, dict):
    raise ConfigError(f'{where} must be a section, got {values!r}')
  shaped = hasattr(cls, 'section_defaults')
  defaults = cls.section_defaults() if shaped else {
      f.name: _default(f) for f in dataclasses.fields(cls)}
  hints = {} if shaped else typing.get_type_hints(cls)
  dotted = lambda k: f'{key}.{k}' if key else k  # noqa: E731
  for k in values:
    if k not in defaults:
      what = f'keys of {key}' if key else 'this stage reads'
      raise ConfigError(f'unknown config key {dotted(k)}{closest(k, defaults)}; {what}: '
                        f'{sorted(defaults)}')
  kwargs = {}
  for name, default in defaults.items():
    kind = hints.get(name)
    if dataclasses.is_dataclass(kind) and name not in values and default is None:
      kwargs[name] = section(kind, {}, dotted(name))  # an absent section: its defaults
    elif name not in values:
      continue
    elif dataclasses.is_dataclass(kind):
      kwargs[name] = section(kind, values[name], dotted(name))
    elif isinstance(default, dict):  # a nested group of a shaped section (peft.lora)
      kwargs[name] = _group(values[name], default, dotted(name))
    else:
      kwargs[name] = _coerce(values[name], default, kind, dotted(name))
  try:
    return cls.from_section(kwargs) if shaped else cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def _group(values, defaults: dict, key: str) -> dict:
  values = _plain(values) or {}
  if not isinstance(values, dict):
    raise ConfigError(f'{key} must be a section, got {values!r}')
  for k in values:
    if k not in defaults:
      raise ConfigError(f'unknown config key {key}.{k}{closest(k, defaults)}; keys of {key}: '
                        f'{sorted(defaults)}')
  return {k: _coerce(v, defaults[k], None, f'{key}.{k}') for k, v in values.items()}


# Keys of every config that no stage's settings hold: `overwrite` (jaxft.workdir reads it)
# and the entry point's own keys.
RUN_KEYS = ('overwrite',) + ENTRY_KEYS


def parse_settings(cls, cfg):
  """A stage's settings from its whole ConfigDict: `cls`'s fields are the config's top-level
  keys (sections are dataclass fields, `seed` / `init_from` plain ones), so the class is the
  schema: a key it has no field for is a typo (closest key named), unless the class's
  `accepted_keys` lists it (a section its config files carry that the stage does not read)."""
  for key in ENTRY_KEYS:
    scalar(cfg, key, '')
  measured.parse(cfg.get('choices', ''), 'choices')
  skip = RUN_KEYS + tuple(getattr(cls, 'accepted_keys', ()))
  return section(cls, {k: v for k, v in cfg.items() if k not in skip}, '')


def section_types(cls, prefix: str = '') -> dict[str, type]:
  """{dotted section name: its settings dataclass} of a stage's settings class (where each
  key's default and meaning are written; --show_config reads them)."""
  out = {}
  for f in dataclasses.fields(cls):
    kind = typing.get_type_hints(cls).get(f.name)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
      out[prefix + f.name] = kind
      if not hasattr(kind, 'section_defaults'):
        out.update(section_types(kind, f'{prefix}{f.name}.'))
  return out


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
