"""Choices measured on the machine, not assumed (issue 31): a performance choice that depends
on the hardware is decided by timing its candidates for the run's own shapes on first use
(a few steps each, like `torch.backends.cudnn.benchmark`), and the winner is stored beside
JAX's compilation cache, keyed by device kind, jax version, the choice and the shapes, so a
restarted run (or the next run of the same shapes on this machine) does not time again.

The setting JAXFT_CHOICES (environment) overrides, as a comma list of `name=value`, `*` for
every choice: a candidate forces it, `default` takes the built-in rule without timing,
`measure` (the default) times. `configure()` sets the same from code (a config section can
pass its values there). Several processes of one job must run one program, so they take
the built-in rule (no process may time its way to another program).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import statistics
import time
from typing import Callable, Mapping

from jaxft import files

ENV = 'JAXFT_CHOICES'
STORE_NAME = 'jaxft_measured_choices.json'
WARMUP, ROUNDS = 1, 2  # untimed calls, then timed rounds (candidates interleaved) per choice
# Another candidate replaces the built-in rule only when its median is this much faster:
# a different program needs evidence beyond timing noise (on 2 shared cores, two
# measurements of bert-mini's barrier went 13.5 vs 16.3 s one way and 10.7 vs 10.1 s the other).
MARGIN = 0.05

_log = logging.getLogger('jaxft.measured')
_overrides: dict[str, str] = {}
_memo: dict[str, str] = {}  # key -> winner, for runs without a compilation cache directory


@dataclasses.dataclass(frozen=True)
class Choice:
  """A named choice: its candidates and the one the built-in rule takes."""
  name: str
  candidates: tuple[str, ...]
  default: str

  def __post_init__(self):
    if self.default not in self.candidates:
      raise ValueError(f'choice {self.name}: default {self.default!r} not in {self.candidates}')


def configure(overrides: Mapping[str, str] | None = None) -> None:
  """Overrides from code ({name or '*': candidate | 'default' | 'measure'}); the
  environment's JAXFT_CHOICES wins over them."""
  _overrides.clear()
  _overrides.update(overrides or {})


def parse(text: str, where: str = ENV) -> dict[str, str]:
  """{name: value} of a comma list 'name=value,...' (the `choices` config key, JAXFT_CHOICES);
  a ValueError naming `where` for an item that is not name=value."""
  values = {}
  for item in filter(None, (s.strip() for s in (text or '').split(','))):
    name, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'{where}={text!r}: {item!r} is not name=value')
    values[name.strip()] = value.strip()
  return values


def configured(cfg) -> dict[str, str]:
  """The config's `choices` key (a pipeline's: its first section's), parsed."""
  if 'choices' not in cfg and cfg.get('stage') == 'pipeline' and cfg.pipeline:
    cfg = cfg[cfg.pipeline[0]]
  value = cfg.get('choices', '')
  return parse(value if isinstance(value, str) else '', 'choices')


def _setting(choice: Choice) -> str:
  """What the settings say for `choice`: a candidate, 'default' or 'measure'."""
  values = {**_overrides, **parse(os.environ.get(ENV, '').strip())}
  value = values.get(choice.name, values.get('*', 'measure'))
  allowed = choice.candidates + ('default', 'measure')
  if value not in allowed:
    raise ValueError(f'choices / {ENV}: {choice.name}={value!r}; allowed: '
                     f'{", ".join(allowed)}')
  return value


def cache_dir() -> str | None:
  """JAX's compilation cache directory (compilation_cache.enable, JAX_COMPILATION_CACHE_DIR)."""
  import jax
  return jax.config.jax_compilation_cache_dir or None


def store_path() -> str | None:
  """The JSON file of stored winners: in the compilation cache directory, if one is on."""
  directory = cache_dir()
  return os.path.join(directory, STORE_NAME) if directory else None


def shapes_key(*trees) -> str:
  """A short digest of the shapes and dtypes of `trees` (e.g. a train state and a batch)."""
  import jax
  leaves = [f'{getattr(x, "dtype", type(x).__name__)}{list(getattr(x, "shape", ()))}'
            for t in trees for x in jax.tree.leaves(t)]
  digest = hashlib.sha256(
      (str([jax.tree.structure(t) for t in trees]) + ';'.join(leaves)).encode()).hexdigest()
  return f'{len(leaves)} arrays, sha256 {digest[:16]}'


