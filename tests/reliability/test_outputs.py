"""Output files are replaced whole: written to a temporary file renamed into place, so a
symlink at the output path is replaced (never followed: its target is not overwritten) and
a failure mid-write (a kill, a full disk, an error) leaves the previous file as it was."""
import json
import os

import pytest

from jaxft import generation, sources
from jaxft.models.config import ModelConfig


@pytest.fixture
def victim(tmp_path):
  path = tmp_path / 'victim.txt'
  path.write_text('not yours\n')
  return path


def _no_temporaries(directory):
  assert not [n for n in os.listdir(directory) if '.tmp' in n]


def test_generations_replace_a_symlink_and_a_failed_write_keeps_the_old_file(tmp_path, victim):
  out = tmp_path / 'generations.jsonl'
  out.symlink_to(victim)
  generation.write_generations(str(out), ['a[1]', 'b[2]'], ['One.', 'Two.'])
  assert victim.read_text() == 'not yours\n' and not out.is_symlink()
  before = out.read_bytes()
  assert [json.loads(x)['text'] for x in before.decode().splitlines()] == ['One.', 'Two.']

  def texts():
    yield 'Uno.'
    raise OSError('killed mid-write')
  with pytest.raises(OSError, match='killed mid-write'):
    generation.write_generations(str(out), ['a[1]', 'b[2]'], texts())
  assert out.read_bytes() == before
  _no_temporaries(tmp_path)


def test_labels_and_the_recorded_model_replace_a_symlink(tmp_path, victim):
  """labels.json and config.json (rewritten with the model built) of a training workdir."""
  mcfg = ModelConfig(model_type='bert', vocab_size=32, hidden_size=16, num_layers=1,
                     num_heads=2, intermediate_size=32, max_position_embeddings=16)
  (tmp_path / 'labels.json').symlink_to(victim)
  info = {'label_names': ['a', 'b'], 'metric_names': ['accuracy'], 'main_metric': 'accuracy'}
  sources.save_labels(str(tmp_path), sources.TaskInfo.of_data('cls', info, mcfg))
  assert json.loads((tmp_path / 'labels.json').read_text())['label_names'] == ['a', 'b']
  (tmp_path / 'config.json').write_text('{"stage": "finetune_cls"}')
  (tmp_path / 'config.json.tmp').symlink_to(victim)  # the name the old rewrite went through
  sources.record_model(str(tmp_path), mcfg)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['hidden_size'] == 16
  assert victim.read_text() == 'not yours\n'
  assert not (tmp_path / 'labels.json').is_symlink()


def test_the_tokenizer_directory_replaces_a_symlink(tmp_path):
  from jaxft.data.tokenizer import load_tokenizer
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  tok = load_tokenizer(os.path.join(repo, 'data', 'tokenizers', 'gpt2'))
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  (tmp_path / 'w').mkdir()
  (tmp_path / 'w' / 'tokenizer').symlink_to(elsewhere)
  sources.save_tokenizer(tok, str(tmp_path / 'w'), 64)
  assert os.listdir(elsewhere) == [] and not (tmp_path / 'w' / 'tokenizer').is_symlink()
  assert len(load_tokenizer(sources.tokenizer_dir(str(tmp_path / 'w')))) == len(tok)
  _no_temporaries(tmp_path / 'w')
