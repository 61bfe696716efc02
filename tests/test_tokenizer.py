"""Tokenizers: trained ones round-trip, bundled ones match `transformers` exactly."""
import json
import shutil
from pathlib import Path

import pytest
from transformers import BertTokenizerFast

from jaxft.data.tokenizer import load_tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[1] / 'data'
CORPUS = DATA / 'corpus'
TOKENIZERS = DATA / 'tokenizers'

SENTENCES = [
    'Hello world, unaffable!',
    'The quick brown fox jumps over the lazy dog.',
    "Don't stop -- it's 3.14159 at 10:30pm; e-mail me@example.com.",
    'Café naïve résumé Ærøskøbing',
    '日本語のテキストと中文 mixed with English',
    '   leading and trailing   whitespace\tand\ttabs\n\nnewlines   ',
    'UPPER CASE and MiXeD CaSe tokens like McDonald and iPhone',
    '"Quotes," (parentheses) [brackets] {braces} <angles> #hash $100 50% & more...',
    'Emoji 😀 and symbols ™ © ° ± →',
    '',
]


def _lines(path, n, start=100):
  lines = [l.strip() for l in path.read_text(encoding='utf-8').splitlines() if l.strip()]
  return lines[start:start + n]


@pytest.fixture(scope='module')
def wordpiece_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('wordpiece')
  train_tokenizer([CORPUS / 'shakespeare-hamlet.txt', CORPUS / 'blake-poems.txt'],
                  kind='wordpiece', vocab_size=1500, out_dir=out)
  return out


@pytest.fixture(scope='module')
def bpe_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('bpe')
  train_tokenizer(str(CORPUS / 'shakespeare-*.txt'), kind='bpe', vocab_size=1000, out_dir=out)
  return out


def test_trained_wordpiece_round_trips_corpus_text(wordpiece_dir):
  tok = load_tokenizer(wordpiece_dir)
  assert tok.is_fast
  assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id] == [0, 1, 2, 3, 4]
  assert len(tok) == 1500
  for line in _lines(CORPUS / 'shakespeare-hamlet.txt', 40):
    ids = tok(line)['input_ids']
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids, line
    text = tok.decode(ids, skip_special_tokens=True)
    assert ''.join(text.split()) == ''.join(line.lower().split())
    assert tok(text)['input_ids'] == ids
  # vocab.txt is written too, and a plain BERT tokenizer built from it agrees.
  bert = BertTokenizerFast(str(wordpiece_dir / 'vocab.txt'))
  for line in _lines(CORPUS / 'blake-poems.txt', 20):
    assert bert(line)['input_ids'] == tok(line)['input_ids']


def test_trained_bpe_round_trips_exactly(bpe_dir):
  tok = load_tokenizer(bpe_dir)
  assert tok.eos_token == '<|endoftext|>' and tok.pad_token_id == tok.eos_token_id
  assert len(tok) == 1000
  for text in _lines(CORPUS / 'shakespeare-hamlet.txt', 20) + SENTENCES:
    ids = tok(text)['input_ids']
    assert tok.eos_token_id not in ids  # no special tokens added
    assert tok.decode(ids) == text


def test_bundled_quickstart_wordpiece():
  tok = load_tokenizer(TOKENIZERS / 'quickstart-wordpiece')
  assert len(tok) == 8000
  assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id] == [0, 1, 2, 3, 4]
  vocab = (TOKENIZERS / 'quickstart-wordpiece' / 'vocab.txt').read_text(encoding='utf-8')
  assert vocab.splitlines() == sorted(tok.get_vocab(), key=tok.get_vocab().get)
  for line in _lines(CORPUS / 'austen-emma.txt', 20):
    ids = tok(line)['input_ids']
    assert tok.unk_token_id not in ids
    assert ''.join(tok.decode(ids, skip_special_tokens=True).split()) == ''.join(
        line.lower().split())


def test_bundled_bert_vocab_matches_transformers():
  vocab_file = TOKENIZERS / 'bert-base-uncased' / 'vocab.txt'
  ours = load_tokenizer(TOKENIZERS / 'bert-base-uncased')
  ours_file = load_tokenizer(vocab_file)
  ref = BertTokenizerFast(str(vocab_file))
  assert len(ours) == len(ref) == 30522
  assert ours('Hello world, unaffable!')['input_ids'] == [
      101, 7592, 2088, 1010, 14477, 20961, 3468, 999, 102]
  for s in SENTENCES + _lines(CORPUS / 'chesterton-brown.txt', 30):
    assert ours(s)['input_ids'] == ref(s)['input_ids'], s
    assert ours_file(s)['input_ids'] == ref(s)['input_ids'], s
  pair = ours('first part', 'second part')
  assert pair['input_ids'] == ref('first part', 'second part')['input_ids']
  assert pair['token_type_ids'] == ref('first part', 'second part')['token_type_ids']
  for name in ('cls', 'sep', 'pad', 'mask', 'unk'):
    assert getattr(ours, f'{name}_token_id') == getattr(ref, f'{name}_token_id')


def test_bundled_gpt2_round_trips():
  tok = load_tokenizer(TOKENIZERS / 'gpt2')
  from_file = load_tokenizer(TOKENIZERS / 'gpt2' / 'vocab.json')
  assert tok('Hello world')['input_ids'] == [15496, 995]
  assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256 and len(tok) == 50257
  for text in SENTENCES + _lines(CORPUS / 'kjv-genesis-exodus.txt', 20):
    ids = tok(text)['input_ids']
    assert tok.decode(ids) == text
    assert from_file(text)['input_ids'] == ids


def test_bare_tokenizer_json_gets_special_tokens(wordpiece_dir, bpe_dir, tmp_path):
  for src, kind in ((wordpiece_dir, 'wordpiece'), (bpe_dir, 'bpe')):
    bare = tmp_path / kind
    bare.mkdir()
    shutil.copy(src / 'tokenizer.json', bare / 'tokenizer.json')
    tok = load_tokenizer(bare / 'tokenizer.json')
    ref = load_tokenizer(src)
    assert tok('To be, or not to be')['input_ids'] == ref('To be, or not to be')['input_ids']
    if kind == 'wordpiece':
      assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id) == (
          2, 3, 4, 0)
    else:
      assert tok.eos_token_id == tok.pad_token_id == ref.eos_token_id


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope'):
    load_tokenizer(tmp_path / 'nope')
  empty = tmp_path / 'empty_dir'
  empty.mkdir()
  (empty / 'README').write_text('x')
  with pytest.raises(FileNotFoundError, match='empty_dir.*README'):
    load_tokenizer(empty)
  half = tmp_path / 'half_gpt2'
  half.mkdir()
  (half / 'vocab.json').write_text(json.dumps({'a': 0}))
  with pytest.raises(FileNotFoundError, match='merges.txt'):
    load_tokenizer(half / 'vocab.json')
  with pytest.raises(FileNotFoundError, match='half_gpt2'):
    load_tokenizer(half)
  with pytest.raises(ValueError, match='kind'):
    train_tokenizer(str(CORPUS / 'blake-poems.txt'), kind='unigram', vocab_size=100)
