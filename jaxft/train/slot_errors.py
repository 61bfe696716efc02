"""Slot error rate (SER) of texts generated from structured `slot[value]` prompts: the share of
the prompts' slot values that the text leaves out, gets wrong, or adds (the E2E measure of
faithfulness: Dusek et al., TGen 2016 and "Semantic noise matters for neural NLG", 2019).

  SER = (missing + wrong + added) / the number of slot values in the prompts

- missing: a slot of the prompt whose value the text does not realise, and no other value of
  that slot either;
- wrong: a slot of the prompt realised with another value only (one error, not missing +
  added);
- added: a slot the prompt lacks that the text realises (for an open-class slot: each
  mention of a known value that is none of the prompt's).

How a value is matched depends on its slot (the text is lower-cased first):
- E2E's categorical slots (eatType, food, priceRange, customer rating, area, familyFriendly)
  by phrase patterns per value class (PATTERNS): a value and its paraphrases ('cheap',
  'low-priced', 'inexpensive', 'less than £20' ...). The two scales of E2E are classes:
  priceRange cheap = less than £20, moderate = £20-25, high = more than £30; customer rating
  low = 1 out of 5, average = 3 out of 5, high = 5 out of 5. familyFriendly[yes] is a
  mention of family / families / kid(s) / child(ren) not negated, [no] a negated one ('not
  family-friendly', "isn't kid friendly", 'no children', 'adults only'). A phrase after
  'not' / "n't" / 'no' (at most one word between; two for familyFriendly) is negated and
  realises nothing.
  eatType 'restaurant' is generic: writing 'restaurant' for a pub is neither wrong nor
  added (references do it all the time), 'pub' / 'coffee shop' for another eatType is.
- Every other slot (name, near, any slot of another dataset, a value without a pattern)
  literally: the value, case-insensitive, not inside a longer word. Added mentions of these
  open-class slots are found among `known` values (finetune_lm: every value of these slots
  in the training and validation prompts; generate: in the input file); a mention of a
  known value that is not the prompt's is 'wrong' for a slot of the prompt that is missing
  (writing 'The Mill' for name[Blue Spice]), else 'added'. Literal values are removed from
  the text before the categorical patterns run ('Burger King' is no fast food).
- A slot whose value is realised is not an error even where another value of it also
  matches (lenient: a pattern may fire on a paraphrase).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from jaxft.data.completion import parse_slots

_RATING = (r'(?:customer )?(?:rat(?:e|es|ing|ings|ed)|reviews?|scores?|stars?|starred'
           r'|standards?|quality)\b')
_RATED = (r'\b(?:rat(?:e[ds]?|ings?)|reviews?|scored?|satisfaction|standards?|quality)'
          r'(?: \w+){0,2} (?:as )?')
# '1 out of 5', 'one out of five', 'one out of a possible five', '1/5'
_OUT_OF = r'\b(?:{0}) (?:out )?(?:of )?(?:a possible )?(?:5|five)\b|\b(?:{0})/5\b'
_NOT_PRICE = r'(?![- ]?(?:pric|cost))'
_PRICE_IS = r'\bprices?(?: range)? (?:is |are |of )?(?:very |quite |rather )?'
# (slot, value class) -> pattern; VALUE_CLASS maps each E2E value to its class.
PATTERNS: dict[str, dict[str, str]] = {
    'eatType': {
        'coffee shop': r'\bcoffee[- ]?(?:shop|house)s?\b|\bcaf[eé]s?\b',
        'pub': r'\bpubs?\b',
        'restaurant': r'\brestaurants?\b',
    },
    'food': {
        'english': r'\b(?:english|british)\b',
        'french': r'\bfrench\b',
        'italian': r'\b(?:italian|pasta|pizzas?)\b',
        'chinese': r'\bchinese\b',
        'indian': r'\bindian\b',
        'japanese': r'\b(?:japanese|sushi)\b',
        'fast food': r'\bfast[- ]?foods?\b|\bburgers?\b',
    },
    'area': {
        'city centre': r'\b(?:city|town)[- ]?(?:centre|center)\b|\bcent(?:re|er)\b|\bdowntown\b',
        'riverside': r'\briver(?:side)?\b|\bwaterfront\b',
    },
    'priceRange': {
        'low': (r'\bcheap(?:er|ly|est)?\b|\binexpensive\b|\blow[- ](?:cost|price[ds]?|budget)\b'
                r'|\baffordabl[ey]\b|\bbudget\b|\blow price range\b'
                r'|' + _PRICE_IS + r'(?:low|cheap)\b'
                r'|\b(?:less|lower|cheaper) than £ ?20\b|\b(?:under|below) £ ?20\b'
                r'|£ ?20 (?:or (?:less|under)|and under)\b'),
        'moderate': (r'\bmoderate(?:ly)?\b(?! ' + _RATING + r')|\bmid[- ]?(?:range|priced?|cost)\b'
                     r'|' + _PRICE_IS + r'(?:average|moderate|medium)\b'
                     r'|\baverage[- ]pric|\breasonabl[ey] pric|\bmedium[- ]pric'
                     r'|£ ?20 ?(?:-|–|to|and) ?£? ?25\b|\b20 ?(?:-|–|to) ?£? ?25\b'),
        'high': (r'\bexpensive\b|\bhigh(?:ly)?[- ]{1,2}(?:end|pric(?:e[ds]?|ing)|cost(?:s|ing)?)\b'
                 r'|\bpricey\b|\bcostly\b'
                 r'|' + _PRICE_IS + r'high\b|\bhigh price range\b|\bupscale\b'
                 r'|\b(?:more|higher) than £ ?30\b|\b(?:over|above) £ ?30\b'
                 r'|£ ?30 ?(?:\+|plus|or more|and (?:over|above|up))'),
    },
    'customer rating': {
        'low': (_OUT_OF.format('1|one') + r'|\b(?:one|1)[- ]star(?:s|red)?\b'
                r'|\b(?:low|poor|bad|lowly|poorly)[- ]' + _RATING
                + r'|' + _RATED + r'(?:low|poor|poorly|badly|1)\b' + _NOT_PRICE),
        'average': (_OUT_OF.format('3|three') + r'|\b(?:three|3)[- ]star(?:s|red)?\b'
                    r'|\b(?:average|mediocre|moderate|moderately|middling|decent)[- ]' + _RATING
                    + r'|' + _RATED + r'(?:average|mediocre|moderate|decent|3)\b' + _NOT_PRICE),
        'high': (_OUT_OF.format('5|five') + r'|\b(?:five|5)[- ]star(?:s|red)?\b'
                 r'|\b(?:high|highly|great|excellent|top|good|well)[- ]' + _RATING
                 + r'|' + _RATED + r'(?:high|highly|excellent|great|good|5)\b' + _NOT_PRICE),
    },
}
VALUE_CLASS = {
    'eatType': {'coffee shop': 'coffee shop', 'pub': 'pub', 'restaurant': 'restaurant'},
    'food': {v: v for v in PATTERNS['food']},
    'area': {'city centre': 'city centre', 'riverside': 'riverside'},
    'priceRange': {'cheap': 'low', 'less than £20': 'low', 'moderate': 'moderate',
                   '£20-25': 'moderate', 'high': 'high', 'more than £30': 'high'},
    'customer rating': {'low': 'low', '1 out of 5': 'low', 'average': 'average',
                        '3 out of 5': 'average', 'high': 'high', '5 out of 5': 'high'},
}
GENERIC = {('eatType', 'restaurant')}  # a class whose word is used generically: never added
_COMPILED = {s: {c: re.compile(p) for c, p in classes.items()} for s, classes in PATTERNS.items()}
_FAMILY = re.compile(r'\b(?:family|families|kids?|child|children|childrens|all ages?)\b')
_NEG = r"(?:\bnot|n't|\bno|\bnon|\bnever|\bnor|\bwithout)\b"
_NEGATION = {1: re.compile(_NEG + r'(?:\W+\w+)?\W*$'), 2: re.compile(_NEG + r'(?:\W+\w+){0,2}\W*$')}
_NEGATED_AFTER = re.compile(r"^\W*(?:\w+\W+)?(?:are|is)\s+not\b|^\W*(?:\w+\W+)?(?:aren't|isn't)"
                            r'|^[- ]+unfriendly\b')
_ADULTS = re.compile(r'\badults?[- ]only\b')


@dataclasses.dataclass(frozen=True)
class SlotError:
  kind: str   # missing | wrong | added
  slot: str
  value: str  # the prompt's value (missing, wrong) or the one the text realises (added)
  found: str = ''  # wrong: what the text says instead

  def __str__(self):
    return (f'{self.kind} {self.slot}[{self.value}]'
            + (f' (the text says {self.found!r})' if self.found else ''))


def _norm(text: str) -> str:
  return ' '.join(text.lower().replace('’', "'").split())


def _literal(value: str) -> re.Pattern:
  return re.compile(r'(?<!\w)' + re.escape(_norm(value)) + r'(?!\w)')


def _negated(text: str, start: int, words: int = 1) -> bool:
  """Whether a negation ends at most `words` words before `start`."""
  return _NEGATION[words].search(text[max(0, start - 40):start]) is not None


def _classes(slot: str, text: str) -> set[str]:
  """The value classes of a categorical slot the text realises (negated phrases left out)."""
  found = set()
  for cls, pattern in _COMPILED[slot].items():
    if any(not _negated(text, m.start()) for m in pattern.finditer(text)):
      found.add(cls)
  return found


def _family(text: str) -> set[str]:
  found = {'no'} if _ADULTS.search(text) else set()
  for m in _FAMILY.finditer(text):
    after = text[m.end():m.end() + 30]
    negated = _negated(text, m.start(), 2) or _NEGATED_AFTER.search(after) is not None
    found.add('no' if negated else 'yes')
  return found


def realised(slot: str, text: str) -> set[str]:
  """The value classes of a categorical slot (or familyFriendly yes/no) in normalised text."""
  return _family(text) if slot == 'familyFriendly' else _classes(slot, text)


def _categorical(slot: str, value: str) -> str | None:
  """The value's class when the slot has patterns for it, else None (matched literally)."""
  if slot == 'familyFriendly':
    return value.lower() if value.lower() in ('yes', 'no') else None
  return VALUE_CLASS.get(slot, {}).get(value.lower())


