"""A real two-process run on localhost: jax.distributed with CPU (gloo) collectives.

Two processes of 2 CPU devices each form a (data 2, fsdp 2) mesh and run the real trainer
(stlm.train.loop.train) for a few steps of a tiny baseline on a local corpus; each must feed a
different data shard, and both must see the same loss. This file is also the per-process
driver (`python tests/test_multihost.py <process_id> <port> <workdir> <corpus>`).
"""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
STEPS = 4
VAL_FRACTION = 0.2


def _config(workdir: str, corpus: str):
  from configs import baseline  # pylint: disable=g-import-not-at-top
  c = baseline.get_config('tiny')
  c.model.update(num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 max_len=64)
  c.tokenizer.kind = 'bytes'
  c.data.update(source='local', path=corpus, split_by='file', val_fraction=VAL_FRACTION,
                data_dir=os.path.join(workdir, 'tfds'), shuffle_buffer=8)
  c.train.update(batch_size=8, grad_accum=1, steps=STEPS, warmup_steps=1, log_every=1,
                 eval_every=STEPS, eval_batches=1, ckpt_every=STEPS)
  c.mesh.shape = (-1, 2, 1)
  return c


def _worker(process_id: int, port: int, workdir: str, corpus: str) -> None:
  from stlm.train import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.initialize(f'localhost:{port}', NUM_PROCESSES, process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from stlm.data import tfds_builders  # pylint: disable=g-import-not-at-top
  from stlm.train import loop, metrics, sharding  # pylint: disable=g-import-not-at-top
  assert (jax.process_count(), jax.device_count()) == (NUM_PROCESSES, 2 * NUM_PROCESSES)
  config = _config(workdir, corpus)

  # One process prepares the shared ArrayRecord files, the other waits (no write race).
  if jax.process_index() == 0:
    tfds_builders.prepare('local', config.data)
  multihost_utils.sync_global_devices('stlm test: data prepared')

  record = {'process': jax.process_index(), 'losses': {}, 'digests': []}
  feed = sharding.global_batch

  def global_batch(local_batch, mesh, leading_microbatch_axis):
    if leading_microbatch_axis:  # a train batch: note what this process feeds
      record['digests'].append(hashlib.sha1(np.asarray(local_batch['inputs'])).hexdigest())
      record['local_rows'] = int(np.asarray(local_batch['inputs']).shape[1])
    return feed(local_batch, mesh, leading_microbatch_axis)

  write = metrics.MetricsWriter.write

  def write_everywhere(self, step, split, values):
    # Only process 0 writes metrics; keep every process's view of the loss for the test.
    if split == 'train':
      record['losses'][step] = float(values['loss'])
    return write(self, step, split, values)

  sharding.global_batch = global_batch
  metrics.MetricsWriter.write = write_everywhere
  final = loop.train(config, os.path.join(workdir, 'run'))
  record['final_eval_loss'] = float(final['loss'])
  print('RESULT ' + json.dumps(record), flush=True)


def _write_corpus(path: pathlib.Path) -> None:
  """Short documents (one packed row each), an even number held out: both processes then
  get the same number of validation batches."""
  from stlm.data import corpus  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = 'the a tiny model reads bytes and learns which one comes next in every line'.split()
  docs = []
  for i in range(60):
    text = f'doc {i:02d}: ' + ' '.join(rng.choice(words, 12))
    docs.append((f'd{i:02d}.txt', (text + ' ' * 50)[:48]))
  n_val = len(corpus.split_documents(docs, VAL_FRACTION)['validation'])
  assert n_val >= 2 and n_val % NUM_PROCESSES == 0, n_val
  path.mkdir()
  for name, text in docs:
    (path / name).write_text(text)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multihost')
  _write_corpus(tmp / 'corpus')
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=2 '
             '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp),
                             str(tmp / 'corpus')], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-6000:]}'
  results = [json.loads(next(line for line in out.splitlines() if line.startswith('RESULT '))
                        [len('RESULT '):]) for out in outputs]
  return results, tmp / 'run'


@pytest.mark.slow
def test_both_processes_report_the_same_loss(two_processes):
  results, _ = two_processes
  first, second = results
  assert sorted(map(int, first['losses'])) == list(range(1, STEPS + 1))
  assert first['losses'] == second['losses']  # one global computation, bit-identical
  losses = [first['losses'][str(s)] for s in range(1, STEPS + 1)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert first['final_eval_loss'] == second['final_eval_loss']


@pytest.mark.slow
def test_each_process_reads_a_different_shard(two_processes):
  results, _ = two_processes
  first, second = results
  assert first['local_rows'] == second['local_rows'] == 8 // NUM_PROCESSES
  assert len(first['digests']) == len(second['digests']) == STEPS
  assert not set(first['digests']) & set(second['digests'])


@pytest.mark.slow
def test_process_zero_writes_metrics_and_checkpoints_are_collective(two_processes):
  _, run = two_processes
  lines = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines() if l]
  train_steps = [l['step'] for l in lines if l.get('split') == 'train']
  assert train_steps == list(range(1, STEPS + 1))  # once each: only process 0 writes
  assert (run / 'checkpoints' / str(STEPS)).is_dir()
  assert (run / 'export' / 'config.json').is_file()


def test_distributed_settings_from_flags_and_environment():
  from stlm.train import distributed  # pylint: disable=g-import-not-at-top
  env = {'JAX_COORDINATOR_ADDRESS': 'h0:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}
  assert distributed.resolve(environ=env) == distributed.Settings('h0:1234', 4, 3)
  assert distributed.resolve('h1:99', None, 0, environ=env) == distributed.Settings('h1:99', 4, 0)
  assert not distributed.resolve(environ={}).explicit
  assert not distributed.initialize(environ={})  # no flags, no cluster: single process
  assert not distributed.initialize(num_processes=1, environ=env)
  with pytest.raises(ValueError, match=r'--process_id .*JAX_PROCESS_ID'):
    distributed.resolve('h0:1', 2, None, environ={})
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    distributed.resolve('h0:1', 2, 2, environ={})
  with pytest.raises(ValueError, match='host:port'):
    distributed.resolve('h0', 2, 0, environ={})


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
