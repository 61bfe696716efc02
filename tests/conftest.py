"""Test setup: 8 simulated CPU devices (set before jax initialises its backend)."""
import os

# LLVM at -O0: the suite's tiny programs cost more to compile than to run (-18% CPU time on
# tests/test_continual.py, -30% on tests/test_explain.py); the long end-to-end runs
# (tests/lm_runs.py) drop XLA_FLAGS and run optimised, as a user's run does.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# XLA's per-step temporary buffers on transparent huge pages (glibc >= 2.35; ignored before):
# the suite's processes took ~41M minor page faults, 11% of its CPU time in the kernel. Read by
# glibc at process start, so it reaches the xdist workers and every `python -m jaxft.main` a
# test starts (they inherit this environment), not this process. Same numbers, less CPU:
# 200 quickstart pretraining steps 92 -> 69 CPU-s (Intel Xeon, AMX).
os.environ.setdefault('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
# model.dtype='auto' (the configs' default) is bf16 on CPUs with avx512_bf16 / AMX and fp32
# elsewhere: the suite compares numbers across runs, so it runs fp32 on every CPU kind
# (tests/test_engine.py checks the resolution itself with mocked CPU flags).
os.environ.setdefault('JAXFT_AUTO_DTYPE', 'float32')
# Hardware choices measured on first use (jaxft/measured.py) would compile every train step
# twice and time it: the suite takes the built-in rules (tests/test_measured.py mocks them).
os.environ.setdefault('JAXFT_CHOICES', '*=default')
# Many tests compile the same tiny programs (in this process, in xdist workers and in the
# `python -m jaxft.main` processes they start): one persistent compilation cache for the
# whole run, inherited through the environment, compiles each once. Fresh per run, so a run
# never reads what another version wrote; multi-process tests take it out of their children.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile
  _OWN_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='jaxft-test-jax-cache-')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, 'workerinput'):  # the run's owner, not a worker
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_configure(config):
  # xdist reorders files by their number of tests unless told not to: keep the order below
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


# Files that read workdirs another file trains (functools.cache helpers imported from it) run
# on the worker that trains them: under `--dist loadfile` each file would otherwise train its
# own copy in whichever worker it lands (tests/test_predict.py and tests/test_deploy.py
# re-ran test_finetune.py's pretraining and its 200-step SST-2 and CoNLL fine-tunes).
SHARED_WORKDIRS = {'tests/test_predict.py': 'tests/test_finetune.py',
                   'tests/test_deploy.py': 'tests/test_finetune.py'}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile`, with the files of SHARED_WORKDIRS in one unit of work."""
  if config.getvalue('dist') != 'loadfile':
    return None
  from xdist.scheduler import LoadFileScheduling

  class SharedWorkdirScheduling(LoadFileScheduling):
    def _split_scope(self, nodeid):
      path = super()._split_scope(nodeid)
      return SHARED_WORKDIRS.get(path, path)

  return SharedWorkdirScheduling(config, log)


def pytest_collection_modifyitems(config, items):
  """Files with slow tests first (stable otherwise): with a worker per core taking whole files
  (--dist loadfile), the long files start at once and the short ones fill in behind them,
  instead of one long file running alone at the end."""
  slow_files = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow_files)


# The slowest files, printed at the end of every run (CI's log shows where the next cut is):
# setup + call + teardown of every test summed per file, as the worker that ran it measured.
_FILE_SECONDS: dict = {}


def pytest_runtest_logreport(report):
  path = report.nodeid.split('::', 1)[0]
  _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
  if not _FILE_SECONDS or hasattr(terminalreporter.config, 'workerinput'):
    return
  terminalreporter.write_sep('=', 'slowest files (seconds, setup + call + teardown)')
  for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:12]:
    terminalreporter.write_line(f'{seconds:8.1f}  {path}')