def slot_errors(prompt: str, text: str, known: dict[str, set[str]] | None = None
                ) -> tuple[int, list[SlotError]]:
  """(the prompt's number of slot values, the errors of `text`); (0, []) for a prompt that is
  not `slot[value]` items. `known`: open-class slot -> values to find added mentions of."""
  slots = parse_slots(prompt)
  if slots is None:
    return 0, []
  t = _norm(text)
  errors: list[SlotError] = []
  literal = [(s, v) for s, v in slots if _categorical(s, v) is None]
  values = {_norm(v) for _, v in literal}
  missing_literal = []
  for s, v in literal:
    if not _literal(v).search(t):
      missing_literal.append((s, v))
  others = []  # known open-class values the text mentions that are not the prompt's
  for s, vs in (known or {}).items():
    for v in sorted(vs, key=len, reverse=True):
      if _norm(v) not in values and _norm(v) not in {o for _, o in others} and \
          _literal(v).search(t):
        others.append((s, _norm(v)))
  for v in sorted(values | {o for _, o in others}, key=len, reverse=True):
    t = _literal(v).sub(' # ', t)
  for s, v in missing_literal:
    instead = next((o for so, o in others if so == s), None)
    if instead is not None:
      others.remove((s, instead))
      errors.append(SlotError('wrong', s, v, instead))
    else:
      errors.append(SlotError('missing', s, v))
  errors += [SlotError('added', s, o) for s, o in others]
  errors += _categorical_errors(slots, t)
  return len(slots), errors


