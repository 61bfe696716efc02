"""Config errors are caught before anything is compiled or written, each naming the key and
what is allowed; the CLI reports them in one line (exit code 2, no traceback)."""
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from jaxft import config as config_lib
from jaxft import main as main_lib
from jaxft import stages
from jaxft.peft import PeftConfig
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def stub_stage(monkeypatch):
  from jaxft.stages import pretrain
  calls = []
  monkeypatch.setattr(pretrain, 'run', lambda settings, wd: calls.append(wd))
  return calls


def _with(**sections):
  """tiny.config() rebuilt from a dict, as a config file could write it (no type checks)."""
  d = tiny.config(8).to_dict()
  for path, value in sections.items():
    *head, last = path.split('__')
    node = d
    for h in head:
      node = node[h]
    node[last] = value
  return ml_collections.ConfigDict(d)


CASES = {
    'misspelled key': (_with(train__num_step=5),
                       "unknown config key train.num_step (did you mean 'num_steps'?); keys of "
                       "train: ['batch_size', "),
    'wrong type': (_with(train__batch_size='32'),
                   "train.batch_size='32' has the wrong type: it must be an int (like the "
                   "default 32)"),
    'wrong type (bool)': (_with(checkpoint__async_save=1),
                          'checkpoint.async_save=1 has the wrong type: it must be a bool'),
    'mesh product is not the device count': (
        _with(mesh__data=3),
        'mesh: data*fsdp*tensor = 3*1*1 = 3 but there are 8 devices; set the axes so their '
        'product is 8'),
    'batch not divisible by data parallelism': (
        _with(train__batch_size=12),
        'train.batch_size=12 is not divisible by the data-parallel size 8 (mesh.data*mesh.fsdp)'),
    'sequence longer than the position table': (
        _with(data={'max_len': 64}),
        'data.max_len=64 exceeds model.max_position_embeddings=16'),
    'stage that does not exist': (_with(stage='pretrain_mlmm'),
                                  "stage='pretrain_mlmm' does not exist (did you mean "
                                  "'pretrain_mlm'?); stages: ["),
    'unknown nonfinite policy': (_with(train__nonfinite='ignore'),
                                 "train.nonfinite='ignore'; allowed: 'skip', 'halt', 'rollback'"),
    'NaN number': (_with(optimizer__lr=float('nan')),
                   'optimizer.lr=nan is not a finite number'),
    'infinite number (model)': (_with(model__layer_norm_eps=float('inf')),
                                'model.layer_norm_eps=inf is not a finite number'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_config_error_names_key_and_allowed_before_anything_runs(case, tmp_path, stub_stage):
  cfg, expected = CASES[case]
  wd = str(tmp_path / 'w')
  with pytest.raises(config_lib.ConfigError) as e:
    main_lib.run_stage(cfg, wd)
  assert expected in str(e.value), str(e.value)
  assert not stub_stage and not os.path.exists(wd)  # nothing ran, nothing was written


def test_peft_numbers_are_checked_like_every_section():
  """The peft section's nested groups go through the same checks (a NaN lora.alpha would
  make every LoRA output NaN)."""
  for value, expected in ((float('nan'), 'peft.lora.alpha=nan is not a finite number'),
                          ('8', "peft.lora.alpha='8' has the wrong type: it must be a number")):
    with pytest.raises(config_lib.ConfigError, match=re.escape(expected)):
      config_lib.section(PeftConfig, {'lora': {'alpha': value}}, 'peft')
  assert config_lib.section(PeftConfig, {'lora': {'alpha': 32}}, 'peft').lora_scale == 4.0


def test_pipeline_errors_name_the_section(tmp_path, stub_stage):
  import importlib.util
  spec = importlib.util.spec_from_file_location('q', f'{REPO}/configs/quickstart.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('pretrain')
  c.pretrain.data.max_len = 512
  with pytest.raises(config_lib.ConfigError, match=r'^config\.pretrain: data\.max_len=512 '
                                                   r'exceeds model\.max_position_embeddings=128'):
    main_lib.run_stage(c, str(tmp_path / 'w'))
  c = mod.get_config('pretrain')
  c.pretrain.mesh.tensor = 3
  with pytest.raises(config_lib.ConfigError, match=r"^config\.pretrain: mesh: \{'data': -1, "
                                                   r"'fsdp': 1, 'tensor': 3\} does not divide 8"):
    main_lib.run_stage(c, str(tmp_path / 'w'))
  assert not stub_stage and not os.path.exists(tmp_path / 'w')


def test_every_bundled_config_validates():
  import importlib.util
  for name, variants in {'quickstart': ['', 'pretrain', 'smoke'], 'bert_mlm': ['tiny', 'base'],
                         'gpt2_clm': [''], 'finetune_cls': [''], 'finetune_ner': [''],
                         'predict': [''], 'finetune_lm': ['e2e', 'tiny', 'custom'],
                         'finetune_qa': ['squad', 'tiny', 'custom'], 'distill': ['squad'],
                         'generate': ['']}.items():
    spec = importlib.util.spec_from_file_location(name, f'{REPO}/configs/{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for v in variants:
      cfg = mod.get_config(v)
      if name == 'generate':  # what the command line must give (docs/generation.md)
        cfg.init_from, cfg.generate.input = '/some/workdir', 'prompts.txt'
      stages.validate(cfg)


CLI = {
    'misspelled key': (['--config.pretrain.train.num_step=5'],
                       "config error: unknown key 'num_step' in --config.pretrain.train."
                       "num_step=5 (did you mean 'num_steps'?)"),
    'wrong type': (['--config.pretrain.train.batch_size=abc'],
                   'config error: --config.pretrain.train.batch_size=abc: must be an int '),
    'mesh': (['--config.pretrain.mesh.data=3'],
             'config error: config.pretrain: mesh: data*fsdp*tensor = 3*1*1 = 3 but there are '
             '1 devices'),
}


@pytest.mark.parametrize('case', list(CLI))
def test_cli_reports_one_line(case, tmp_path):
  args, expected = CLI[case]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'jaxft.main', '--config',
                      f'{REPO}/configs/quickstart.py:pretrain', '--workdir', str(tmp_path / 'w'),
                      *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                     env={**env, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 2, r.stderr[-3000:]
  # absl INFO lines (what was resolved before the error was found) are progress, not report
  lines = [ln for ln in r.stderr.splitlines()
           if ln.strip() and ' main.py:' not in ln and not re.match(r'I\d{4} ', ln)]
  assert lines == [lines[-1]] and lines[-1].startswith(expected), r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  assert not os.path.exists(tmp_path / 'w')


def test_max_len_is_checked_against_the_init_from_model_not_the_config_default():
  """With init_from the architecture comes from that checkpoint (checked by the stage), so
  model.* defaults in the config must not veto data.max_len."""
  c = _with(data={'max_len': 64})
  with pytest.raises(config_lib.ConfigError, match='exceeds model.max_position_embeddings=16'):
    stages.validate(c)
  c.init_from = '/some/checkpoint'
  stages.validate(c)  # no error: the stage compares with the checkpoint's table


STAGE_CLI = {
    'NaN decoding setting': (
        'generate.py', ['--config.generate.length_penalty=nan', '--config.init_from=/w',
                        '--config.generate.input=p.txt'],
        'config error: generate.length_penalty=nan is not a finite number'),
    'show_config with a NaN': (
        'generate.py', ['--show_config', '--config.generate.temperature=inf'],
        'config error: generate.temperature=inf is not a finite number'),
    'show_config with a bad value': (
        'quickstart.py:pretrain', ['--show_config', '--config.pretrain.train.nonfinite=ignore'],
        "config error: config.pretrain: train.nonfinite='ignore'; allowed: 'skip'"),
}


@pytest.mark.parametrize('case', list(STAGE_CLI))
def test_cli_refuses_what_a_run_would_refuse(case, tmp_path):
  """Non-finite numbers are refused at parse time (generate.length_penalty=nan used to run
  and write an empty generation per prompt and a bare NaN into results.json), and
  --show_config checks the config as a run does: the listing, then one line, exit code 2."""
  config, args, expected = STAGE_CLI[case]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'jaxft.main', '--config', f'{REPO}/configs/{config}',
                      '--workdir', str(tmp_path / 'w'), *args], capture_output=True, text=True,
                     cwd=REPO, timeout=300, env={**env, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [ln for ln in r.stderr.splitlines()
           if ln.strip() and ' main.py:' not in ln and not re.match(r'I\d{4} ', ln)]
  assert lines == [lines[-1]] and lines[-1].startswith(expected), r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  if '--show_config' in args:  # the listing still comes, to find the key in
    assert any(ln.startswith(('generate.temperature = ', 'pretrain.train.nonfinite = '))
               for ln in r.stdout.splitlines()), r.stdout[-2000:]
  assert not os.path.exists(tmp_path / 'w')
