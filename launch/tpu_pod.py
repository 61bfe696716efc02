#!/usr/bin/env python3
"""Cloud TPU VM / pod launcher for jaxft: create, setup, run, logs, delete.

Every subcommand is a short list of `gcloud` commands run one after another;
`--dry-run` prints them (one shell-quoted line each) instead of running them, which is
also how to see exactly what the launcher would do.

  python launch/tpu_pod.py create --name pod --zone us-central2-b --accelerator v4-32 --spot
  python launch/tpu_pod.py setup  --name pod --zone us-central2-b --repo https://github.com/ORG/jaxft
  python launch/tpu_pod.py run    --name pod --zone us-central2-b --config configs/bert_mlm.py \\
      --workdir gs://BUCKET/runs/bert -- --config.train.num_steps=10000
  python launch/tpu_pod.py logs   --name pod --zone us-central2-b --follow
  python launch/tpu_pod.py delete --name pod --zone us-central2-b --queued

A pod runs one jaxft process per worker (host); `run` starts the same command on all of
them with JAXFT_DISTRIBUTED=1, so each calls jax.distributed.initialize() and JAX finds
the coordinator and process ids from the TPU metadata. The workdir must be shared by all
workers: a gs:// workdir is mounted with gcsfuse at the same path on every worker
(`setup --gcsfuse` installs it); a local path is only right for a single-host slice.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

REMOTE_DIR = '~/jaxft'            # repository copy on every worker (configs/ live there)
LOG_DIR = '$HOME/jaxft-logs'      # one log per run name, on every worker
GCS_MOUNT_ROOT = '/tmp/jaxft-gcs'  # gs://BUCKET/path -> /tmp/jaxft-gcs/BUCKET/path
DEFAULT_RUNTIME = 'tpu-ubuntu2204-base'
JAX_TPU_INSTALL = 'python3 -m pip install -U "jax[tpu]"'


class Runner:
  """Runs (or with dry_run, prints) commands; stops at the first failure."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.history: list[list[str]] = []

  def __call__(self, cmd: list[str], check: bool = True, capture: bool = False) -> str:
    self.history.append(cmd)
    if self.dry_run:
      print(shlex.join(cmd), file=self.out, flush=True)
      return ''
    print('+ ' + shlex.join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, check=False, text=True,
                         stdout=subprocess.PIPE if capture else None)
    if check and res.returncode != 0:
      raise SystemExit(f'command failed with exit code {res.returncode}: {shlex.join(cmd)}')
    return res.stdout or ''


def _scope(args) -> list[str]:
  out = ['--zone', args.zone]
  if args.project:
    out += ['--project', args.project]
  return out


