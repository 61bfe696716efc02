"""Multi-host helpers: joining a run, and refusing to train when processes disagree.

Every process of a multi-host run executes the same program on its own slice of the
data; the collectives only line up if all of them resolved the same config, see the same
device layout and read disjoint, correctly ordered data shards. A mismatch otherwise
shows up as a hang or as silently different numbers, so it is checked once at start-up
and reported naming the processes (and config keys) that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np
from absl import logging

# Environment variables a launcher may set instead of passing flags.
ENV_COORDINATOR = 'JAXFT_COORDINATOR'
ENV_NUM_PROCESSES = 'JAXFT_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXFT_PROCESS_ID'
ENV_AUTO = 'JAXFT_DISTRIBUTED'  # '1': jax.distributed.initialize() with auto-detection


def _env_int(name: str) -> int | None:
  v = os.environ.get(name, '').strip()
  return int(v) if v else None


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """'slurm' / 'tpu' / 'env' when the environment describes a multi-process job, else None.

  SLURM counts only inside an `srun` step (SLURM_STEP_NODELIST), so running the entry point
  directly in a batch script with several tasks does not wait for peers that never come.
  """
  env = os.environ if environ is None else environ
  if env.get(ENV_AUTO, '').lower() in ('1', 'true', 'auto', 'yes'):
    return 'env'
  if 'SLURM_STEP_NODELIST' in env and int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  if len(hosts) > 1:
    return 'tpu'
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Join a multi-process run when flags or the environment ask for one; True if joined.

  Explicit values (flags, then JAXFT_* variables) win; otherwise SLURM (under srun), a TPU
  pod (TPU_WORKER_HOSTNAMES) or JAXFT_DISTRIBUTED=1 let JAX detect everything itself.
  Must run before anything touches a JAX backend.
  """
  import jax
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes or _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if num_processes == 1 and not coordinator:
    return False  # --num_processes 1: a plain single-process run
  if coordinator or num_processes:
    if (num_processes and num_processes > 1 and (not coordinator or process_id is None)
        and detected_cluster() is None):  # a cluster environment fills in what is missing
      raise ValueError(
          f'a {num_processes}-process run needs --coordinator host:port and --process_id '
          f'(got coordinator={coordinator!r}, process_id={process_id!r})')
    if num_processes and process_id is not None and not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} is outside 0..{num_processes - 1}')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
  cluster = detected_cluster()
  if cluster:
    logging.info('multi-process environment detected (%s): jax.distributed.initialize()',
                 cluster)
    jax.distributed.initialize()
    return True
  return False


# ----------------------------------------------------------------------------- agreement

def config_json(cfg) -> str:
  """Canonical JSON of a resolved config (sorted keys), what processes must agree on."""
  d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  return json.dumps(d, sort_keys=True, default=repr)


def config_fingerprint(cfg) -> str:
  return hashlib.sha256(config_json(cfg).encode()).hexdigest()


def process_facts(cfg) -> dict:
  """What one process contributes to the start-up comparison."""
  import jax
  dev = jax.local_devices()
  return {
      'config_sha256': config_fingerprint(cfg),
      'config': config_json(cfg),
      'local_device_count': len(dev),
      'device_count': jax.device_count(),
      'platform': dev[0].platform if dev else None,
      'device_kind': dev[0].device_kind if dev else None,
      'jax_version': jax.__version__,
  }


_EXCHANGES = [0]


def allgather_json(obj: Any, timeout_s: int = 600) -> list:
  """Every process's JSON-able `obj`, in process order.

  Goes through the coordination service's key-value store, so it works whatever the
  processes' devices are (a device allgather needs the same device count everywhere, which
  is one of the things being checked); falls back to a device allgather when JAX runs
  multi-process without a coordination client.
  """
  import jax
  if jax.process_count() == 1:
    return [json.loads(json.dumps(obj))]
  text = json.dumps(obj, sort_keys=True)
  _EXCHANGES[0] += 1
  from jax._src import distributed as jax_distributed  # the only handle on the KV store
  client = getattr(jax_distributed.global_state, 'client', None)
  if client is not None:
    prefix = f'jaxft/exchange/{_EXCHANGES[0]}'
    client.key_value_set(f'{prefix}/{jax.process_index()}', text)
    return [json.loads(client.blocking_key_value_get(f'{prefix}/{p}', timeout_s * 1000))
            for p in range(jax.process_count())]
  from jax.experimental import multihost_utils
  data = np.frombuffer(text.encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  sizes = sizes.reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _flatten(d: Any, prefix: str = '') -> dict:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: d}


