"""Bad input files are the user's to fix: every stage that reads them (finetune_cls,
finetune_lm, generate, predict, prepare_data) reports one line naming the file (and line),
exit code 2, no traceback, before anything is trained or decoded; an output path that cannot
be written is refused before the work starts. Run through `jaxft.main.run_reporting_errors`
(what the command line runs after parsing its flags), in-process; nothing here compiles."""
import importlib.util
import json
import logging
import os
import re
import shutil

import pytest

from jaxft import main as main_lib
from jaxft.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BERT_TOKENIZER = os.path.join(REPO, 'data/tokenizers/quickstart-wordpiece')
GPT2_TOKENIZER = os.path.join(REPO, 'data/tokenizers/gpt2')
NOT_UTF8 = 'caf\xe9'.encode('latin-1')


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
  """Reaching training or decoding means the error came too late."""
  from jaxft import generation
  monkeypatch.setattr(loop, 'train', lambda *a, **k: pytest.fail('reached training'))
  monkeypatch.setattr(generation, 'generate_ids', lambda *a, **k: pytest.fail('decoded'))


def _config(name, variant=''):
  spec = importlib.util.spec_from_file_location(f'_ie_{name}', f'{REPO}/configs/{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def reported(cfg, workdir, capsys) -> tuple[int, list[str]]:
  """(exit code, stderr lines but progress bars) of the command line's run of `cfg`."""
  with pytest.raises(SystemExit) as e:
    main_lib.run_reporting_errors(cfg, str(workdir))
  lines = capsys.readouterr().err.strip().splitlines()
  return e.value.code, [ln for ln in lines if not re.search(r'\[\d\d:\d\d[<,]', ln)]


def assert_one_line(cfg, workdir, capsys, *expected: str) -> str:
  code, lines = reported(cfg, workdir, capsys)
  assert code == 2 and len(lines) == 1, (code, lines)
  assert lines[0].startswith(('error: ', 'config error: ')), lines
  for text in expected:
    assert text in lines[0], lines[0]
  return lines[0]


def _write(path, content) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content if isinstance(content, bytes) else content.encode())
  return str(path)


def _remote_code_tokenizer(d) -> str:
  shutil.copytree(BERT_TOKENIZER, d)
  conf = json.load(open(os.path.join(d, 'tokenizer_config.json')))
  conf['auto_map'] = {'AutoTokenizer': ['tokenization_x.XTokenizer', None]}
  json.dump(conf, open(os.path.join(d, 'tokenizer_config.json'), 'w'))
  return os.path.join(d, 'tokenizer_config.json')


# ------------------------------------------------------------------------- finetune_cls

def _cls_config(data_dir):
  c = _config('finetune_cls', 'sst2')
  c.data.update(path=str(data_dir), tokenizer=BERT_TOKENIZER, max_len=32)
  c.train.update(num_epochs=0, num_steps=1, batch_size=8)
  c.export.hf = False
  return c


GOOD_TSV = 'sentence\tlabel\ngood\t1\nbad\t0\n'
BAD_TSV = {'empty': (b'', ':1: empty file'),
           'header only': (b'sentence\tlabel\n', 'no rows'),
           'not UTF-8': (b'sentence\tlabel\ngood\t1\n' + NOT_UTF8 + b'\t0\n',
                         ':3: invalid UTF-8 byte 0xe9')}


@pytest.mark.parametrize('case', list(BAD_TSV))
def test_finetune_cls_bad_train_file(case, tmp_path, capsys):
  content, expected = BAD_TSV[case]
  train = _write(tmp_path / 'd' / 'train.tsv', content)
  _write(tmp_path / 'd' / 'dev.tsv', GOOD_TSV)
  assert_one_line(_cls_config(tmp_path / 'd'), tmp_path / 'w', capsys, train, expected)


def test_finetune_cls_missing_train_file(tmp_path, capsys):
  _write(tmp_path / 'd' / 'dev.tsv', GOOD_TSV)
  assert_one_line(_cls_config(tmp_path / 'd'), tmp_path / 'w', capsys,
                  str(tmp_path / 'd' / 'train.tsv'), 'does not exist')


def test_finetune_cls_remote_code_tokenizer(tmp_path, capsys):
  _write(tmp_path / 'd' / 'train.tsv', GOOD_TSV)
  _write(tmp_path / 'd' / 'dev.tsv', GOOD_TSV)
  c = _cls_config(tmp_path / 'd')
  conf = _remote_code_tokenizer(str(tmp_path / 'tok'))
  c.data.tokenizer = str(tmp_path / 'tok')
  line = assert_one_line(c, tmp_path / 'w', capsys, conf, '"auto_map" names code')
  assert line.startswith('error: ')  # as docs/reliability.md shows it


# -------------------------------------------------------------------------- finetune_lm

