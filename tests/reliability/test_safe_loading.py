"""Safe loading through a stage's `init_from`: weights come from safetensors, Orbax or
`torch.load(weights_only=True)` only; a crafted pickle that would run code is refused, and
no code shipped in a checkpoint directory (remote-code tokenizers/models) is ever run."""
import importlib.util
import json
import os
import shutil

import pytest

from jaxft import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QS_TOKENIZER = os.path.join(REPO, 'data/tokenizers/quickstart-wordpiece')


class _Evil:
  """Unpickling this runs `touch marker` (what a malicious pytorch_model.bin does)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _evil_dir(d, marker, remote_code=True):
  """An HF-looking BERT directory whose every code path would touch `marker` if run: a
  pickle in pytorch_model.bin and, with `remote_code`, `auto_map` entries naming modules of
  the directory in config.json and tokenizer_config.json (for a tokenizer class transformers
  does not know, so that it would prompt on stdin)."""
  os.makedirs(d)
  n_vocab = sum(1 for _ in open(os.path.join(QS_TOKENIZER, 'vocab.txt'), encoding='utf-8'))
  conf = {'model_type': 'bert', 'architectures': ['BertForSequenceClassification'],
          'vocab_size': n_vocab, 'hidden_size': 16, 'num_hidden_layers': 1,
          'num_attention_heads': 2, 'intermediate_size': 32, 'max_position_embeddings': 64}
  tok_cfg = json.load(open(os.path.join(QS_TOKENIZER, 'tokenizer_config.json')))
  if remote_code:
    conf['auto_map'] = {'AutoConfig': 'modeling_evil.EvilConfig',
                        'AutoModel': 'modeling_evil.EvilModel'}
    tok_cfg['auto_map'] = {'AutoTokenizer': ['tokenization_evil.EvilTokenizer', None]}
    tok_cfg['tokenizer_class'] = 'EvilTokenizer'
  json.dump(conf, open(os.path.join(d, 'config.json'), 'w'))
  for f in ('tokenizer.json', 'vocab.txt'):
    shutil.copy(os.path.join(QS_TOKENIZER, f), d)
  json.dump(tok_cfg, open(os.path.join(d, 'tokenizer_config.json'), 'w'))
  payload = f'import os\nos.system("touch {marker}")\n'
  for f in ('modeling_evil.py', 'tokenization_evil.py'):
    open(os.path.join(d, f), 'w').write(payload + 'class EvilConfig: pass\n'
                                        'class EvilModel: pass\nclass EvilTokenizer: pass\n')
  import torch
  torch.save({'bert.embeddings.word_embeddings.weight': torch.zeros(n_vocab, 16),
              'x': _Evil(marker)}, os.path.join(d, 'pytorch_model.bin'))


def _finetune_config(tmp_path, init_from):
  spec = importlib.util.spec_from_file_location('fc', f'{REPO}/configs/finetune_cls.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('sst2')
  rows = open(os.path.join(REPO, 'data/glue/sst2/train.tsv'), encoding='utf-8').readlines()
  data = tmp_path / 'sst2'
  data.mkdir()
  for split in ('train', 'dev'):
    (data / f'{split}.tsv').write_text(''.join(rows[:33]), encoding='utf-8')
  c.data.update(path=str(data), max_len=32)
  c.init_from = init_from
  c.train.update(num_epochs=0, num_steps=1, batch_size=8)
  c.export.hf = False
  return c


def test_crafted_pickle_through_init_from_is_refused_and_never_runs(tmp_path, monkeypatch):
  pytest.importorskip('torch')
  marker = tmp_path / 'pwned'
  evil = str(tmp_path / 'evil')
  _evil_dir(evil, marker, remote_code=False)
  from jaxft.train import loop
  monkeypatch.setattr(loop, 'train', lambda *a, **k: pytest.fail('reached training'))
  with pytest.raises(ValueError) as e:
    main_lib.run_stage(_finetune_config(tmp_path, evil), str(tmp_path / 'w'))
  msg = str(e.value)
  assert f'{evil}/pytorch_model.bin: refused to load' in msg, msg
  assert 'weights_only' in msg, msg
  assert not marker.exists(), 'code from the checkpoint directory ran'


def test_only_safe_formats_are_read(tmp_path):
  """A directory whose weights exist only as pickles (model.pkl, a .pt, a TF .h5) has no
  weights as far as jaxft is concerned: nothing is opened, nothing runs."""
  pytest.importorskip('torch')
  import torch
  from jaxft.models import hf
  marker = tmp_path / 'pwned'
  d = str(tmp_path / 'evil')
  _evil_dir(d, marker, remote_code=False)
  os.remove(os.path.join(d, 'pytorch_model.bin'))
  for name in ('model.pkl', 'pytorch_model.pt', 'tf_model.h5', 'flax_model.msgpack.pkl'):
    torch.save({'x': _Evil(marker)}, os.path.join(d, name))
  with pytest.raises(FileNotFoundError, match=r'no model\.safetensors / model\.safetensors\.'
                                              r'index\.json / pytorch_model\.bin'):
    hf.read_hf_weights(d)
  assert not marker.exists(), 'code from the checkpoint directory ran'


def _no_prompt(monkeypatch):
  """transformers asks on stdin whether to run a directory's code: that must never happen."""
  monkeypatch.setattr('builtins.input', lambda *a: pytest.fail(f'prompted on stdin: {a}'))


def test_remote_code_in_a_directory_is_refused_and_never_run(tmp_path, monkeypatch):
  """An `auto_map` (code shipped in the directory) is refused with an error naming the file,
  for a tokenizer and for a model: never imported, never a prompt on stdin."""
  pytest.importorskip('torch')
  from jaxft.data.tokenizer import load_tokenizer
  from jaxft.models import hf
  _no_prompt(monkeypatch)
  marker = tmp_path / 'pwned'
  d = str(tmp_path / 'evil')
  _evil_dir(d, marker)
  for path in (d, os.path.join(d, 'tokenizer.json')):
    with pytest.raises(ValueError, match=f'{d}/tokenizer_config.json: "auto_map" names code '
                                         r'\(tokenization_evil'):
      load_tokenizer(path)
  for load in (hf.load_hf_config, hf.from_pretrained, hf.read_hf_weights):
    with pytest.raises(ValueError, match=f'{d}/config.json: "auto_map" names code '
                                         r'\(modeling_evil'):
      load(d)
  assert not marker.exists(), 'code from the directory ran'


def test_remote_code_through_a_stage_is_refused_and_never_run(tmp_path, monkeypatch):
  pytest.importorskip('torch')
  _no_prompt(monkeypatch)
  marker = tmp_path / 'pwned'
  evil = str(tmp_path / 'evil')
  _evil_dir(evil, marker)
  from jaxft.train import loop
  monkeypatch.setattr(loop, 'train', lambda *a, **k: pytest.fail('reached training'))
  with pytest.raises(ValueError, match='"auto_map" names code') as e:
    main_lib.run_stage(_finetune_config(tmp_path, evil), str(tmp_path / 'w'))
  assert 'jaxft never runs code from a model or tokenizer directory' in str(e.value)
  assert not marker.exists(), 'code from the checkpoint directory ran'
