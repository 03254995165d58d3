"""Running main.py from tests: one run, several at once, and reading what a run wrote."""

import json
import os
import pathlib
import subprocess
import sys

from tests.conftest import REPO_ROOT

# Real text from ../shared/data/corpus (TinyStories head, cased): small enough to prepare in
# seconds, varied enough that a model must learn English to lower bits per byte.
CORPUS_SUBDIR = 'corpus/tinystories'


def _main_command(config, workdir, *overrides, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **(env_extra or {}))
  return [sys.executable, 'main.py', f'--config={config}', f'--workdir={workdir}', *overrides], env


def run_main(config, workdir, *overrides, check=True, env_extra=None):
  cmd, env = _main_command(config, workdir, *overrides, env_extra=env_extra)
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=900)
  if check and proc.returncode:
    raise AssertionError(f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
  return proc


def run_mains_together(runs):
  """main.py for each (config, workdir, *overrides) in `runs`, at the same time (one core
  each, where there are two); AssertionError naming the first that failed."""
  procs = []
  for run in runs:
    cmd, env = _main_command(*run)
    procs.append((cmd, subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)))
  outs = [(cmd, proc, *proc.communicate(timeout=900)) for cmd, proc in procs]
  for cmd, proc, out, err in outs:
    if proc.returncode:
      raise AssertionError(f'{cmd} failed:\n{out[-3000:]}\n{err[-6000:]}')


def read_metrics(workdir, split):
  lines = pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if r['split'] == split]


def local_data_flags(shared_data, tmp_path):
  return ['--config.data.source=local', f'--config.data.path={shared_data / CORPUS_SUBDIR}',
          f'--config.data.data_dir={tmp_path / "tfds"}']