def _categorical_errors(slots, t: str) -> list[SlotError]:
  errors = []
  in_prompt = {s for s, v in slots if _categorical(s, v) is not None}
  for s, v in slots:
    cls = _categorical(s, v)
    if cls is None:
      continue
    found = realised(s, t) - {c for g, c in GENERIC if g == s and c != cls}
    if cls not in found:
      errors.append(SlotError('wrong', s, v, ', '.join(sorted(found))) if found
                    else SlotError('missing', s, v))
  for s in list(PATTERNS) + ['familyFriendly']:
    if s in in_prompt or any(name == s for name, _ in slots):
      continue
    found = realised(s, t) - {c for g, c in GENERIC if g == s}
    errors += [SlotError('added', s, c) for c in sorted(found)]
  return errors


def fewest_errors(prompt: str, texts: Sequence[str],
                  known: dict[str, set[str]] | None = None) -> int:
  """The index of the first of `texts` (candidates for one prompt, best first) with the
  fewest slot errors against `prompt` (0 for a prompt that is not `slot[value]` items): the
  slot-aware reranking of an n-best list."""
  counts = [len(slot_errors(prompt, t, known)[1]) for t in texts]
  return counts.index(min(counts))


def known_values(prompts: Iterable[str]) -> dict[str, set[str]]:
  """Open-class slot -> every value it has in `prompts` (what added mentions are found among)."""
  out: dict[str, set[str]] = {}
  for p in prompts:
    for s, v in parse_slots(p) or ():
      if _categorical(s, v) is None and v:
        out.setdefault(s, set()).add(v)
  return out