def ssh(args, command: str, worker: str = 'all') -> list[str]:
  """`gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=W --command CMD`."""
  return (['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name] + _scope(args) +
          [f'--worker={worker}', '--command', command])


def gcs_to_local(path: str) -> tuple[str, str | None]:
  """gs://bucket/run -> (/tmp/jaxft-gcs/bucket/run, bucket); local paths unchanged."""
  if not path.startswith('gs://'):
    return path, None
  rest = path[len('gs://'):].strip('/')
  if not rest:
    raise SystemExit(f'--workdir {path!r}: name a bucket, e.g. gs://BUCKET/runs/NAME')
  bucket = rest.split('/', 1)[0]
  return f'{GCS_MOUNT_ROOT}/{rest}', bucket


# ----------------------------------------------------------------------------- commands

def cmd_create(args, run: Runner):
  if args.spot and args.reserved:
    raise SystemExit('--spot and --reserved exclude each other')
  queued = args.queued or args.spot or args.reserved
  if queued:
    cmd = (['gcloud', 'compute', 'tpus', 'queued-resources', 'create', args.name,
            '--node-id', args.name] + _scope(args) +
           ['--accelerator-type', args.accelerator, '--runtime-version', args.runtime])
    if args.spot:
      cmd.append('--spot')
    if args.reserved:
      cmd.append('--reserved')
    if args.valid_until:
      cmd += ['--valid-until-duration', args.valid_until]
  else:
    cmd = (['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name] + _scope(args) +
           ['--accelerator-type', args.accelerator, '--version', args.runtime])
  run(cmd)
  if queued and args.wait:
    wait_active(args, run)


def wait_active(args, run: Runner, poll_s: float = 30.0):
  """Poll the queued resource until it is ACTIVE (a spot request can wait in the queue)."""
  cmd = (['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', args.name] +
         _scope(args) + ['--format', 'value(state.state)'])
  if run.dry_run:
    run(cmd)
    return
  deadline = time.time() + args.wait_timeout
  while True:
    state = run(cmd, capture=True).strip()
    print(f'queued resource {args.name}: {state or "?"}', file=sys.stderr, flush=True)
    if state == 'ACTIVE':
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise SystemExit(f'queued resource {args.name} is {state}')
    if time.time() > deadline:
      raise SystemExit(f'queued resource {args.name} not ACTIVE after {args.wait_timeout}s')
    time.sleep(poll_s)


def install_command(args) -> str:
  """Shell command (run on every worker) that puts the repository at ~/jaxft and installs it."""
  steps = []
  if args.repo:
    ref = shlex.quote(args.ref)
    steps.append(f'rm -rf {REMOTE_DIR} && git clone {shlex.quote(args.repo)} {REMOTE_DIR} && '
                 f'git -C {REMOTE_DIR} checkout {ref}')
  else:  # the tarball copied by `setup` from the local checkout
    steps.append(f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && '
                 f'tar -xzf ~/jaxft.tar.gz -C {REMOTE_DIR}')
  steps.append(JAX_TPU_INSTALL)
  steps.append(f'python3 -m pip install -e {REMOTE_DIR}')
  if args.gcsfuse:
    steps.append(
        '(command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s) && '
        'echo "deb https://packages.cloud.google.com/apt $GCSFUSE_REPO main" | '
        'sudo tee /etc/apt/sources.list.d/gcsfuse.list && '
        'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && '
        'sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))')
  steps.append('python3 -c "import jax, jaxft; print(jax.process_index(), jax.device_count(), '
               'jax.devices()[0].device_kind)"')
  return ' && '.join(steps)


def cmd_setup(args, run: Runner):
  if not args.repo:
    # No git URL: ship the local checkout's committed tree (git archive HEAD) to every worker.
    run(['git', '-C', args.local, 'archive', '--format=tar.gz', '-o', args.tarball, 'HEAD'])
    run(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', args.tarball,
         f'{args.name}:~/jaxft.tar.gz'] + _scope(args) + ['--worker=all'])
  run(ssh(args, install_command(args)))


def run_command(args) -> str:
  """The shell command `run` starts on every worker."""
  workdir, bucket = gcs_to_local(args.workdir)
  main = ['python3', '-m', 'jaxft.main', f'--config={args.config}', f'--workdir={workdir}']
  main += args.overrides
  env = ['JAXFT_DISTRIBUTED=1'] + list(args.env)
  steps = [f'cd {REMOTE_DIR}', f'mkdir -p {LOG_DIR}']  # ~ and $HOME expand on the worker
  if bucket:
    mnt = f'{GCS_MOUNT_ROOT}/{bucket}'
    steps.append(f'mkdir -p {mnt}')
    steps.append(f'(mountpoint -q {mnt} || gcsfuse --implicit-dirs {shlex.quote(bucket)} {mnt})')
  line = shlex.join(['env'] + env + main)
  log = f'{LOG_DIR}/{shlex.quote(args.run_name)}.log'
  if args.attach:
    steps.insert(0, 'set -o pipefail')
    steps.append(f'{line} 2>&1 | tee {log}')
  else:  # detached: survives the ssh session; read it with `logs`
    steps.append(f'{{ nohup {line} > {log} 2>&1 < /dev/null & }}')
    steps.append(f'echo "started on $(hostname): {log}"')
  return ' && '.join(steps)


def cmd_run(args, run: Runner):
  run(ssh(args, run_command(args)))


def cmd_logs(args, run: Runner):
  log = f'{LOG_DIR}/{shlex.quote(args.run_name)}.log'
  tail = f'tail -n {int(args.lines)}' + (' -F' if args.follow else '')
  run(ssh(args, f'{tail} {log}', worker=args.worker))


def cmd_delete(args, run: Runner):
  if args.queued:
    run(['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name] + _scope(args) +
        ['--force', '--quiet'])
  else:
    run(['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name] + _scope(args) +
        ['--quiet'])


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument('--name', required=True, help='TPU VM / queued resource name')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b')
  common.add_argument('--project', default='', help='GCP project (default: gcloud config)')
  common.add_argument('--dry-run', action='store_true',
                      help='print the gcloud commands instead of running them')

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)

  c = sub.add_parser('create', parents=[common], help='create a TPU VM or pod slice')
  c.add_argument('--accelerator', required=True, help='e.g. v4-8, v4-32, v5litepod-16')
  c.add_argument('--runtime', default=DEFAULT_RUNTIME, help='TPU software version')
  kind = c.add_mutually_exclusive_group()
  kind.add_argument('--spot', action='store_true', help='queued resource, spot capacity')
  kind.add_argument('--reserved', action='store_true', help='queued resource, reservation')
  c.add_argument('--queued', action='store_true',
                 help='queued resource with on-demand capacity (implied by --spot/--reserved)')
  c.add_argument('--valid-until', default='', help='queued request lifetime, e.g. 6h')
  c.add_argument('--wait', action='store_true', help='wait until the queued resource is ACTIVE')
  c.add_argument('--wait-timeout', type=float, default=3600.0)
  c.set_defaults(func=cmd_create)

  s = sub.add_parser('setup', parents=[common], help='install jaxft on every worker')
  s.add_argument('--repo', default='', help='git URL to clone on the workers; default: copy '
                 'the committed tree of the local checkout')
  s.add_argument('--ref', default='main', help='branch/tag/commit for --repo')
  s.add_argument('--local', default='.', help='local checkout to copy when no --repo')
  s.add_argument('--tarball', default='/tmp/jaxft.tar.gz', help='where to build the copy')
  s.add_argument('--gcsfuse', action='store_true', help='also install gcsfuse (gs:// workdirs)')
  s.set_defaults(func=cmd_setup)

  r = sub.add_parser('run', parents=[common], help='run a config on all workers',
                     description='Arguments after the options (optionally after --) are '
                     'config overrides: --config.train.num_steps=100 ...')
  r.add_argument('--config', required=True, help='configs/<x>.py[:variant] (in the repo)')
  r.add_argument('--workdir', required=True, help='gs://BUCKET/path (mounted with gcsfuse) or '
                 'a path every worker shares')
  r.add_argument('--run-name', default='jaxft', help='log file name on the workers')
  r.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='extra environment for the run (repeatable)')
  r.add_argument('--attach', action='store_true',
                 help='stay attached and stream output (default: detached, see `logs`)')
  r.set_defaults(func=cmd_run)

  lg = sub.add_parser('logs', parents=[common], help='show a run log from one worker')
  lg.add_argument('--run-name', default='jaxft')
  lg.add_argument('--worker', default='0', help='worker index (process 0 logs the metrics)')
  lg.add_argument('--lines', type=int, default=100)
  lg.add_argument('--follow', action='store_true')
  lg.set_defaults(func=cmd_logs)

  d = sub.add_parser('delete', parents=[common], help='delete the TPU VM / queued resource')
  d.add_argument('--queued', action='store_true',
                 help='it was created as a queued resource (--spot/--reserved/--queued)')
  d.set_defaults(func=cmd_delete)
  return p


def parse_args(argv=None) -> argparse.Namespace:
  """Known options, plus `--config.key=value` overrides for `run` (anywhere, `--` optional)."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != '--']
  if args.command == 'run':
    bad = [a for a in extra if not a.startswith('--config.')]
    if bad:
      parser.error(f'unrecognized arguments: {" ".join(bad)} (overrides look like '
                   '--config.key=value)')
    args.overrides = extra
  elif extra:
    parser.error(f'unrecognized arguments: {" ".join(extra)}')
  return args


def main(argv=None, out=None) -> Runner:
  args = parse_args(argv)
  run = Runner(args.dry_run, out=out)
  args.func(args, run)
  return run


if __name__ == '__main__':
  main()