def _lm_config(train_file):
  c = _config('finetune_lm', 'tiny')
  c.data.update(path=os.path.dirname(train_file), train_file=os.path.basename(train_file),
                dev_fraction=0.0, tokenizer=GPT2_TOKENIZER)
  c.generate.method = ''
  c.train.early_stopping.metric = ''
  return c


BAD_CSV = {'empty': (b'', ':1: empty file'),
           'header only': (b'mr,ref\n', 'no rows'),
           'not UTF-8': (b'mr,ref\na,b\n' + NOT_UTF8 + b',b\n', ':3: invalid UTF-8 byte 0xe9')}


@pytest.mark.parametrize('case', list(BAD_CSV))
def test_finetune_lm_bad_train_file(case, tmp_path, capsys):
  content, expected = BAD_CSV[case]
  train = _write(tmp_path / 'd' / 'train.csv', content)
  assert_one_line(_lm_config(train), tmp_path / 'w', capsys, train, expected)


def test_finetune_lm_missing_train_file(tmp_path, capsys):
  os.makedirs(tmp_path / 'd')
  assert_one_line(_lm_config(str(tmp_path / 'd' / 'train.csv')), tmp_path / 'w', capsys,
                  str(tmp_path / 'd' / 'train.csv'), 'does not exist')


def test_finetune_lm_template_without_prompt(tmp_path, capsys):
  train = _write(tmp_path / 'd' / 'train.csv', 'mr,ref\na,b\n')
  c = _lm_config(train)
  c.data.template = 'no placeholder'
  assert_one_line(c, tmp_path / 'w', capsys, "data.template='no placeholder'", '{prompt}')


# ----------------------------------------------------------------------------- generate

def _lm_workdir(d, **data) -> str:
  """What generate reads of a finetune_lm workdir before its model: config.json's data."""
  os.makedirs(os.path.join(d, 'checkpoints'))
  shutil.copytree(GPT2_TOKENIZER, os.path.join(d, 'tokenizer'))
  json.dump({'stage': 'finetune_lm', 'data': {'prompt_column': 'mr', 'completion_column': 'ref',
                                              'template': '{prompt} ||', **data}},
            open(os.path.join(d, 'config.json'), 'w'))
  return str(d)


def _gen_config(tmp_path, input_file, **data):
  c = _config('generate')
  c.init_from = _lm_workdir(tmp_path / 'lm', **data)
  c.generate.input = str(input_file)
  return c


@pytest.mark.parametrize('case', list(BAD_CSV))
def test_generate_bad_input_file(case, tmp_path, capsys):
  content, expected = BAD_CSV[case]
  prompts = _write(tmp_path / 'prompts.csv', content)
  assert_one_line(_gen_config(tmp_path, prompts), tmp_path / 'w', capsys, prompts, expected)


def test_generate_missing_input_file(tmp_path, capsys):
  assert_one_line(_gen_config(tmp_path, tmp_path / 'nope.csv'), tmp_path / 'w', capsys,
                  str(tmp_path / 'nope.csv'), 'generate.input')


def test_generate_template_without_prompt(tmp_path, capsys):
  prompts = _write(tmp_path / 'prompts.txt', 'a prompt\n')
  c = _gen_config(tmp_path, prompts, template='no placeholder')
  assert_one_line(c, tmp_path / 'w', capsys, "template='no placeholder'", '{prompt}',
                  os.path.join(c.init_from, 'config.json'))
  c = _gen_config(tmp_path / 'b', prompts)
  c.data.template = 'also none'
  assert_one_line(c, tmp_path / 'w2', capsys, "data.template='also none'", '{prompt}')


def test_generate_bad_row_names_what_generate_accepts(tmp_path, capsys):
  """generate has no data.on_bad_row: the message must not suggest it."""
  prompts = _write(tmp_path / 'prompts.csv', 'mr,ref\na,b\n,c\n')
  line = assert_one_line(_gen_config(tmp_path, prompts), tmp_path / 'w', capsys,
                         f'{prompts}:3: empty prompt')
  assert 'on_bad_row' not in line and 'fix or remove the row' in line, line


# ------------------------------------------------------------------------------ predict

def _cls_workdir(d, data_path) -> str:
  """What predict reads of a finetune_cls workdir before its model: labels.json, config.json
  (the data settings) and the tokenizer."""
  from jaxft.models import ModelConfig
  os.makedirs(os.path.join(d, 'checkpoints'))
  shutil.copytree(BERT_TOKENIZER, os.path.join(d, 'tokenizer'))
  mcfg = ModelConfig(model_type='bert', vocab_size=100, hidden_size=16, num_layers=1,
                     num_heads=2, intermediate_size=32, max_position_embeddings=32)
  json.dump({'kind': 'cls', 'label_names': ['negative', 'positive'], 'label_values': ['0', '1'],
             'is_regression': False, 'metric_names': ['accuracy'], 'main_metric': 'accuracy',
             'model': mcfg.to_dict()}, open(os.path.join(d, 'labels.json'), 'w'))
  json.dump({'stage': 'finetune_cls', 'data': {'task': 'sst2', 'path': str(data_path),
                                               'max_len': 32}},
            open(os.path.join(d, 'config.json'), 'w'))
  return str(d)


