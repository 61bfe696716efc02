"""E2E nearest-neighbour baseline, and a finetune_lm run scored on the same MRs.

The baseline a trained generator must beat clearly: for each validation MR, the training MR
most like it (among those with the same name/near attributes when there are any: the
highest Jaccard similarity of the attribute=value sets, with the name and near values
replaced by placeholders; ties go to the earlier training row), and that MR's first
reference that mentions its name (and near value), with the training name / near values
replaced by the validation MR's.

The split is the one `configs/finetune_lm.py:e2e` trains on (same data section, same
`jaxft.data.completion.load_splits`), so the MRs are exactly the validation MRs of the
recipe (held out by restaurant name). With --generations (finetune_lm workdirs'
generations.jsonl, or generate stages'; several allowed), the models' outputs are scored on
the same MRs with the same metric code (`jaxft.train.metrics.generation_metrics`: sacrebleu
BLEU / chrF, rouge-score ROUGE-L; `jaxft.train.slot_errors`: the slot error rate, SER). The
last row scores the human references themselves for SER (every reference of each validation
MR): how far the matching rules and the references' own omissions go.

  python bench/e2e_baseline.py
  python bench/e2e_baseline.py --generations w/e2e/generations.jsonl --show 3
  python bench/e2e_baseline.py --write-dev /tmp/e2e-dev.csv  # the validation rows, for generate
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxft.config import section  # noqa: E402
from jaxft.data import completion as lm  # noqa: E402
from jaxft.train.metrics import generation_metrics  # noqa: E402
from jaxft.train.slot_errors import known_values, slot_error_rate  # noqa: E402

SLOT = re.compile(r'(\w+)\[([^\]]*)\]')
LEXICAL = ('name', 'near')  # values copied from the MR into the text


def parse_mr(mr: str) -> dict[str, str]:
  """'name[The Eagle], food[French]' -> {'name': 'The Eagle', 'food': 'French'}."""
  return dict(SLOT.findall(mr))


def delexicalised(slots: dict[str, str]) -> frozenset:
  return frozenset((k, '<x>' if k in LEXICAL else v) for k, v in slots.items())


def nearest_neighbour(dev_mrs, train_mrs, train_refs) -> list[str]:
  """One output per dev MR (see the module docstring)."""
  train_slots = [parse_mr(m) for m in train_mrs]
  train_keys = [delexicalised(s) for s in train_slots]
  out = []
  for mr in dev_mrs:
    slots = parse_mr(mr)
    key = delexicalised(slots)
    lexical = {k for k in LEXICAL if k in slots}
    scores = [(lexical == {k for k in LEXICAL if k in s}, len(key & k) / max(len(key | k), 1))
              for s, k in zip(train_slots, train_keys)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    src = train_slots[best]
    mentions = [r for r in train_refs[best]
                if all(src[k] in r for k in LEXICAL if k in src)] or train_refs[best]
    text = mentions[0]
    for k in LEXICAL:
      if k in src:
        text = text.replace(src[k], slots.get(k, src[k]))
    out.append(text)
  return out


def e2e_split(variant: str = 'e2e'):
  """(train Pairs, dev Pairs) of configs/finetune_lm.py:<variant>."""
  spec = importlib.util.spec_from_file_location('_finetune_lm', os.path.join(
      REPO, 'configs', 'finetune_lm.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  data = section(lm.CompletionData, mod.get_config(variant).data, 'data')
  train, dev, _ = lm.load_splits(data)
  return train, dev


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--variant', default='e2e', help='configs/finetune_lm.py variant')
  ap.add_argument('--generations', nargs='*', default=[],
                  help='generations.jsonl files to score alongside')
  ap.add_argument('--show', type=int, default=0, help='print this many examples')
  ap.add_argument('--write-dev', default='', help='write the validation rows (mr, ref) here')
  args = ap.parse_args(argv)
  train, dev = e2e_split(args.variant)
  if args.write_dev:
    with open(args.write_dev, 'w', newline='', encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerows([('mr', 'ref')] + list(zip(dev.prompts, dev.completions)))
    print(f'wrote {len(dev)} validation rows to {args.write_dev}')
  train_mrs, train_refs, _ = lm.group_by_prompt(train)
  dev_mrs, dev_refs, _ = lm.group_by_prompt(dev)
  rows = {'nearest neighbour': nearest_neighbour(dev_mrs, train_mrs, train_refs)}
  for path in args.generations:
    with open(path, encoding='utf-8') as f:
      by_input = {g['input']: g['text'] for g in map(json.loads, f)}
    missing = [m for m in dev_mrs if m not in by_input]
    if missing:
      raise SystemExit(f'{path} has no output for {len(missing)} of the '
                       f'{len(dev_mrs)} validation MRs (e.g. {missing[0]!r})')
    rows[os.path.basename(os.path.dirname(os.path.abspath(path))) or 'model'] = [
        by_input[m] for m in dev_mrs]
  print(f'{len(dev_mrs)} validation MRs ({sum(map(len, dev_refs))} references), '
        f'{len(train_mrs)} training MRs')
  known = known_values(train_mrs + dev_mrs)
  print("| system | BLEU | chrF | ROUGE-L | SER % |\n|---|---|---|---|---|")
  for name, hyps in rows.items():
    m = generation_metrics(hyps, dev_refs)
    ser = slot_error_rate(dev_mrs, hyps, known)[0]['slot_error_rate']
    print(f"| {name} | {m['bleu']:.1f} | {m['chrf']:.1f} | {m['rouge_l']:.1f} | {ser:.1f} |")
  every = [(m, r) for m, refs in zip(dev_mrs, dev_refs) for r in refs]
  ser = slot_error_rate([m for m, _ in every], [r for _, r in every], known)[0]
  print(f"| the human references (each of the {len(every)}) | | | | "
        f"{ser['slot_error_rate']:.1f} |")
  for i in range(min(args.show, len(dev_mrs))):
    print(f'\nMR: {dev_mrs[i]}')
    for name, hyps in rows.items():
      print(f'  {name}: {hyps[i]}')


if __name__ == '__main__':
  main()
