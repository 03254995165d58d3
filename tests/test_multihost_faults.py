"""Faults of a two-process run (jax.distributed on localhost, 2 CPU devices each) through main.py:
SIGTERM to one process stops both at the same step with one checkpoint and the restart goes on
exactly; a process killed outright makes the other exit within the heartbeat timeout."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.test_multihost import _free_port
from tests.test_multihost import _write_corpus

REPO = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10


def _start(workdir, corpus, steps, ckpt_every=1000):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2 '
             '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
  flags = ['--config=configs/baseline.py', f'--workdir={workdir}',
           f'--coordinator_address=localhost:{port}', '--num_processes=2',
           f'--heartbeat_timeout={HEARTBEAT_S}', '--config.model.num_layers=1',
           '--config.model.hidden_dim=32', '--config.model.num_heads=4',
           '--config.model.num_kv_heads=2', '--config.model.ffn_dim=64', '--config.model.max_len=64',
           '--config.tokenizer.kind=bytes', '--config.data.source=local',
           f'--config.data.path={corpus}', '--config.data.split_by=file',
           '--config.data.val_fraction=0.2', f'--config.data.data_dir={workdir}.tfds',
           '--config.data.shuffle_buffer=8', '--config.train.batch_size=8',
           '--config.train.grad_accum=1', f'--config.train.steps={steps}',
           '--config.train.warmup_steps=1', '--config.train.log_every=1',
           '--config.train.eval_every=1000', '--config.train.eval_batches=1',
           f'--config.train.ckpt_every={ckpt_every}', '--config.mesh.shape=(-1,2,1)']
  return [subprocess.Popen([sys.executable, 'main.py', *flags, f'--process_id={i}'], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _finish(procs, timeout=600):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _train_rows(workdir):
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass
  return [r for r in rows if r['split'] == 'train']


def _wait_for_rows(workdir, n, procs, timeout=300):
  start = time.time()
  while len(_train_rows(workdir)) < n:
    assert all(p.poll() is None for p in procs), 'a process ended before the fault'
    assert time.time() - start < timeout
    time.sleep(0.5)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp('faults') / 'corpus'
  _write_corpus(path)
  return path


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_restart_is_exact(tmp_path,
                                                                                corpus):
  steps = 24   # room for the stop to land well before the end
  straight = tmp_path / 'straight'
  outs = _finish(_start(straight, corpus, steps))
  assert 'exported' in outs[0], outs[0][-3000:]
  run = tmp_path / 'run'
  procs = _start(run, corpus, steps)
  _wait_for_rows(run, 3, procs)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs)
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  saved = sorted(int(d.name) for d in (run / 'checkpoints').iterdir() if d.name.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < steps
  assert f'stopped after step {saved[0]} of {steps}' in outs[0]
  assert json.loads((run / 'run.json').read_text())['status'] == 'preempted'
  outs = _finish(_start(run, corpus, steps))
  assert 'exported' in outs[0], outs[0][-3000:]
  a = {r['step']: r['loss'] for r in _train_rows(straight)}
  b = {r['step']: r['loss'] for r in _train_rows(run)}
  assert sorted(b) == list(range(1, steps + 1))
  for s in range(saved[0] + 1, steps + 1):
    assert b[s] == pytest.approx(a[s], rel=1e-6), s


@pytest.mark.slow
def test_a_killed_process_ends_the_other_within_the_heartbeat_and_the_run_resumes(tmp_path,
                                                                                   corpus):
  run = tmp_path / 'run'
  procs = _start(run, corpus, 400, ckpt_every=2)
  _wait_for_rows(run, 5, procs)
  procs[1].kill()
  killed_at = time.time()
  out = _finish(procs[:1], timeout=HEARTBEAT_S + 90)[0]
  assert time.time() - killed_at < HEARTBEAT_S + 90
  assert procs[0].returncode != 0
  assert 'another task died' in out, out[-3000:]
  saved = sorted(int(d.name) for d in (run / 'checkpoints').iterdir() if d.name.isdigit())
  assert saved
  outs = _finish(_start(run, corpus, saved[-1] + 2, ckpt_every=2))
  assert 'exported' in outs[0], outs[0][-3000:]
  assert f'resuming at step {saved[-1]}' in outs[0]