def config_diff(a_json: str, b_json: str, limit: int = 10) -> list[tuple[str, Any, Any]]:
  """[(dotted key, value in a, value in b)] for keys whose values differ."""
  a, b = _flatten(json.loads(a_json)), _flatten(json.loads(b_json))
  missing = object()
  keys = sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing))
  return [(k, a.get(k, '<missing>'), b.get(k, '<missing>')) for k in keys[:limit]]


def _groups(values: list) -> dict:
  """value -> processes holding it (in order of first appearance)."""
  groups: dict = {}
  for pid, v in enumerate(values):
    groups.setdefault(json.dumps(v, sort_keys=True), []).append(pid)
  return groups


def compare_processes(facts: list[dict]) -> list[str]:
  """Human-readable disagreements between processes' facts (empty when they all agree)."""
  problems = []
  for key in ('jax_version', 'platform', 'device_kind', 'local_device_count', 'device_count'):
    groups = _groups([f.get(key) for f in facts])
    if len(groups) > 1:
      problems.append(f'{key} differs: ' + '; '.join(
          f'processes {pids} have {json.loads(v)!r}' for v, pids in groups.items()))
  groups = _groups([f['config_sha256'] for f in facts])
  if len(groups) > 1:
    lines = ['the resolved config differs: ' + '; '.join(
        f'processes {pids} have sha256 {json.loads(v)[:12]}' for v, pids in groups.items())]
    ref_pid = 0
    for v, pids in groups.items():
      if ref_pid in pids:
        continue
      p = pids[0]
      for key, a, b in config_diff(facts[ref_pid]['config'], facts[p]['config']):
        lines.append(f'  {key}: process {ref_pid} has {a!r}, processes {pids} have {b!r}')
    problems.append('\n'.join(lines))
  return problems


class ProcessMismatchError(RuntimeError):
  pass


def check_processes(cfg) -> dict:
  """Collective: raise ProcessMismatchError on every process if any two disagree on the
  config, device count/kind or JAX version. Returns this process's facts."""
  import jax
  facts = process_facts(cfg)
  if jax.process_count() == 1:
    return facts
  everyone = allgather_json(facts)
  problems = compare_processes(everyone)
  if problems:
    raise ProcessMismatchError(
        f'the {len(everyone)} processes of this run disagree (all processes must be started '
        'with the same config, overrides and software on the same kind of hosts):\n' +
        '\n'.join(problems))
  logging.info('%d processes agree: config sha256 %s, %d x %d %s devices', len(everyone),
               facts['config_sha256'][:12], len(everyone), facts['local_device_count'],
               facts['platform'])
  return facts


# ----------------------------------------------------------------------------- data layout

def process_batch_rows(mesh, rules, global_batch_size: int) -> dict[int, list[tuple[int, int]]]:
  """process -> sorted, merged [start, stop) row ranges of the global batch its devices hold."""
  from jaxft import partitioning
  sharding = partitioning.batch_sharding(mesh, 1, rules)
  ranges: dict[int, set] = {}
  for dev, idx in sharding.devices_indices_map((global_batch_size,)).items():
    sl = idx[0]
    start = sl.start or 0
    stop = global_batch_size if sl.stop is None else sl.stop
    ranges.setdefault(dev.process_index, set()).add((start, stop))
  out = {}
  for p, rs in ranges.items():
    merged: list[list[int]] = []
    for a, b in sorted(rs):
      if merged and a <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], b)
      else:
        merged.append([a, b])
    out[p] = [tuple(r) for r in merged]
  return out


def check_batch_layout(mesh, rules, global_batch_size: int, process_count: int | None = None):
  """The loaders give process p rows [p*L, (p+1)*L) of each global batch (L = batch /
  processes); the mesh must put exactly those rows on p's devices, or the global batch
  would be assembled in another order (or from mismatched pieces)."""
  import jax
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'train.batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes')
  local = global_batch_size // process_count
  rows = process_batch_rows(mesh, rules, global_batch_size)
  bad = {p: r for p, r in sorted(rows.items()) if r != [(p * local, (p + 1) * local)]}
  if bad:
    raise ValueError(
        f'mesh {dict(mesh.shape)} does not give each of the {process_count} processes its own '
        f'block of the batch (process p must hold rows [p*{local}, (p+1)*{local})); it gives '
        + ', '.join(f'process {p}: rows {r}' for p, r in bad.items()) +
        '. Shard the batch over all processes: make mesh.data*mesh.fsdp a multiple of the '
        'process count and keep mesh.tensor within one host.')
