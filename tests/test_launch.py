"""Launchers: the TPU pod CLI prints the right gcloud commands; the Colab notebook runs on CPU."""
from __future__ import annotations

import importlib.util
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCOPE = ['--name', 'pod', '--zone', 'us-central2-b', '--dry-run']


def _tpu_pod():
  spec = importlib.util.spec_from_file_location('tpu_pod', REPO / 'launch' / 'tpu_pod.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


tpu_pod = _tpu_pod()


def dry(command, *argv) -> list[str]:
  out = io.StringIO()
  tpu_pod.main([command, *SCOPE, *argv], out=out)
  return out.getvalue().splitlines()


def test_create_plain_and_queued():
  assert dry('create', '--accelerator', 'v4-8') == [
      'gcloud compute tpus tpu-vm create pod --zone us-central2-b --accelerator-type v4-8 '
      '--version tpu-ubuntu2204-base']
  assert dry('create', '--accelerator', 'v4-32', '--spot', '--project', 'proj') == [
      'gcloud compute tpus queued-resources create pod --node-id pod --zone us-central2-b '
      '--project proj --accelerator-type v4-32 --runtime-version tpu-ubuntu2204-base --spot']
  assert dry('create', '--accelerator', 'v5litepod-16', '--reserved', '--runtime',
             'v2-alpha-tpuv5-lite', '--wait') == [
      'gcloud compute tpus queued-resources create pod --node-id pod --zone us-central2-b '
      '--accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --reserved',
      "gcloud compute tpus queued-resources describe pod --zone us-central2-b --format "
      "'value(state.state)'"]
  with pytest.raises(SystemExit):
    dry('create', '--accelerator', 'v4-8', '--spot', '--reserved')


def test_setup_from_git_and_from_local_checkout():
  lines = dry('setup', '--repo', 'https://github.com/org/jaxft.git', '--ref', 'v1', '--gcsfuse')
  assert len(lines) == 1
  cmd = shlex.split(lines[0])
  assert cmd[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone',
                     'us-central2-b', '--worker=all']
  assert cmd[9] == '--command'
  remote = cmd[10]
  assert remote.startswith('rm -rf ~/jaxft && git clone https://github.com/org/jaxft.git '
                           '~/jaxft && git -C ~/jaxft checkout v1 && ')
  assert 'python3 -m pip install -U "jax[tpu]"' in remote
  assert 'python3 -m pip install -e ~/jaxft' in remote and 'gcsfuse' in remote

  lines = dry('setup', '--local', str(REPO))
  assert lines[0] == f'git -C {REPO} archive --format=tar.gz -o /tmp/jaxft.tar.gz HEAD'
  assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/jaxft.tar.gz 'pod:~/jaxft.tar.gz' "
                      '--zone us-central2-b --worker=all')
  assert shlex.split(lines[2])[10].startswith(
      'rm -rf ~/jaxft && mkdir -p ~/jaxft && tar -xzf ~/jaxft.tar.gz -C ~/jaxft && ')


def test_run_on_all_workers_with_overrides_and_gcs_workdir():
  lines = dry('run', '--config', 'configs/bert_mlm.py:base', '--workdir', 'gs://bkt/runs/a',
              '--', '--config.train.num_steps=100', '--config.mesh.fsdp=4')
  assert len(lines) == 1
  cmd = shlex.split(lines[0])
  assert cmd[:10] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone',
                      'us-central2-b', '--worker=all', '--command']
  assert cmd[10] == (
      'cd ~/jaxft && mkdir -p $HOME/jaxft-logs && mkdir -p /tmp/jaxft-gcs/bkt && '
      '(mountpoint -q /tmp/jaxft-gcs/bkt || gcsfuse --implicit-dirs bkt /tmp/jaxft-gcs/bkt) && '
      '{ nohup env JAXFT_DISTRIBUTED=1 python3 -m jaxft.main '
      '--config=configs/bert_mlm.py:base --workdir=/tmp/jaxft-gcs/bkt/runs/a '
      '--config.train.num_steps=100 --config.mesh.fsdp=4 > $HOME/jaxft-logs/jaxft.log 2>&1 '
      '< /dev/null & } && echo "started on $(hostname): $HOME/jaxft-logs/jaxft.log"')
  # Local workdir, attached, overrides without `--`, extra environment.
  cmd = shlex.split(dry('run', '--config', 'configs/quickstart.py', '--workdir', '/data/w',
                        '--attach', '--run-name', 'qs', '--env', 'XLA_FLAGS=--a --b',
                        '--config.seed=3')[0])
  assert cmd[10] == (
      "set -o pipefail && cd ~/jaxft && mkdir -p $HOME/jaxft-logs && env JAXFT_DISTRIBUTED=1 "
      "'XLA_FLAGS=--a --b' python3 -m jaxft.main --config=configs/quickstart.py "
      "--workdir=/data/w --config.seed=3 2>&1 | tee $HOME/jaxft-logs/qs.log")
  with pytest.raises(SystemExit):
    dry('run', '--config', 'c.py', '--workdir', '/w', '--bogus')


def test_logs_and_delete():
  assert dry('logs', '--follow', '--run-name', 'qs') == [
      "gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=0 --command "
      "'tail -n 100 -F $HOME/jaxft-logs/qs.log'"]
  assert dry('logs', '--worker', '3', '--lines', '20') == [
      "gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=3 --command "
      "'tail -n 20 $HOME/jaxft-logs/jaxft.log'"]
  assert dry('delete') == ['gcloud compute tpus tpu-vm delete pod --zone us-central2-b --quiet']
  assert dry('delete', '--queued') == [
      'gcloud compute tpus queued-resources delete pod --zone us-central2-b --force --quiet']


def test_cli_entry_point_dry_run():
  out = subprocess.run([sys.executable, str(REPO / 'launch' / 'tpu_pod.py'), 'delete', *SCOPE],
                       capture_output=True, text=True, check=True).stdout
  assert out == 'gcloud compute tpus tpu-vm delete pod --zone us-central2-b --quiet\n'


def test_slurm_script_uses_srun_not_torchrun():
  text = (REPO / 'launch' / 'slurm_gpu.sbatch').read_text()
  assert text.startswith('#!/bin/bash')
  assert 'srun' in text and 'python -m jaxft.main' in text and 'torchrun' not in text
  subprocess.run(['bash', '-n', str(REPO / 'launch' / 'slurm_gpu.sbatch')], check=True)


@pytest.mark.slow
def test_colab_notebook_runs_on_cpu(tmp_path):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(REPO / 'launch' / 'colab_tpu.ipynb', as_version=4)
  env = {'JAXFT_SKIP_INSTALL': '1', 'JAXFT_NOTEBOOK_WORKDIR': str(tmp_path / 'run'),
         'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1 '
         '--xla_backend_optimization_level=0'}  # its tiny runs compile more than they run
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel (and the runs it starts) inherit these
  try:
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(REPO / 'launch')}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []) if o.get('output_type') == 'stream')
  assert 'skipped: no TPU on this runtime' in text and 'skipped: not on a TPU' in text
  assert 'falling back to CPU' in text
  assert (tmp_path / 'run' / 'quickstart').is_dir()
  assert (tmp_path / 'run' / 'finetune' / 'results.json').exists()
  assert 'pretrain train/loss' in text or any(
      'image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code'
      for o in c.get('outputs', []))
