"""Shared test fixtures: where the real data lives, and how its absence is handled."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_cpu_devices(script, argument, n_devices: int, timeout: int = 600) -> None:
  """Runs `python script argument` with n simulated CPU devices (a device count is fixed at
  jax's start, so it needs a process of its own) and cheap XLA compiles; asserts exit 0."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices} '
             '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run([sys.executable, str(script), str(argument)], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-5000:]


def data_dir() -> pathlib.Path:
  """`$STLM_DATA_DIR`, else `../shared/data` beside the repository."""
  env = os.environ.get('STLM_DATA_DIR')
  return pathlib.Path(env) if env else REPO_ROOT.parent / 'shared' / 'data'


def require_shared_data() -> pathlib.Path:
  """The real data directory; skips when absent unless STLM_REQUIRE_DATA=1 demands it."""
  path = data_dir()
  if not path.is_dir():
    if os.environ.get('STLM_REQUIRE_DATA') == '1':
      pytest.fail(f'STLM_REQUIRE_DATA=1 but the shared data directory {path} is missing')
    pytest.skip(f'shared data directory {path} not present')
  return path


@pytest.fixture
def shared_data():
  return require_shared_data()


# The longest modules are collected first. The README's test command runs two xdist workers
# with --dist loadscope (a module stays on one worker, so its module fixtures run once), and
# scopes are handed out in collection order: starting the longest ones first lets both
# workers finish at about the same time.
LONGEST_FIRST = ('test_train_e2e.py', 'test_multihost_faults.py', 'test_population.py',
                 'test_train_restarts.py', 'test_sharding.py', 'test_sft.py',
                 'test_multihost.py', 'test_classify.py', 'test_hf_datasets.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