def _predict_config(tmp_path, spec, data_path=None):
  c = _config('predict')
  c.init_from = _cls_workdir(tmp_path / 'ft', data_path or tmp_path)
  c.predict.input = str(spec)
  return c


def test_predict_bad_input_files(tmp_path, capsys):
  bad = _write(tmp_path / 'texts.txt', b'good\n' + NOT_UTF8 + b'\n')
  assert_one_line(_predict_config(tmp_path, bad), tmp_path / 'w', capsys,
                  f'{bad}:2: invalid UTF-8 byte 0xe9')
  empty = _write(tmp_path / 'rows.tsv', b'')
  assert_one_line(_predict_config(tmp_path / 'b', empty), tmp_path / 'w2', capsys,
                  f'{empty}:1: empty file')


def test_predict_missing_input_file_says_so(tmp_path, capsys):
  line = assert_one_line(_predict_config(tmp_path, tmp_path / 'x.txt'), tmp_path / 'w', capsys,
                         f"predict.input='{tmp_path / 'x.txt'}'", 'no such file')
  assert '_file' not in line, line  # not `set data./path/x.txt_file`


@pytest.mark.parametrize('stage', ['generate', 'predict'])
def test_unwritable_output_is_refused_before_the_model(tmp_path, capsys, stage):
  """generate.output / predict.output that cannot be written fail before any model work."""
  inputs = _write(tmp_path / 'inputs.txt', 'a text\n')
  _write(tmp_path / 'a_file', 'x')
  c = (_gen_config if stage == 'generate' else _predict_config)(tmp_path, inputs)
  c[stage].output = str(tmp_path / 'a_file' / 'out.jsonl')
  assert_one_line(c, tmp_path / 'w', capsys, f'{stage}.output=', str(tmp_path / 'a_file'))


def test_predict_split_from_a_stored_config_must_lie_in_the_data_directory(tmp_path, capsys,
                                                                          caplog):
  """A workdir's config.json edited to name /etc/passwd as its test split is not read, nor a
  split file outside its data.path; a data file under data.path is, and the log names the
  file it resolved to."""
  c = _predict_config(tmp_path, 'test', data_path='/etc')
  conf = json.load(open(os.path.join(c.init_from, 'config.json')))
  conf['data']['test_file'] = 'passwd'
  json.dump(conf, open(os.path.join(c.init_from, 'config.json'), 'w'))
  line = assert_one_line(c, tmp_path / 'w', capsys, "predict.input='test' resolves to "
                         '/etc/passwd', os.path.join(c.init_from, 'config.json'),
                         'not a data file', '--config.predict.input=/etc/passwd')
  assert not os.path.exists(tmp_path / 'w' / 'predictions.jsonl'), line
  elsewhere = _write(tmp_path / 'elsewhere' / 'dev.tsv', 'sentence\tlabel\ngood\t1\n')
  conf['data'].update(path=os.path.join(REPO, 'data/glue/sst2'), test_file=str(elsewhere))
  json.dump(conf, open(os.path.join(c.init_from, 'config.json'), 'w'))
  assert_one_line(c, tmp_path / 'w', capsys, "predict.input='test' resolves to "
                  f'{elsewhere}', 'outside data.path=', f'--config.predict.input={elsewhere}')
  c = _predict_config(tmp_path / 'b', 'dev', data_path=os.path.join(REPO, 'data/glue/sst2'))
  with caplog.at_level(logging.INFO), pytest.raises(FileNotFoundError, match='no checkpoint'):
    main_lib.run_reporting_errors(c, str(tmp_path / 'w2'))  # reads the split, then the model
  assert f"the dev split of {c.init_from}/config.json is {REPO}/data/glue/sst2/dev.tsv" in \
      caplog.text


# ------------------------------------------------------------------------- prepare_data

def _prepare_config(files):
  c = _config('bert_mlm', 'tiny')
  c.stage = 'prepare_data'
  c.data.update(files=str(files), tokenizer=BERT_TOKENIZER)
  return c


@pytest.mark.parametrize('case', ['empty', 'not UTF-8'])
def test_prepare_data_bad_corpus(case, tmp_path, capsys):
  content, expected = {'empty': (b'', 'no text'),
                       'not UTF-8': (b'a line\n' + NOT_UTF8 + b'\n', ':2: not valid UTF-8')}[case]
  corpus = _write(tmp_path / 'corpus.txt', content)
  assert_one_line(_prepare_config(corpus), tmp_path / 'w', capsys, corpus, expected)


def test_prepare_data_missing_corpus(tmp_path, capsys):
  assert_one_line(_prepare_config(tmp_path / 'nope.txt'), tmp_path / 'w', capsys,
                  str(tmp_path / 'nope.txt'), 'does not exist')
