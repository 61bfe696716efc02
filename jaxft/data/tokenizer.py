"""Load and train tokenizers; always hand back a `transformers` fast tokenizer.

Everything downstream (packing, masking, fine-tuning readers) only needs the fast
tokenizer API plus the special-token ids, so every supported on-disk layout is turned
into one: a `tokenizer.json` directory (ours or Hugging Face's), a bare WordPiece
`vocab.txt`, or GPT-2 `vocab.json` + `merges.txt`.

Regenerate the bundled quick-start vocabulary with:
  python -m jaxft.data.tokenizer --kind wordpiece --vocab_size 8000 \
      --out data/tokenizers/quickstart-wordpiece data/corpus/*.txt
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Iterable, Sequence

from jaxft.files import InputError

BERT_SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
GPT2_EOS = '<|endoftext|>'


def load_tokenizer(path: str | os.PathLike):
  """Returns a transformers fast tokenizer for a directory or a single file.

  Looked for, in order: `tokenizer.json` (with `tokenizer_config.json` if present),
  a WordPiece `vocab.txt` (-> BertTokenizerFast), GPT-2 `vocab.json` + `merges.txt`
  (-> GPT2TokenizerFast). A tokenizer without a pad token gets pad = eos. A directory
  whose tokenizer_config.json (or config.json) names code to run (`auto_map`) is refused:
  nothing from it is imported, and transformers never asks on stdin.
  """
  path = os.fspath(path)
  if not path:
    raise ValueError('data.tokenizer is empty: give a tokenizer directory or file')
  if not os.path.exists(path):
    raise FileNotFoundError(f'tokenizer path {path!r} does not exist')
  d = path if os.path.isdir(path) else os.path.dirname(path) or '.'
  refuse_remote_code(os.path.join(d, 'tokenizer_config.json'))
  refuse_remote_code(os.path.join(d, 'config.json'), only='AutoTokenizer')
  if os.path.isdir(path):
    tok = _load_dir(path)
  else:
    tok = _load_file(path)
  return _finish(tok)


def _load_dir(d: str):
  has = lambda name: os.path.isfile(os.path.join(d, name))
  if has('tokenizer.json'):
    if has('tokenizer_config.json'):
      return _load_pretrained_dir(d)
    return _from_tokenizer_json(os.path.join(d, 'tokenizer.json'))
  if has('vocab.txt'):
    return _bert_from_vocab(os.path.join(d, 'vocab.txt'))
  if has('vocab.json') and has('merges.txt'):
    return _gpt2_from_files(os.path.join(d, 'vocab.json'), os.path.join(d, 'merges.txt'))
  found = sorted(os.listdir(d))[:20]
  raise FileNotFoundError(
      f'no usable tokenizer in directory {d!r}: expected tokenizer.json, vocab.txt '
      f'(WordPiece) or vocab.json + merges.txt (GPT-2 BPE); found {found}')


def _load_file(f: str):
  name = os.path.basename(f)
  d = os.path.dirname(f) or '.'
  if name == 'vocab.json' or name == 'merges.txt':
    vocab, merges = os.path.join(d, 'vocab.json'), os.path.join(d, 'merges.txt')
    for need in (vocab, merges):
      if not os.path.isfile(need):
        raise FileNotFoundError(
            f'tokenizer {f!r}: GPT-2 BPE needs both vocab.json and merges.txt; '
            f'{need!r} is missing')
    return _gpt2_from_files(vocab, merges)
  if name.endswith('.json'):
    if name == 'tokenizer.json' and os.path.isfile(os.path.join(d, 'tokenizer_config.json')):
      return _load_pretrained_dir(d)
    return _from_tokenizer_json(f)
  if name.endswith('.txt'):
    return _bert_from_vocab(f)
  raise ValueError(
      f'tokenizer file {f!r} is not a tokenizer.json, vocab.txt, vocab.json or merges.txt')


def refuse_remote_code(config_file: str, what: str = 'tokenizer', only: str | None = None
                       ) -> None:
  """InputError when a config file (tokenizer_config.json, config.json) has an `auto_map`
  (its entry `only`, when given): code shipped in the directory that transformers would
  import, or ask about on stdin."""
  if not os.path.isfile(config_file):
    return
  with open(config_file, encoding='utf-8') as f:
    try:
      auto_map = json.load(f).get('auto_map')
    except (ValueError, AttributeError):
      return  # not a JSON object: whoever reads it next reports that
  if auto_map and only is not None:
    auto_map = {only: auto_map[only]} if isinstance(auto_map, dict) and only in auto_map else {}
  if auto_map:
    modules = sorted({str(v).split('.')[0] for v in _flat_values(auto_map)})
    raise InputError(
        f'{config_file}: "auto_map" names code ({", ".join(modules)}) to run for this '
        f'{what}; jaxft never runs code from a model or tokenizer directory. Use a directory '
        f'without custom code (or remove "auto_map" if the files hold a standard {what})')


def _flat_values(d):
  for v in (d.values() if isinstance(d, dict) else d):
    if isinstance(v, (dict, list, tuple)):
      yield from _flat_values(v)
    elif v:
      yield v


def _load_pretrained_dir(d: str):
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  try:
    return AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
  except Exception:  # an unknown tokenizer_class: the tokenizer.json alone still works
    return PreTrainedTokenizerFast.from_pretrained(d, local_files_only=True,
                                                   trust_remote_code=False)


def _from_tokenizer_json(f: str):
  """A bare tokenizer.json: special tokens are recognised by their usual spellings."""
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  try:
    backend = Tokenizer.from_file(f)
  except Exception as e:
    raise ValueError(f'tokenizer file {f!r} is not a valid tokenizer.json: {e}') from e
  vocab = backend.get_vocab()
  kwargs = {}
  if '[CLS]' in vocab:
    kwargs.update({k: v for k, v in zip(
        ('pad_token', 'unk_token', 'cls_token', 'sep_token', 'mask_token'),
        BERT_SPECIAL_TOKENS) if v in vocab})
  elif GPT2_EOS in vocab:
    kwargs.update(bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS)
  elif '<s>' in vocab and '</s>' in vocab:  # RoBERTa-style
    kwargs.update({k: v for k, v in dict(
        bos_token='<s>', eos_token='</s>', cls_token='<s>', sep_token='</s>',
        pad_token='<pad>', unk_token='<unk>', mask_token='<mask>').items() if v in vocab})
  return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _bert_from_vocab(f: str):
  from transformers import BertTokenizerFast
  with open(f, encoding='utf-8') as fh:
    tokens = [line.rstrip('\n') for line in fh]
  if '[UNK]' not in tokens:
    raise ValueError(f'tokenizer file {f!r} has no [UNK] entry: not a WordPiece vocab.txt')
  lower = _bert_lowercase(os.path.dirname(f), tokens)
  # Positional vocab: transformers>=5 ignores a `vocab_file=` keyword.
  return BertTokenizerFast(f, do_lower_case=lower)


def _bert_lowercase(d: str, tokens: Sequence[str]) -> bool:
  """do_lower_case from tokenizer_config.json, else guessed: a cased vocab has A-Z tokens."""
  cfg = os.path.join(d, 'tokenizer_config.json')
  if os.path.isfile(cfg):
    with open(cfg, encoding='utf-8') as fh:
      value = json.load(fh).get('do_lower_case')
    if value is not None:
      return bool(value)
  upper = sum(1 for t in tokens if not t.startswith('[') and any('A' <= c <= 'Z' for c in t))
  return upper < max(10, len(tokens) // 200)


def _gpt2_from_files(vocab: str, merges: str):
  from transformers import GPT2TokenizerFast
  special = {}
  smap = os.path.join(os.path.dirname(vocab), 'special_tokens_map.json')
  if os.path.isfile(smap):
    with open(smap, encoding='utf-8') as fh:
      special = {k: v if isinstance(v, str) else v.get('content')
                 for k, v in json.load(fh).items()
                 if k in ('bos_token', 'eos_token', 'unk_token', 'pad_token')}
  # Positional paths: transformers>=5 ignores vocab_file=/merges_file= keywords.
  return GPT2TokenizerFast(vocab, merges, **special)


def _finish(tok):
  if getattr(tok, 'is_fast', True) is False:
    raise ValueError(f'{type(tok).__name__} is not a fast tokenizer')
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


def save_tokenizer(tokenizer, out_dir: str | os.PathLike, max_length: int | None = None):
  """`save_pretrained(out_dir)`, recording the model's real input limit.

  `max_length` (the model's position count) caps `model_max_length` in the saved
  tokenizer_config.json: a `transformers` pipeline then truncates where the model's
  positions end instead of indexing past them. The tokenizer object is not changed.
  """
  out_dir = os.fspath(out_dir)
  tokenizer.save_pretrained(out_dir)
  if not max_length:
    return
  path = os.path.join(out_dir, 'tokenizer_config.json')
  with open(path, encoding='utf-8') as f:
    conf = json.load(f)
  own = conf.get('model_max_length') or getattr(tokenizer, 'model_max_length', None)
  conf['model_max_length'] = int(min(own, max_length) if own else max_length)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(conf, f, indent=2, ensure_ascii=False)
    f.write('\n')


def _expand(files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  out = []
  for pattern in files:
    pattern = os.fspath(pattern)
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches or not all(os.path.isfile(m) for m in matches):
      raise FileNotFoundError(f'tokenizer training file(s) {pattern!r} not found')
    out.extend(matches)
  if not out:
    raise ValueError('train_tokenizer: no training files given')
  return out


def train_tokenizer(files, kind: str = 'wordpiece', vocab_size: int = 8000,
                    out_dir: str | os.PathLike | None = None, lowercase: bool | None = None,
                    min_frequency: int = 2, model_max_length: int = 512,
                    show_progress: bool = False):
  """Trains a WordPiece (BERT-style) or byte-level BPE (GPT-2-style) tokenizer.

  `files` are plain-text paths or globs (the trainer reads them line by line).
  lowercase=None means True for wordpiece and False for bpe (byte-level BPE is
  meant to round-trip text exactly). Saved with `save_pretrained` into `out_dir`
  (plus a `vocab.txt` for wordpiece, readable by any BERT tokenizer), so that
  `load_tokenizer(out_dir)` gives the same tokenizer back. Returns the tokenizer.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import processors, trainers
  from transformers import PreTrainedTokenizerFast

  paths = _expand(files)
  if kind == 'wordpiece':
    lowercase = True if lowercase is None else lowercase
    tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=list(BERT_SPECIAL_TOKENS), continuing_subword_prefix='##',
        show_progress=show_progress)
    tok.train(paths, trainer)
    cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS]:0 $A:0 [SEP]:0', pair='[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1',
        special_tokens=[('[CLS]', cls), ('[SEP]', sep)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
        sep_token='[SEP]', mask_token='[MASK]', model_max_length=model_max_length,
        do_lower_case=lowercase)
  elif kind == 'bpe':
    lowercase = False if lowercase is None else lowercase
    tok = Tokenizer(models.BPE())
    if lowercase:
      tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train(paths, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
        pad_token=GPT2_EOS, model_max_length=model_max_length)
  else:
    raise ValueError(f"train_tokenizer: kind must be 'wordpiece' or 'bpe', got {kind!r}")

  if out_dir is not None:
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    if kind == 'wordpiece':
      vocab = tok.get_vocab()
      with open(os.path.join(out_dir, 'vocab.txt'), 'w', encoding='utf-8') as fh:
        for token in sorted(vocab, key=vocab.get):
          fh.write(token + '\n')
  return fast


def main(argv=None):
  p = argparse.ArgumentParser(description='Train a WordPiece or byte-level BPE tokenizer.')
  p.add_argument('files', nargs='+', help='plain-text training files or globs')
  p.add_argument('--kind', default='wordpiece', choices=['wordpiece', 'bpe'])
  p.add_argument('--vocab_size', type=int, default=8000)
  p.add_argument('--min_frequency', type=int, default=2)
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--cased', action='store_true', help='do not lowercase (wordpiece)')
  args = p.parse_args(argv)
  tok = train_tokenizer(args.files, kind=args.kind, vocab_size=args.vocab_size,
                        out_dir=args.out, lowercase=False if args.cased else None,
                        min_frequency=args.min_frequency, show_progress=True)
  print(f'wrote {args.out}: {len(tok)} tokens')


if __name__ == '__main__':
  main()