def device_name() -> str:
  """The first device's kind; for a CPU (whose kind is just 'cpu') its model name too: a
  winner measured on one CPU kind says nothing about another sharing the cache directory."""
  import jax
  kind = jax.devices()[0].device_kind
  if jax.devices()[0].platform != 'cpu':
    return kind
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
  except OSError:
    names = []
  return f'{kind}: {names[0]}' if names else kind


def key(choice: Choice, shapes: str) -> str:
  import jax
  return f'{choice.name} | {device_name()} | jax {jax.__version__} | {shapes}'


def _read_store(path: str | None) -> dict:
  if not path or not os.path.exists(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError) as e:  # a damaged store costs a measurement, not the run
    _log.warning('measured choices: ignoring unreadable %s (%s)', path, e)
    return {}


def _write_store(path: str | None, entry_key: str, entry: dict) -> None:
  """Read, add, replace whole (atomic): concurrent runs lose at most an entry, never the
  file; an unwritable directory costs a measurement next time, never the run."""
  if not path:
    return
  data = _read_store(path)
  data[entry_key] = entry
  try:
    files.atomic_write(path, json.dumps(data, indent=1, sort_keys=True), 'measured choices')
  except Exception as e:
    _log.warning('measured choices: could not store %s (%s)', path, e)


def time_once(candidate: str, run: Callable[[], None]) -> float:
  """Seconds of one blocking call of `run` (tests replace this: no timed tests)."""
  del candidate
  t = time.perf_counter()
  run()
  return time.perf_counter() - t


def measure(choice: Choice, runs: Mapping[str, Callable[[], None]]) -> dict[str, list[float]]:
  """Times each candidate's `run` (a blocking call): WARMUP untimed calls each, then
  ROUNDS rounds with every candidate once, in rotating order (load from other processes
  hits all alike)."""
  order = list(choice.candidates)
  for c in order:
    for _ in range(WARMUP):
      runs[c]()
  timings: dict[str, list[float]] = {c: [] for c in order}
  for r in range(ROUNDS):
    for c in order[r % len(order):] + order[:r % len(order)]:
      timings[c].append(time_once(c, runs[c]))
  return timings


def decide(choice: Choice, shapes: str,
           build_runs: Callable[[], Mapping[str, Callable[[], None]] | None]) -> str:
  """The candidate to use for `shapes`: the setting's, else the stored winner, else the
  fastest of the calls `build_runs()` gives (candidate -> one blocking step; built only
  when a measurement is due; None: the choice does not apply, take the default), stored
  and logged in one line."""
  import jax
  setting = _setting(choice)
  if setting in choice.candidates:
    return setting
  if setting == 'default' or jax.process_count() > 1:
    return choice.default
  entry_key, path = key(choice, shapes), store_path()
  stored = _read_store(path).get(entry_key, {}).get('winner') or _memo.get(entry_key)
  if stored in choice.candidates:
    return stored
  runs = build_runs()
  if runs is None:  # the choice does not apply to this program
    return choice.default
  timings = measure(choice, runs)
  medians = {c: statistics.median(t) for c, t in timings.items()}
  fastest = min(choice.candidates, key=lambda c: (medians[c], c != choice.default))
  wins = medians[fastest] < (1 - MARGIN) * medians[choice.default]
  winner = fastest if wins else choice.default
  _memo[entry_key] = winner
  _write_store(path, entry_key, dict(
      winner=winner, timings_s=timings, measured_at=datetime.datetime.now(
          datetime.timezone.utc).isoformat(timespec='seconds')))
  _log.info('measured choice %s on %s (%s): %s -> %s%s%s', choice.name, device_name(), shapes,
            ', '.join(f'{c} {medians[c] * 1e3:.1f} ms' for c in choice.candidates), winner,
            '' if wins or fastest == winner else
            f' (the default: {fastest} is not {MARGIN:.0%} faster)',
            f' (stored in {path})' if path else '')
  return winner
