"""The command line reaches every key: every key docs/finetune.md and docs/data.md name can be
overridden with --config.<key>=..., a custom task is fully described from the command line,
and --show_config lists every key with its default and what it means."""
import dataclasses
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from jaxft import main, stages
from jaxft.config import ConfigError
from jaxft.data.completion import CompletionData
from jaxft.data.pretrain import CHOICES, LmDataSettings

REPO = Path(__file__).resolve().parents[1]


def parse_cli(config: str, *overrides: str):
  """The ConfigDict `python -m jaxft.main --config CONFIG OVERRIDES...` would run."""
  argv = ['jaxft', f'--config={REPO / "configs" / config}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def documented_keys(doc: Path) -> list[str]:
  """`section.key` names in the doc's key tables; a bare `key` after one continues it."""
  keys = []
  for line in doc.read_text().splitlines():
    if not line.startswith('| `'):
      continue
    cell = re.sub(r'\([^)]*\)', '', line.split('|')[1])  # (`linear`, ...) are values
    section = None
    for name in re.findall(r'`([a-z_.]+)', cell):
      if '.' in name:
        section, key = name.split('.', 1)
        keys.append(f'{section}.{key}')
      elif section:
        keys.append(f'{section}.{name}')
  return keys


def _override(cfg, key: str) -> str:
  value = cfg
  for part in key.split('.'):
    value = value[part]
  if isinstance(value, bool):
    return f'--config.{key}={not value}'
  if isinstance(value, (int, float)):
    return f'--config.{key}={value + 1}'
  if isinstance(value, tuple):
    return f"--config.{key}=('a', 'b')"
  return f'--config.{key}=x'


def test_every_documented_finetune_key_is_settable_from_the_cli():
  keys = documented_keys(REPO / 'docs/finetune.md')
  assert {'data.labels', 'data.is_regression', 'train.num_epochs', 'data.text_column'} <= set(keys)
  base = parse_cli('finetune_cls.py:custom')
  for key in keys:
    override = _override(base, key)
    cfg = parse_cli('finetune_cls.py:custom', override)
    assert str(cfg[key.split('.')[0]][key.split('.')[1]]) != str(
        base[key.split('.')[0]][key.split('.')[1]]), override


def test_every_pretraining_data_key_is_documented_and_settable_from_the_cli():
  """docs/data.md's table names every key of LmDataSettings; each override reaches the typed
  settings of the pretraining and prepare_data stages (or is refused naming the key)."""
  keys = documented_keys(REPO / 'docs/data.md')
  assert sorted(keys) == sorted(f'data.{f.name}' for f in dataclasses.fields(LmDataSettings))
  base = parse_cli('bert_mlm.py:tiny')
  for key in keys:
    name = key.split('.')[1]
    cfg = parse_cli('bert_mlm.py:tiny', _override(base, key))
    assert str(cfg.data[name]) != str(base.data[name]), key
    for stage in ('pretrain_mlm', 'prepare_data'):
      cfg.stage = stage
      if name in CHOICES:  # 'x' is no choice
        with pytest.raises(ConfigError, match=f"data.{name}='x'; allowed"):
          stages.validate(cfg)
      else:
        assert getattr(stages.validate(cfg).data, name) == cfg.data[name], key
  described = stages.describe(parse_cli('bert_mlm.py:tiny', '--config.stage=prepare_data'))
  assert any(ln.startswith('data.store_dir = ') and '# where stores live' in ln
             for ln in described.splitlines())


def test_every_stage_reading_pretraining_text_has_a_typed_data_section():
  for config, stage in (('bert_mlm.py:tiny', 'pretrain_mlm'), ('gpt2_clm.py:tiny', 'pretrain_clm'),
                        ('distill.py:mlm', 'distill'), ('bert_mlm.py:tiny', 'prepare_data'),
                        ('gpt2_clm.py:tiny', 'prepare_data'), ('distill.py:mlm', 'prepare_data')):
    cfg = parse_cli(config, f'--config.stage={stage}', '--config.data.files=a,b')
    settings = stages.validate(cfg)
    assert isinstance(settings.data, LmDataSettings) and settings.data.files == 'a,b'
    if stage == 'prepare_data':  # the rows the training stage packs
      assert settings.model_type == ('gpt2' if config.startswith('gpt2') else 'bert')
  with pytest.raises(ConfigError, match="distill.kind='cls' reads task files"):
    stages.validate(parse_cli('distill.py:sst2', '--config.stage=prepare_data'))


def test_a_custom_task_from_the_command_line():
  cfg = parse_cli('finetune_cls.py:custom', '--config.data.path=/data/reviews',
                  '--config.data.train_file=train.csv', '--config.data.text_column=review',
                  '--config.data.label_column=stars', "--config.data.labels=('1', '2', '3')",
                  '--config.data.hf_data_files=train=a.csv,dev=b.csv',
                  '--config.data.is_regression=False')
  data = stages.validate(cfg).data
  assert (data.text_column, data.label_column, data.labels) == ('review', 'stars',
                                                                ('1', '2', '3'))
  assert data.data_files == {'train': 'a.csv', 'dev': 'b.csv'}
  cfg = parse_cli('finetune_cls.py:custom', '--config.data.text_column=t',
                  '--config.data.is_regression=True')
  assert stages.validate(cfg).data.is_regression


@pytest.mark.parametrize('config', ['finetune_cls.py:sst2', 'bert_mlm.py:tiny'])
def test_show_config_lists_every_key_with_its_default_and_meaning(config):
  r = subprocess.run([sys.executable, '-m', 'jaxft.main', f'--config=configs/{config}',
                      '--show_config'], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  cfg = parse_cli(config)
  for section in ('train', 'optimizer', 'model', 'data'):
    for key in cfg[section].keys():
      if hasattr(cfg[section][key], 'keys'):
        continue
      assert any(ln.split()[0] == f'{section}.{key}' for ln in lines if ln.strip()), key
  assert any(ln.startswith('train.nonfinite = ') and '# skip | halt | rollback' in ln
             for ln in lines)
  assert any(ln.startswith('optimizer.lr = ') and '# peak learning rate' in ln for ln in lines)


def test_every_documented_generation_key_is_settable_and_described():
  """docs/generation.md's key tables: each key is a key of finetune_lm's or generate's config,
  settable from the command line, and --show_config (stages.describe) gives its meaning."""
  keys = documented_keys(REPO / 'docs/generation.md')
  assert {'data.template', 'data.packing', 'generate.num_beams', 'generate.top_p',
          'generate.input', 'generate.checkpoint'} <= set(keys)
  configs = {name: parse_cli(name) for name in ('finetune_lm.py:custom', 'generate.py')}
  described = {name: stages.describe(cfg).splitlines() for name, cfg in configs.items()}
  for key in keys:
    where = [n for n, c in configs.items() if _has(c, key)]
    assert where, f'{key} is in neither configs/finetune_lm.py nor configs/generate.py'
    base = configs[where[0]]
    cfg = parse_cli(where[0], _override(base, key))
    assert str(_get(cfg, key)) != str(_get(base, key)), key
    ours = key.startswith('generate.') or key.removeprefix('data.') in \
        CompletionData.__annotations__  # the sections the generation stages add
    if ours and not hasattr(_get(base, key), 'keys'):
      line = next(ln for ln in described[where[0]] if ln.split()[0] == key)
      assert '  # ' in line, f'--show_config gives {key} no meaning: {line}'
  stages.validate(configs['finetune_lm.py:custom'])  # the defaults parse


def _get(cfg, key: str):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg


def _has(cfg, key: str) -> bool:
  try:
    _get(cfg, key)
  except (KeyError, AttributeError):
    return False
  return True


def test_orbax_warnings_about_intended_reads_stay_off_the_console():
  """Orbax warns 'Metadata file does not exist: %s' with the path as an argument when jaxft
  reads one item of a checkpoint (init_from); the filter reads the formatted message."""
  def record(msg, args, level=logging.WARNING, path='/x/orbax/checkpoint/checkpoint.py'):
    return logging.LogRecord('absl', level, path, 1, msg, args, None)
  quiet = main._QuietLibraries()
  assert not quiet.filter(record('Metadata file does not exist: %s',
                                 ('/w/checkpoints/600/state/_CHECKPOINT_METADATA',)))
  assert quiet.filter(record('Metadata file does not exist: %s', ('/w/other',)))
  assert not quiet.filter(record('saving step %d', (5,), level=logging.INFO))
  assert quiet.filter(record('step %d', (5,), level=logging.INFO, path='/r/jaxft/train/loop.py'))
