"""End to end through main.py: exact resumption in a fresh process, and the refusals that
protect a workdir (a second start, another config, a missing corpus)."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.main_runs import local_data_flags
from tests.main_runs import read_metrics
from tests.main_runs import run_main


@pytest.mark.slow
@pytest.mark.parametrize('config', ['configs/baseline.py', 'configs/byte_pool.py'])
def test_resume_in_fresh_process_continues_with_identical_loss(shared_data, tmp_path, config):
  flags = [*local_data_flags(shared_data, tmp_path), '--config.train.log_every=1',
           '--config.train.eval_every=1000', '--config.train.ckpt_every=3',
           '--config.train.warmup_steps=2']
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  run_main(config, straight, *flags, '--config.train.steps=5')
  run_main(config, resumed, *flags, '--config.train.steps=3')
  run_main(config, resumed, *flags, '--config.train.steps=5')
  a = {r['step']: r['loss'] for r in read_metrics(straight, 'train')}
  b = {r['step']: r['loss'] for r in read_metrics(resumed, 'train')}
  assert sorted(b) == [1, 2, 3, 4, 5]
  for step in (4, 5):  # the steps after the restore: same data batch, same params, same loss
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a[step], b[step])


@pytest.mark.slow
def test_a_second_start_in_a_running_workdir_is_refused_and_the_first_is_unaffected(
    shared_data, tmp_path):
  flags = [*local_data_flags(shared_data, tmp_path), '--config.train.log_every=1',
           '--config.train.eval_every=1000', '--config.train.ckpt_every=10',
           '--config.train.warmup_steps=2', '--config.train.steps=30']
  run_main('configs/baseline.py', tmp_path / 'straight', *flags)
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  first = subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/baseline.py', f'--workdir={workdir}',
       *flags], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.time() + 300
    while not (workdir / 'lease.json').exists():
      assert first.poll() is None and time.time() < deadline, first.communicate()
      time.sleep(0.1)
    second = run_main('configs/baseline.py', workdir, *flags, check=False)
  finally:
    out, err = first.communicate(timeout=900)
  assert first.returncode == 0, err[-3000:]
  errors = [l for l in (second.stdout + second.stderr).splitlines() if l.startswith('error: ')]
  assert second.returncode != 0 and len(errors) == 1, second.stderr[-3000:]
  assert 'in use by another run' in errors[0] and f'pid {first.pid}' in errors[0]
  assert 'Traceback' not in second.stderr
  a = {r['step']: r['loss'] for r in read_metrics(tmp_path / 'straight', 'train')}
  b = {r['step']: r['loss'] for r in read_metrics(workdir, 'train')}
  assert sorted(b) == list(range(1, 31))           # one run's rows, each step once
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
  assert not (workdir / 'lease.json').exists()     # released at the end
  del out


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_and_left_untouched(shared_data, tmp_path):
  workdir = tmp_path / 'run'
  flags = [*local_data_flags(shared_data, tmp_path), '--config.train.steps=2',
           '--config.train.warmup_steps=1', '--config.train.eval_every=2']
  run_main('configs/baseline.py', workdir, *flags)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  proc = run_main('configs/baseline.py', workdir, *flags, '--config.model.hidden_dim=128',
                  check=False)
  assert proc.returncode != 0
  assert 'different config' in proc.stderr and 'model.hidden_dim: checkpoint has 64' in proc.stderr
  after = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  assert after == before


def test_missing_corpus_names_the_path(tmp_path):
  missing = tmp_path / 'no_such_corpus'
  proc = run_main('configs/baseline.py', tmp_path / 'run', '--config.data.source=local',
                  f'--config.data.path={missing}', f'--config.data.data_dir={tmp_path / "tfds"}',
                  check=False)
  assert proc.returncode != 0 and str(missing) in proc.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()
