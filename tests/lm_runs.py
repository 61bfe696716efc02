"""End-to-end `python -m jaxft.main` runs for the pretraining quality tests (one file per
long run, so parallel workers take them at the same time)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 900


def load_config(name):
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', REPO / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def run_main(args, workdir: Path):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user's run gets
  env.update(JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
             PYTHONPATH=str(REPO) + os.pathsep + env.get('PYTHONPATH', ''))
  cmd = [sys.executable, '-m', 'jaxft.main', f'--workdir={workdir}'] + args
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == 0, f'{" ".join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
  return proc


def eval_losses(run_dir: Path):
  recs = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['eval/loss']) for r in recs if 'eval/loss' in r]