def slot_error_rate(prompts: Sequence[str], texts: Sequence[str],
                    known: dict[str, set[str]] | None = None) -> tuple[dict, list]:
  """({slot_error_rate (percent), slot_missing, slot_wrong, slot_added, slots}, [(i, errors)
  for each text with errors]) over the structured prompts (free-text prompts are skipped;
  ({}, []) when there is none)."""
  if len(prompts) != len(texts):
    raise ValueError(f'{len(texts)} texts for {len(prompts)} prompts')
  known = known if known is not None else known_values(prompts)
  total, counts, failing = 0, {'missing': 0, 'wrong': 0, 'added': 0}, []
  for i, (p, t) in enumerate(zip(prompts, texts)):
    n, errors = slot_errors(p, t, known)
    total += n
    for e in errors:
      counts[e.kind] += 1
    if errors:
      failing.append((i, errors))
  if not total:
    return {}, []
  return ({'slot_error_rate': 100.0 * sum(counts.values()) / total, 'slots': float(total),
           **{f'slot_{k}': float(v) for k, v in counts.items()}}, failing)


def report_text(prompts: Sequence[str], texts: Sequence[str], failing, scores: dict) -> str:
  """The failing outputs, for a person: a header with the rate, then per output its prompt,
  its text and each error."""
  lines = [f"slot error rate {scores.get('slot_error_rate', float('nan')):.2f}% = "
           f"({scores.get('slot_missing', 0):.0f} missing + {scores.get('slot_wrong', 0):.0f} "
           f"wrong + {scores.get('slot_added', 0):.0f} added) / {scores.get('slots', 0):.0f} "
           f'slot values; {len(failing)} of {len(texts)} outputs have errors '
           '(how each slot is matched: jaxft/train/slot_errors.py, docs/generation.md)', '']
  for i, errors in failing:
    lines += [f'[{i}] {prompts[i]}', f'    {texts[i]}']
    lines += [f'    - {e}' for e in errors]
    lines.append('')
  return '\n'.join(lines)
