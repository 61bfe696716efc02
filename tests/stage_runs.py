"""What the in-process stage tests share: a bundled config by name, the json lines of an
output file, and a preemption after N checks (the loop saves and returns as on SIGTERM)."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def config(name: str, variant: str = ''):
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', REPO / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def lines(path):
  with open(path) as f:
    return [json.loads(x) for x in f]


def stop_after(n: int):
  """A PreemptionGuard.should_stop that says stop at its n-th call."""
  calls = {'n': 0}

  def should_stop(self):
    calls['n'] += 1
    return calls['n'] == n
  return should_stop
