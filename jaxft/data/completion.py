"""(prompt, completion) pairs for causal-LM fine-tuning and generation (data-to-text, summaries,
translation, instructions).

Sources: csv / tsv / jsonl files (one pair per row, columns `data.prompt_column` and
`data.completion_column`), a txt file (one prompt per line, for generation), or HF
`datasets` (`data.source='hf'`). A row becomes

  tokens(template with {prompt} filled in) + tokens(completion_prefix + completion) + EOS

tokenized in two parts, so the prompt tokens at generation time are exactly the ones
trained on. The loss is on the completion tokens (and the EOS that ends them) only, unless
`data.loss_on_prompt`. `labels[t]` is the target of position t (already shifted: the next
token, or -100 = no loss).

Packing (`data.packing`) fills each row of `max_len` tokens with several examples, with
`segment_ids` (1, 2, ... per example, 0 on padding) and `position_ids` restarting at 0 for
each example: the model attends within a segment only, so a packed row computes what its
examples compute alone (tests/test_completion.py).

Many corpora have several completions per prompt (E2E: ~8.5 references per meaning
representation). The validation part is split by distinct prompt, never by row
(`split_by_prompt`), and generation runs once per distinct prompt, scored against all its
completions (`group_by_prompt`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import logging

from jaxft.data.splits import (IGNORE_INDEX, SKIP_HINT, BadRows, MissingSplitError, TaskData,
                               bad_bytes, check_truncation, hf_column, hf_load, hf_split_name,
                               no_rows_message, normalize_split, open_text, split_file)
from jaxft.files import InputError

FORMATS = ('csv', 'tsv', 'jsonl', 'txt')
# One `slot[value]` item of a structured prompt (E2E's meaning representations:
# 'name[The Eagle], eatType[coffee shop], customer rating[5 out of 5]').
SLOT_NAME = re.compile(r'[^\[\],]*[^\[\],\s][^\[\],]*')
_SLOT_ITEM = re.compile(r'\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(?:,|$)')


@dataclasses.dataclass(frozen=True)
class CompletionData(TaskData):
  """The `data` section of LM fine-tuning on (prompt, completion) pairs (files or HF
  datasets as for every task: data.source, path, *_file, hf_*)."""
  format: str = 'auto'            # auto (from the extension) | csv | tsv | jsonl | txt
  prompt_column: str = 'prompt'  # csv / tsv header, jsonl key or HF column of the prompts
  completion_column: str = 'completion'  # ... of the completions
  template: str = '{prompt}'      # the prompt as the model sees it; must contain {prompt}
  completion_prefix: str = ' '    # put before the completion (GPT-2 BPE words start with a space)
  append_eos: bool = True         # end every completion with the tokenizer's EOS
  loss_on_prompt: bool = False    # also score the prompt tokens
  packing: bool = False           # several examples per row (segment_ids, position_ids)
  dev_fraction: float = 0.0       # no dev split: hold out this share of distinct prompts
  split_seed: int = 0             # of the dev_fraction hold-out and the packing order
  dev_holdout_field: str = ''     # dev_fraction holds out whole values of this slot
  delexicalize: tuple = ()        # slots whose values become placeholders (X-name), put back

  def __post_init__(self):
    super().__post_init__()
    if self.class_balance != 'none':
      raise ValueError(f"data.class_balance={self.class_balance!r}: (prompt, completion) pairs "
                       "have no classes; leave it 'none'")
    if self.format != 'auto' and self.format not in FORMATS:
      raise ValueError(f"data.format must be 'auto' or one of {FORMATS}, got {self.format!r}")
    if '{prompt}' not in self.template:
      raise ValueError(f'data.template={self.template!r} must contain {{prompt}}')
    if not 0 <= self.dev_fraction < 1:
      raise ValueError(f'data.dev_fraction={self.dev_fraction} must be in [0, 1)')
    for field in self.delexicalize:
      if not isinstance(field, str) or not SLOT_NAME.fullmatch(field):
        raise ValueError(f'data.delexicalize={self.delexicalize!r}: each entry is a slot name '
                         "of `slot[value]` prompts, like 'name'")
    if not self.prompt_column or not self.completion_column:
      raise ValueError('data.prompt_column and data.completion_column must be set')
    if self.source == 'hf' and not self.hf_path:
      raise ValueError("data.source='hf' needs data.hf_path (a hub name, a local builder like "
                       'csv or json, or a save_to_disk folder)')


@dataclasses.dataclass
class Pairs:
  """Rows of one split: prompts, completions (None: prompts only) and 'file:line' sources."""
  prompts: list[str]
  completions: list[str] | None
  sources: list[str]

  def __len__(self):
    return len(self.prompts)

  def subset(self, idx) -> 'Pairs':
    return Pairs([self.prompts[i] for i in idx],
                 None if self.completions is None else [self.completions[i] for i in idx],
                 [self.sources[i] for i in idx])


# ----------------------------------------------------------------------------------- read

def file_format(path: Path, fmt: str = 'auto') -> str:
  if fmt != 'auto':
    if fmt not in FORMATS:
      raise ValueError(f"data.format must be 'auto' or one of {FORMATS}, got {fmt!r}")
    return fmt
  by_suffix = {'.csv': 'csv', '.tsv': 'tsv', '.jsonl': 'jsonl', '.json': 'jsonl',
               '.ndjson': 'jsonl', '.txt': 'txt'}
  if path.suffix.lower() not in by_suffix:
    raise InputError(f'{path}: cannot tell the format from the extension; set data.format '
                     f'to one of {FORMATS}')
  return by_suffix[path.suffix.lower()]


def read_pairs_file(path, *, prompt_column: str = 'prompt',
                    completion_column: str | None = 'completion', fmt: str = 'auto',
                    on_bad_row: str = 'error', require_completion: bool = True,
                    bad_row_hint: str = SKIP_HINT) -> Pairs:
  """A csv / tsv / jsonl / txt file -> Pairs. Problems name file, line and column (and
  `bad_row_hint`, what to do about a bad row).

  Without the completion column (or for txt: one prompt per non-blank line) the pairs have
  `completions=None`, unless `require_completion`."""
  path = Path(path)
  fmt = file_format(path, fmt)
  bad = BadRows(on_bad_row, bad_row_hint)
  prompts, completions, sources = [], [], []
  with_completion = completion_column is not None and fmt != 'txt'

  def add(where, prompt, completion):
    why = bad_bytes(f'{prompt} {completion if with_completion else ""}')
    if why is not None:
      return bad(where, 'bad_encoding', why)
    if prompt is None or not str(prompt).strip():
      return bad(where, 'empty_prompt', f'empty prompt in column {prompt_column!r}')
    if with_completion and (completion is None or not str(completion).strip()):
      return bad(where, 'empty_completion', f'empty completion in column {completion_column!r}')
    prompts.append(str(prompt).strip())
    completions.append(str(completion).strip() if with_completion else None)
    sources.append(where)

  with open_text(path, newline='' if fmt in ('csv', 'tsv') else None) as f:
    if fmt == 'txt':
      for lineno, line in enumerate(f, 1):
        if line.strip():
          add(f'{path}:{lineno}', line, None)
    elif fmt == 'jsonl':
      rows = []
      for lineno, line in enumerate(f, 1):
        where = f'{path}:{lineno}'
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          bad(where, 'bad_row', f'invalid JSON ({e.msg})')
          continue
        if not isinstance(row, dict):
          bad(where, 'bad_row', f'expected a JSON object, got {type(row).__name__}')
          continue
        rows.append((where, row))
      if with_completion and not require_completion:
        with_completion = _references_on_every_row(rows, completion_column)
      for where, row in rows:
        missing = [c for c in (prompt_column, completion_column if with_completion else None)
                   if c is not None and c not in row]
        if missing:
          bad(where, 'bad_row', f'missing key(s) {missing}')
          continue
        add(where, row[prompt_column], row.get(completion_column) if with_completion else None)
    else:
      reader = csv.reader(f, **(dict(delimiter='\t', quoting=csv.QUOTE_NONE) if fmt == 'tsv'
                                 else dict(delimiter=',')))
      header = [h.strip() for h in next(reader, [])]
      with_completion = _check_header(path, header, prompt_column, completion_column,
                                      with_completion, require_completion)
      pi = header.index(prompt_column)
      ci = header.index(completion_column) if with_completion else None
      for row in reader:
        where = f'{path}:{reader.line_num}'
        if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
          continue
        if len(row) != len(header):
          bad(where, 'bad_columns', f'expected {len(header)} columns, got {len(row)}'
              + (' (quote characters are literal in .tsv files)' if fmt == 'tsv' else ''))
          continue
        add(where, row[pi], row[ci] if with_completion else None)
  if bad.counts:
    logging.warning('%s: skipped %d bad rows %s', path, sum(bad.counts.values()), dict(bad.counts))
  if require_completion and not with_completion:
    raise InputError(f'{path}: no completions (column {completion_column!r}) to train on')
  if require_completion and not prompts:
    raise InputError(no_rows_message(path, bad))
  return Pairs(prompts, completions if with_completion else None, sources)


def _references_on_every_row(rows: list[tuple[str, dict]], completion_column: str) -> bool:
  """Whether jsonl rows of prompts carry references: on every row (True) or on none (False).
  Some but not all is refused naming the first row without one: reading the file as prompts
  only would drop every reference unscored, and scoring a subset would score another file."""
  lacking = [where for where, row in rows if completion_column not in row]
  if not lacking or len(lacking) == len(rows):
    return not lacking
  raise InputError(f'{lacking[0]}: no {completion_column!r} (a reference) on this row, but '
                   f'{len(rows) - len(lacking)} of the {len(rows)} rows have one: give every '
                   f'row a {completion_column!r} to score the outputs, or none to only generate')


def _check_header(path, header: list[str], prompt_column: str, completion_column: str | None,
                  with_completion: bool, require_completion: bool) -> bool:
  """Raises naming the file for a header without the columns; whether completions are read."""
  if bad_bytes(' '.join(header)):
    raise InputError(f'{path}:1: header: {bad_bytes(" ".join(header))}')
  if not header:
    raise InputError(f'{path}:1: empty file, expected a header row')
  if prompt_column not in header:
    raise InputError(f'{path}:1: data.prompt_column={prompt_column!r} is not a column; '
                     f'columns are {header}')
  if with_completion and completion_column not in header:
    if require_completion:
      raise InputError(f'{path}:1: data.completion_column={completion_column!r} is not a '
                       f'column; columns are {header}')
    return False
  return with_completion


def read_pairs_hf(dataset, *, prompt_column: str, completion_column: str | None,
                  on_bad_row: str = 'error', require_completion: bool = True,
                  name: str = 'hf') -> Pairs:
  """A `datasets.Dataset` -> Pairs; rows are named '<name>[row i]' in errors."""
  cols = dataset.column_names
  if prompt_column not in cols:
    raise InputError(f'{name}: data.prompt_column={prompt_column!r} is not a column; '
                     f'columns are {cols}')
  with_completion = completion_column is not None and completion_column in cols
  if require_completion and not with_completion:
    raise InputError(f'{name}: data.completion_column={completion_column!r} is not a column; '
                     f'columns are {cols}')
  bad = BadRows(on_bad_row)
  ps = hf_column(dataset, prompt_column)
  cs = hf_column(dataset, completion_column) if with_completion else [None] * len(ps)
  out = Pairs([], [] if with_completion else None, [])
  for i, (p, c) in enumerate(zip(ps, cs)):
    where = f'{name}[row {i}]'
    if p is None or not str(p).strip():
      bad(where, 'empty_prompt', f'empty prompt in column {prompt_column!r}')
      continue
    if with_completion and (c is None or not str(c).strip()):
      bad(where, 'empty_completion', f'empty completion in column {completion_column!r}')
      continue
    out.prompts.append(str(p).strip())
    out.sources.append(where)
    if with_completion:
      out.completions.append(str(c).strip())
  return out


def read_split(data: CompletionData, split: str, *, require_completion: bool = True) -> Pairs:
  """One split named by the data section (data.<split>_file under data.path, or an HF split)."""
  split = normalize_split(split)
  kw = dict(prompt_column=data.prompt_column, completion_column=data.completion_column or None,
            on_bad_row=data.on_bad_row, require_completion=require_completion)
  if data.source == 'hf':
    ds, where = hf_load(data, hf_split_name(data, split, None), data.hf_path,
                        data.hf_name or None)
    return read_pairs_hf(ds, name=where, **kw)
  return read_pairs_file(split_file(data, split, {}), fmt=data.format, **kw)


def load_splits(data: CompletionData) -> tuple[Pairs, Pairs | None, dict]:
  """(train, dev or None, info) for LM fine-tuning: dev from data.dev_file, else a seeded
  `data.dev_fraction` of the distinct training prompts, else none."""
  train = read_split(data, 'train')
  dev = None
  if data.dev_file or data.source == 'hf':
    try:
      dev = read_split(data, 'dev')
    except MissingSplitError:
      dev = None
  if dev is None and data.dev_fraction > 0:
    if data.dev_holdout_field:
      train, dev = split_by_field(train, data.dev_holdout_field, data.dev_fraction,
                                  data.split_seed)
    else:
      train, dev = split_by_prompt(train, data.dev_fraction, data.split_seed)
  info = {'n_train_rows': len(train), 'n_train_prompts': len(set(train.prompts)),
          'n_dev_rows': len(dev) if dev is not None else 0,
          'n_dev_prompts': len(set(dev.prompts)) if dev is not None else 0}
  logging.info('LM fine-tuning data: %s', info)
  return train, dev, info


# ------------------------------------------------------------------------- by prompt

def group_by_prompt(pairs: Pairs) -> tuple[list[str], list[list[str]], list[str]]:
  """(distinct prompts in first-seen order, all completions of each, first source of each)."""
  order: dict[str, int] = {}
  refs: list[list[str]] = []
  sources: list[str] = []
  for i, p in enumerate(pairs.prompts):
    if p not in order:
      order[p] = len(order)
      refs.append([])
      sources.append(pairs.sources[i])
    if pairs.completions is not None:
      refs[order[p]].append(pairs.completions[i])
  return list(order), refs, sources


def split_by_prompt(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
  """(train, dev): a seeded random `fraction` of the distinct prompts with all their rows
  goes to dev, so no prompt is on both sides."""
  if not 0 < fraction < 1:
    raise ValueError(f'data.dev_fraction={fraction} must be in (0, 1)')
  distinct, _, _ = group_by_prompt(pairs)
  n_dev = max(1, int(round(fraction * len(distinct))))
  if n_dev >= len(distinct):
    raise ValueError(f'data.dev_fraction={fraction} leaves no training prompt '
                     f'({len(distinct)} distinct prompts)')
  chosen = set(np.random.RandomState(seed).permutation(len(distinct))[:n_dev].tolist())
  dev_prompts = {distinct[i] for i in chosen}
  is_dev = [p in dev_prompts for p in pairs.prompts]
  return (pairs.subset([i for i, d in enumerate(is_dev) if not d]),
          pairs.subset([i for i, d in enumerate(is_dev) if d]))


def _slot_matches(prompt: str) -> list[re.Match] | None:
  matches, at = [], 0
  while at < len(prompt):
    m = _SLOT_ITEM.match(prompt, at)
    if m is None or m.end() == at:
      return None
    matches.append(m)
    at = m.end()
  return matches or None


def parse_slots(prompt: str) -> list[tuple[str, str]] | None:
  """'name[The Eagle], food[French]' -> [('name', 'The Eagle'), ('food', 'French')]: the
  `slot[value]` items of a structured prompt in order, or None when the prompt is not
  entirely such items (free text)."""
  matches = _slot_matches(prompt)
  return None if matches is None else [(m.group(1), m.group(2).strip()) for m in matches]


def slot_value(prompt: str, field: str) -> str | None:
  """The value of `field` in a `slot[value]` prompt (the first, if repeated), else None."""
  for name, value in parse_slots(prompt) or ():
    if name == field:
      return value
  return None


def split_by_field(pairs: Pairs, field: str, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
  """(train, dev): whole values of the slot `field` go to dev, in a seeded order, until the
  dev side holds `fraction` of the distinct prompts, so no value of `field` is on both
  sides (E2E: restaurants never trained on, as the official test set has). A prompt
  without the slot is a group of its own. InputError when no prompt has the slot, or
  when it has a single value (nothing could be held out)."""
  if not 0 < fraction < 1:
    raise ValueError(f'data.dev_fraction={fraction} must be in (0, 1)')
  distinct, _, where = group_by_prompt(pairs)
  keys = [slot_value(p, field) for p in distinct]
  if all(k is None for k in keys):
    raise InputError(f'{where[0]}: data.dev_holdout_field={field!r}: no prompt has a '
                     f'`{field}[...]` item (e.g. {distinct[0][:80]!r})')
  groups: dict[tuple, list[str]] = {}
  for p, k in zip(distinct, keys):
    groups.setdefault(('value', k) if k is not None else ('prompt', p), []).append(p)
  if len(groups) < 2:
    raise InputError(f'{where[0]}: data.dev_holdout_field={field!r} has one value only '
                     f'({keys[0]!r}): nothing to hold out')
  order = list(groups)
  target = max(1, int(round(fraction * len(distinct))))
  dev_prompts: set[str] = set()
  for i in np.random.RandomState(seed).permutation(len(order)).tolist():
    if len(dev_prompts) >= target:
      break
    if len(dev_prompts) + len(groups[order[i]]) < len(distinct):  # keep a training side
      dev_prompts.update(groups[order[i]])
  is_dev = [p in dev_prompts for p in pairs.prompts]
  held = [k[1] for k in order if k[0] == 'value' and groups[k][0] in dev_prompts]
  logging.info('data.dev_holdout_field=%r: %d of %d values held out (%d of %d prompts): %s',
               field, len(held), sum(k[0] == 'value' for k in order), len(dev_prompts),
               len(distinct), ', '.join(held[:10]) + (' ...' if len(held) > 10 else ''))
  return (pairs.subset([i for i, d in enumerate(is_dev) if not d]),
          pairs.subset([i for i, d in enumerate(is_dev) if d]))


# ---------------------------------------------------------------------- delexicalisation

@dataclasses.dataclass(frozen=True)
class Delexicalizer:
  """Values of chosen slots of `slot[value]` prompts replaced by placeholders (`X-name`) in
  the prompt and in its completion, and put back into generated text: a model cannot copy
  a restaurant it never saw, but it can copy `X-name`.

  The completion's exact (case-sensitive) occurrences of the prompt's values are replaced,
  longest value first, so put_back(completion(c, values), values) == c for every text that
  holds no placeholder (data that does is refused: it could not be told apart)."""
  fields: tuple = ()

  def placeholder(self, field: str) -> str:
    return 'X-' + re.sub(r'\s+', '_', field.strip())

  def __bool__(self):
    return bool(self.fields)

  def check(self, text: str, where: str) -> None:
    """InputError for raw text that already holds a placeholder."""
    for f in self.fields:
      if self.placeholder(f) in text:
        raise InputError(f'{where}: the text holds {self.placeholder(f)!r}, the placeholder '
                         f'of data.delexicalize={f!r}: it would be read back as a value')

  def prompt(self, prompt: str) -> tuple[str, dict[str, str]]:
    """(the prompt with the chosen slots' values replaced in place, {placeholder: value});
    a slot given twice keeps its second, different value."""
    matches = _slot_matches(prompt) if self.fields else None
    if matches is None:
      return prompt, {}
    values, out, at = {}, [], 0
    for m in matches:
      value = m.group(2).strip()
      if m.group(1) not in self.fields or not value:
        continue
      ph = self.placeholder(m.group(1))
      if values.setdefault(ph, value) != value:
        continue
      start = m.start(2) + m.group(2).index(value)
      out += [prompt[at:start], ph]
      at = start + len(value)
    return ''.join(out + [prompt[at:]]), values

  def completion(self, text: str, values: dict[str, str]) -> str:
    """`text` with each value of `values` replaced by its placeholder."""
    return _replace_all(text, {v: k for k, v in reversed(values.items())})

  def put_back(self, text: str, values: dict[str, str]) -> str:
    """Generated text with each placeholder replaced by its value (a placeholder of a slot
    the prompt lacks stays as it is)."""
    return _replace_all(text, values)


def _replace_all(text: str, mapping: dict[str, str]) -> str:
  """Every occurrence of each key of `mapping` replaced by its value, in one pass, longest
  key first; values are literal (no regex or template syntax is interpreted)."""
  keys = sorted((k for k in mapping if k), key=len, reverse=True)
  if not keys:
    return text
  pattern = re.compile('|'.join(re.escape(k) for k in keys))
  return pattern.sub(lambda m: mapping[m.group(0)], text)


def delexicalize_pairs(pairs: Pairs, fields: Sequence[str]) -> Pairs:
  """Pairs as the model sees them with data.delexicalize (the same pairs without)."""
  delex = Delexicalizer(tuple(fields))
  if not delex:
    return pairs
  prompts, completions = [], None if pairs.completions is None else []
  for i, p in enumerate(pairs.prompts):
    delex.check(p, pairs.sources[i])
    dp, values = delex.prompt(p)
    prompts.append(dp)
    if completions is not None:
      delex.check(pairs.completions[i], pairs.sources[i])
      completions.append(delex.completion(pairs.completions[i], values))
  return Pairs(prompts, completions, list(pairs.sources))


# ----------------------------------------------------------------------------- tokenize

def format_prompt(prompt: str, template: str) -> str:
  if '{prompt}' not in template:
    raise ValueError(f'data.template={template!r} must contain {{prompt}}')
  return template.replace('{prompt}', prompt)


def encode_prompts(prompts: Sequence[str], tokenizer, template: str,
                   delexicalize: Sequence[str] = ()) -> list[list[int]]:
  """Token ids of each prompt in its template (with the data.delexicalize slots' values
  replaced by placeholders)."""
  if not prompts:
    return []
  delex = Delexicalizer(tuple(delexicalize))
  prompts = [delex.prompt(p)[0] for p in prompts]
  texts = [format_prompt(p, template) for p in prompts]
  return [list(x) for x in tokenizer(texts, add_special_tokens=False)['input_ids']]


def encode_pairs(pairs: Pairs, tokenizer, *, template: str = '{prompt}',
                 completion_prefix: str = ' ', append_eos: bool = True, max_len: int = 128,
                 truncation: str = 'truncate', delexicalize: Sequence[str] = ()
                 ) -> tuple[list[tuple[list[int], list[int]]], dict]:
  """[(prompt ids, completion ids (+ EOS))] and stats. A pair longer than max_len is cut at
  the end of its completion (truncate), dropped (skip) or refused (error); a pair whose
  prompt alone fills max_len cannot be trained on and is dropped in any mode but error.
  `delexicalize`: the slots whose values become placeholders (Delexicalizer)."""
  check_truncation(truncation)
  if pairs.completions is None:
    raise ValueError('training needs completions: the data has prompts only')
  pairs = delexicalize_pairs(pairs, delexicalize)
  eos = tokenizer.eos_token_id
  if append_eos and eos is None:
    raise ValueError('data.append_eos=True but the tokenizer has no EOS token')
  prompts = encode_prompts(pairs.prompts, tokenizer, template)
  comps = tokenizer([completion_prefix + c for c in pairs.completions],
                    add_special_tokens=False)['input_ids'] if len(pairs) else []
  out, n_trunc, n_skip = [], 0, 0
  for i, (p, c) in enumerate(zip(prompts, comps)):
    c = list(c) + ([eos] if append_eos else [])
    if len(p) + len(c) > max_len:
      if truncation == 'error':
        raise ValueError(f'{pairs.sources[i]}: {len(p)} prompt + {len(c)} completion tokens > '
                         f"data.max_len={max_len} (set data.truncation='truncate' or 'skip')")
      if truncation == 'skip' or len(p) >= max_len:
        n_skip += 1
        continue
      c = c[:max_len - len(p)]
      n_trunc += 1
    out.append((p, c))
  if n_trunc or n_skip:
    logging.info('%d of %d pairs longer than data.max_len=%d: %d truncated, %d skipped',
                 n_trunc + n_skip, len(pairs), max_len, n_trunc, n_skip)
  return out, {'n_pairs': len(pairs), 'n_examples': len(out), 'n_truncated': n_trunc,
               'n_skipped': n_skip}


# --------------------------------------------------------------------------------- rows

def _targets(prompt: list[int], completion: list[int], loss_on_prompt: bool) -> list[int]:
  """Shifted labels of one example: position t predicts token t + 1."""
  ids = prompt + completion
  first = 1 if loss_on_prompt else len(prompt)  # first token that is a target
  return [ids[t + 1] if t + 1 >= first else IGNORE_INDEX for t in range(len(ids) - 1)] + \
      [IGNORE_INDEX]


def build_rows(examples: Sequence[tuple[list[int], list[int]]], *, max_len: int, pad_id: int,
               loss_on_prompt: bool = False, packing: bool = False) -> dict[str, np.ndarray]:
  """Right-padded [N, max_len] rows: input_ids, attention_mask, labels; with packing also
  segment_ids and position_ids. Packing fills rows in order, starting a new row when the
  next example does not fit (examples are never split)."""
  rows: list[list[tuple[list[int], list[int]]]] = []
  used = max_len + 1
  for ex in examples:
    n = len(ex[0]) + len(ex[1])
    if n > max_len:
      raise ValueError(f'an example of {n} tokens > max_len={max_len} (encode_pairs cuts them)')
    if packing and rows and used + n <= max_len:
      rows[-1].append(ex)
      used += n
    else:
      rows.append([ex])
      used = n
  arrays = {'input_ids': np.full((len(rows), max_len), pad_id, np.int32),
            'attention_mask': np.zeros((len(rows), max_len), np.int32),
            'labels': np.full((len(rows), max_len), IGNORE_INDEX, np.int32)}
  if packing:
    arrays['segment_ids'] = np.zeros((len(rows), max_len), np.int32)
    arrays['position_ids'] = np.zeros((len(rows), max_len), np.int32)
  for r, row in enumerate(rows):
    at = 0
    for seg, (p, c) in enumerate(row, 1):
      n = len(p) + len(c)
      arrays['input_ids'][r, at:at + n] = p + c
      arrays['attention_mask'][r, at:at + n] = 1
      arrays['labels'][r, at:at + n] = _targets(p, c, loss_on_prompt)
      if packing:
        arrays['segment_ids'][r, at:at + n] = seg
        arrays['position_ids'][r, at:at + n] = np.arange(n)
      at += n
  return arrays


def max_targets(*arrays: dict | None, multiple: int = 8) -> int:
  """Most scored positions in any row of `arrays`, rounded up: the static size of the
  gathered LM-head input (only scored positions go through the vocabulary projection)."""
  most = max((int((a['labels'] != IGNORE_INDEX).sum(1).max(initial=0)) for a in arrays
              if a is not None), default=1)
  return max(multiple, -(-most // multiple) * multiple)


def pad_rows(arrays: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Append empty rows (mask 0, no targets) up to a multiple of `multiple`: eval batches
  that cover every row; an empty row adds nothing to a loss sum."""
  n = len(arrays['input_ids'])
  extra = -n % multiple if n else multiple
  out = {}
  for k, v in arrays.items():
    fill = IGNORE_INDEX if k == 'labels' else 0
    out[k] = np.concatenate([v, np.full((extra,) + v.shape[1:], fill, v.dtype)])
  return out


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
  """Token lists -> (ids [N, length], mask [N, length]) int32, right-aligned: the layout the
  decoder (jaxft.models.decoding) takes, every prompt ending in the same column."""
  length = max((len(s) for s in sequences), default=1) if length is None else length
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for i, s in enumerate(sequences):
    if len(s) > length:
      raise ValueError(f'prompt {i} has {len(s)} tokens > {length}')
    if len(s):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
  return ids, mask


def prompt_arrays(prompt_ids: Sequence[Sequence[int]], pad_id: int, multiple: int,
                  length: int | None = None) -> dict[str, np.ndarray]:
  """Left-padded prompts for decoding, with `valid`=0 rows up to a multiple of `multiple`,
  numbered by `index`: prompt_ids, prompt_mask, index, valid."""
  n = len(prompt_ids)
  total = max(multiple, -(-n // multiple) * multiple)
  ids, mask = left_pad(list(prompt_ids) + [[]] * (total - n), pad_id,
                       length or max((len(p) for p in prompt_ids), default=1))
  return {'prompt_ids': ids, 'prompt_mask': mask, 'index': np.arange(total, dtype=np.int32),
          'valid': (np.arange(total) < n).astype(np.int32)}
