"""Reliability end to end: preemption, divergence guard, damaged checkpoints, bad input, metrics.

One small baseline (1 layer, hidden 32, bytes tokenizer, builtin corpus) trained in-process
for 6 steps is the uninterrupted reference every interrupted run is compared with; only what
needs a real process (signals, the one-line messages of main.py) runs main.py.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import baseline  # pylint: disable=g-bad-import-order
from stlm.config import validate as config_validate
from stlm.train import checkpoint
from stlm.train import divergence
from stlm.train import loop
from stlm.train import metrics as metrics_lib
from tests.conftest import REPO_ROOT

STEPS = 6
OVERRIDES = {
    'tokenizer.kind': 'bytes', 'model.num_layers': 1, 'model.hidden_dim': 32,
    'model.num_heads': 2, 'model.num_kv_heads': 1, 'model.ffn_dim': 64, 'model.max_len': 32,
    'train.batch_size': 2, 'train.warmup_steps': 1, 'train.steps': STEPS, 'train.log_every': 1,
    'train.eval_every': 3, 'train.eval_batches': 1, 'train.ckpt_every': 2,
    'train.keep_checkpoints': 3,
}


def make_config(data_dir, **extra):
  c = baseline.get_config('tiny')
  for key, value in {**OVERRIDES, 'data.data_dir': str(data_dir), **extra}.items():
    node, *path = key.split('.')
    target = c[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
  return ml_collections.ConfigDict(c.to_dict())


def flags_of(data_dir, **extra):
  return ['--config=configs/baseline.py'] + [
      f'--config.{k}={v}' for k, v in {**OVERRIDES, 'data.data_dir': str(data_dir),
                                        **extra}.items()]


def env():
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


def rows(workdir, split='train'):
  lines = pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if r['split'] == split]


def losses(workdir, split='train'):
  return {r['step']: r['loss'] for r in rows(workdir, split)}


def export_params(workdir):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, 'export', 'params'))


def assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def assert_each_step_once(workdir):
  for split in ('train', 'validation'):
    steps = [r['step'] for r in rows(workdir, split)]
    assert steps == sorted(set(steps)), (split, steps)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """The uninterrupted run: checkpoints 2, 4, 6, metrics and export."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  loop.train(make_config(data_dir), str(workdir))
  return workdir


def spawn(data_dir, workdir, *extra_flags):
  return subprocess.Popen(
      [sys.executable, 'main.py', f'--workdir={workdir}', *flags_of(data_dir), *extra_flags],
      cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_when(proc, marker, sig):
  """Sends `sig` once `marker` shows in the output; returns all output and the exit code."""
  out = []
  for line in proc.stdout:
    out.append(line)
    if marker in line:
      proc.send_signal(sig)
      break
  out.append(proc.stdout.read())
  return ''.join(out), proc.wait(timeout=600)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_equals_uninterrupted(reference, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  # The step-0 validation line comes before step 1: the signal lands during step 1.
  out, rc = signal_when(spawn(data_dir, workdir), 'step 0: validation', signal.SIGTERM)
  assert rc == 0, out[-3000:]
  assert 'SIGTERM: stopped after step 1 of 6' in out, out[-3000:]
  assert (workdir / 'checkpoints' / '1').is_dir() and not (workdir / 'export').exists()
  loop.train(make_config(data_dir), str(workdir))
  assert losses(workdir) == losses(reference)          # every step, exactly
  assert losses(workdir, 'validation') == losses(reference, 'validation')
  assert_same_params(export_params(workdir), export_params(reference))
  assert_each_step_once(workdir)


@pytest.mark.slow
def test_sigkill_then_resume_logs_each_step_once(reference, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  out, rc = signal_when(spawn(data_dir, workdir), 'step 3: validation', signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-2000:]
  loop.train(make_config(data_dir), str(workdir))
  assert_each_step_once(workdir)
  assert losses(workdir) == losses(reference)
  assert_same_params(export_params(workdir), export_params(reference))


def _state_leaves(step_dir):
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(step_dir, 'state'))
  return [np.asarray(x) for x in jax.tree.leaves(tree['params'])] + [
      np.asarray(x) for x in jax.tree.leaves(tree['opt_state'])
      if np.issubdtype(np.asarray(x).dtype, np.floating)]


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_forced_nan_never_reaches_a_checkpoint_or_export(data_dir, tmp_path, policy):
  workdir = tmp_path / 'run'
  config = make_config(data_dir, **{'train.lr': 1e30, 'train.nonfinite_policy': policy,
                                    'train.max_consecutive_skips': 2, 'train.ckpt_every': 1,
                                    'train.log_every': 3, 'train.eval_every': 100})
  with pytest.raises(divergence.DivergenceError) as e:
    loop.train(config, str(workdir))
  msg = str(e.value)
  if policy == 'stop':
    assert 'non-finite at step' in msg and 'first non-finite parameter group: ' in msg, msg
  else:
    assert 'consecutive steps had a non-finite loss' in msg, msg
    assert any(r['skipped'] > 0 for r in rows(workdir)), rows(workdir)
  assert not (workdir / 'export').exists()
  saved = [d for d in (workdir / 'checkpoints').iterdir() if d.name.isdigit()]
  assert saved   # the steps before the blow-up were saved, all finite
  for d in saved:
    assert all(np.isfinite(x).all() for x in _state_leaves(d)), d
  text = (workdir / 'metrics.jsonl').read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  assert [json.loads(line) for line in text.splitlines()]   # valid JSON, NaN as null


def _damage(step_dir: pathlib.Path, kind: str) -> pathlib.Path:
  data_files = sorted((step_dir / 'state').glob('ocdbt.process_0/d/*'),
                      key=lambda p: p.stat().st_size)
  if kind == 'truncated data file':
    path = data_files[-1]
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  elif kind == 'missing data file':
    path = data_files[-1]
    path.unlink()
  elif kind == 'missing _METADATA':
    path = step_dir / 'state' / '_METADATA'
    path.unlink()
  else:   # an empty JSON item
    path = step_dir / 'config' / 'metadata'
    path.write_text('')
  return path


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['truncated data file', 'missing data file',
                                  'missing _METADATA', 'empty JSON item'])
def test_damaged_checkpoint_is_named_moved_aside_and_previous_resumes(
    reference, data_dir, tmp_path, capsys, kind):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  damaged = _damage(workdir / 'checkpoints' / '6', kind)
  with pytest.raises(checkpoint.DamagedCheckpointError, match='checkpoint 6 is damaged'):
    checkpoint.verify_files(6, str(workdir / 'checkpoints' / '6'))
  capsys.readouterr()
  loop.train(make_config(data_dir), str(workdir))
  out = capsys.readouterr().out
  assert f'checkpoint 6 is damaged: {damaged}' in out, out
  assert 'falling back to the previous checkpoint' in out and 'resuming at step 4' in out
  assert (workdir / 'checkpoints' / '6.damaged').is_dir()    # kept, never deleted
  assert losses(workdir) == losses(reference)                # steps 5 and 6 trained again
  assert_each_step_once(workdir)
  assert_same_params(export_params(workdir), export_params(reference))


@pytest.mark.slow
def test_damaged_checkpoint_without_fallback_stops_naming_it(reference, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  _damage(workdir / 'checkpoints' / '6', 'empty JSON item')
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r'checkpoint 6 is damaged: .*config/metadata: empty; set config.train.restore'):
    loop.train(make_config(data_dir, **{'train.restore_fallback': False}), str(workdir))
  assert (workdir / 'checkpoints' / '6').is_dir()


def run_main(*args, env_extra=None):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=600, env={**env(), **(env_extra or {})})


def assert_one_line_error(proc, *fragments):
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert 'Traceback' not in out, out[-3000:]
  errors = [l for l in out.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, out[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize('args,fragments', [
    (['--config.train.lrr=1'], ['--config.train.lrr', 'did you mean lr?']),
    pytest.param(['--config=configs/no_such_config.py'], ['configs/no_such_config.py'],
                 marks=pytest.mark.slow),
    (['--config=configs/baseline.py:huge'], ["Unknown size preset 'huge'"]),
])
def test_bad_flags_give_one_line(args, fragments, tmp_path):
  assert_one_line_error(run_main(*args, f'--workdir={tmp_path / "run"}'), *fragments)


@pytest.mark.slow
def test_bad_run_inputs_give_one_line(reference, data_dir, tmp_path):
  del reference  # prepares the data
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  base = flags_of(data_dir)
  assert_one_line_error(run_main(*base, f'--workdir={a_file}'), str(a_file), 'is a file')
  assert_one_line_error(run_main(*base, '--workdir=/proc/stlm_run'), 'cannot write in /proc')
  assert_one_line_error(run_main(*base, f'--workdir={tmp_path / "m"}', '--config.mesh.shape=(2,1,1)'),
                        'config.mesh.shape', 'needs 2 devices')
  assert_one_line_error(
      run_main(*base, f'--workdir={tmp_path / "b"}', '--config.train.batch_size=3',
               env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}),
      'config.train.batch_size=3', 'divisible')


def test_in_process_bad_workdir_is_a_config_error(tmp_path):
  a_file = tmp_path / 'f'
  a_file.write_text('')
  with pytest.raises(config_validate.ConfigError, match='is a file'):
    loop.check_workdir(str(a_file))


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'split': 'train', 'loss': 1.0}) + '\n'
                          for s in range(6)) + '{"step": 6, "spl')   # cut by a kill
  assert metrics_lib.truncate_jsonl(str(path), 3) == 3
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [0, 1, 2, 3]
  writer = metrics_lib.MetricsWriter(str(tmp_path), 10, 3)
  writer.write(4, 'train', {'loss': float('nan'), 'x': np.float32(np.inf), 'y': 2})
  writer.close()
  last = json.loads(path.read_text().splitlines()[-1])
  assert isinstance(last.pop('time'), float)   # wall clock, for curves against time
  assert last == {'step': 4, 'split': 'train', 'loss': None, 'x': None, 'y': 2.0}


def test_config_check_falls_back_to_an_older_copy_when_the_newest_is_unreadable(tmp_path):
  # A run must never resume over another config's checkpoints just because the newest
  # checkpoint's config item is damaged: the next older checkpoint holds the same run's config.
  import grain  # pylint: disable=g-import-not-at-top
  config = baseline.get_config('tiny')
  state = {'w': np.arange(4, dtype=np.float32)}
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), config, keep=3, async_save=False)
  for step in (1, 2):
    ckpts.save(step, state, data_iter, force=True)
  ckpts.close()
  # Same size, so the file manifest still passes: only parsing the JSON finds the damage.
  item = tmp_path / 'checkpoints' / '2' / 'config' / 'metadata'
  item.write_bytes(b'#' * item.stat().st_size)
  other = baseline.get_config('tiny')
  other.model.hidden_dim = 48
  with pytest.raises(checkpoint.CheckpointMismatchError, match='hidden_dim'):
    checkpoint.RunCheckpoints(str(tmp_path), other, keep=3, async_save=False).check_config()
  checkpoint.RunCheckpoints(str(tmp_path), config, keep=3, async_save=False).check_config()


def _without(cfg_dict, dotted_keys):
  out = json.loads(json.dumps(cfg_dict))
  for key in dotted_keys:
    *path, last = key.split('.')
    node = out
    for p in path:
      node = node[p]
    del node[last]
  return out


def test_resume_check_reads_missing_keys_as_their_legacy_values_and_skips_unused_sections():
  from configs import byte_pool  # pylint: disable=g-import-not-at-top
  from stlm.config import legacy  # pylint: disable=g-import-not-at-top
  added = list(legacy.LEGACY_VALUES)
  # A baseline run whose checkpoint predates the byte-pool keys resumes: it never reads them.
  base = baseline.get_config('tiny')
  assert checkpoint.config_differences(_without(base.to_dict(), added), base) == []
  other = baseline.get_config('tiny')
  other.model.byte_pool.byte_dim = 8
  assert checkpoint.config_differences(base.to_dict(), other) == []
  other.model.hidden_dim = 48   # what a baseline does read is still compared
  assert checkpoint.config_differences(base.to_dict(), other) == [
      'model.hidden_dim: checkpoint has 64, this run has 48']
  # A v2 checkpoint from before the keys trained without slot embeddings, one core vector added
  # at the input: resuming it with today's v2 defaults would build another model, so it is
  # refused.
  v2 = byte_pool.get_config('tiny')
  diffs = checkpoint.config_differences(_without(v2.to_dict(), added), v2)
  assert diffs == ["model.byte_pool.condition: checkpoint has 'add', this run has "
                   "'cross_attention'",
                   "model.byte_pool.condition_at: checkpoint has 'input', this run has "
                   "'every_layer'",
                   'model.byte_pool.slot_embedding: checkpoint has False, this run has True']
  # ... and with the legacy values set explicitly, it resumes.
  v2.model.byte_pool.update({k.rsplit('.', 1)[1]: v for k, v in legacy.LEGACY_VALUES.items()})
  assert checkpoint.config_differences(_without(v2.to_dict(), added), v2) == []


def _checkpoint_entries(workdir):
  return sorted(os.listdir(pathlib.Path(workdir, 'checkpoints')))


def _resume_equals_reference(reference, data_dir, workdir):
  loop.train(make_config(data_dir), str(workdir))
  ref = losses(reference)
  assert losses(workdir) == ref
  assert_same_params(export_params(workdir), export_params(reference))
  assert_each_step_once(workdir)


def test_too_little_disk_before_a_save_stops_keeping_the_newest_checkpoint(
    reference, data_dir, tmp_path, monkeypatch):
  """Free space runs out after checkpoint 2: the run stops before saving 4 with one message
  (needed, free, path), checkpoint 2 intact, and the same command resumes exactly."""
  from stlm.train import disk  # pylint: disable=g-import-not-at-top
  answers = iter([10**12, 10**12])          # the start-up check and the check before save 2
  monkeypatch.setattr(disk, 'free_bytes', lambda path: next(answers, 1 << 20))
  workdir = tmp_path / 'run'
  with pytest.raises(disk.DiskSpaceError) as e:
    loop.train(make_config(data_dir), str(workdir))
  text = str(e.value)
  assert '\n' not in text and 'MB but only 1.0 MB are free at' in text
  assert 'stopped after step 4' in text and 'checkpoint 2 is kept' in text
  assert _checkpoint_entries(workdir) == ['2']
  info = json.loads((workdir / 'run.json').read_text())
  assert info['status'] == 'crashed' and 'are free at' in info['error']
  monkeypatch.undo()
  _resume_equals_reference(reference, data_dir, workdir)


def test_a_save_failing_with_no_space_removes_its_partial_files(
    reference, data_dir, tmp_path, monkeypatch):
  """The write of checkpoint 4 fails with ENOSPC after leaving a temporary directory: one
  message naming the reason, the temporary directory removed, checkpoint 2 kept, exact resume."""
  import errno  # pylint: disable=g-import-not-at-top
  real_save = ocp.CheckpointManager.save

  def save(manager, step, *args, **kwargs):
    if step == 4:
      os.makedirs(os.path.join(str(manager.directory), '4.orbax-checkpoint-tmp-1700000000'))
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  workdir = tmp_path / 'run'
  with pytest.raises(checkpoint.CheckpointWriteError) as e:
    loop.train(make_config(data_dir), str(workdir))
  text = str(e.value)
  assert 'saving checkpoint 4' in text and 'No space left on device' in text
  assert 'checkpoint 2 is kept' in text and '\n' not in text
  assert _checkpoint_entries(workdir) == ['2']
  assert json.loads((workdir / 'run.json').read_text())['status'] == 'crashed'
  assert not (workdir / 'lease.json').exists()
  monkeypatch.undo()
  _resume_equals_reference(reference, data_dir, workdir)


def _local_corpus(directory):
  directory.mkdir()
  (directory / 'a.txt').write_text('Document a. ' + 'Some words of text. ' * 60)
  (directory / 'b.txt').write_text('Document b. ' + 'Other words in a row. ' * 60)
  records = [{'text': f'Record {i}. ' + 'More text here. ' * 40} for i in range(3)]
  (directory / 'c.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  return ['--config.data.source=local', f'--config.data.path={directory}',
          '--config.data.val_fraction=0.25']


@pytest.mark.slow
@pytest.mark.parametrize('damage,fragments', [
    ('truncated_jsonl', ['c.jsonl:3:', 'invalid JSON']),
    ('non_utf8', ['a.txt:1:', 'byte offset']),
])
def test_bad_data_in_the_corpus_gives_one_line_naming_file_and_line(tmp_path, damage, fragments):
  corpus_dir = tmp_path / 'corpus'
  local = _local_corpus(corpus_dir)
  if damage == 'truncated_jsonl':   # a shard cut off in the middle of its last record
    text = (corpus_dir / 'c.jsonl').read_text()
    (corpus_dir / 'c.jsonl').write_text(text[:len(text) - 30])
  else:
    (corpus_dir / 'a.txt').write_bytes(b'Document a. \xff ' + b'Some words. ' * 60)
  proc = run_main(*flags_of(tmp_path / 'tfds'), *local, f'--workdir={tmp_path / "run"}')
  assert_one_line_error(proc, *[str(corpus_dir / f) if f.endswith(':') else f for f in fragments])
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.slow
def test_a_corpus_file_gone_between_runs_is_refused_on_resume_in_one_line(tmp_path):
  corpus_dir = tmp_path / 'corpus'
  local = _local_corpus(corpus_dir)
  base = [*flags_of(tmp_path / 'tfds'), *local, f'--workdir={tmp_path / "run"}']
  first = run_main(*base, '--config.train.steps=2')
  assert first.returncode == 0, first.stderr[-3000:]
  (corpus_dir / 'b.txt').unlink()
  assert_one_line_error(run_main(*base, '--config.train.steps=4'), 'the corpus changed since')
  assert _checkpoint_entries(tmp_path / 'run') == ['2']


def test_a_corpus_changed_between_runs_is_refused_on_resume(data_dir, tmp_path):
  """A resumed run whose local corpus changed (a file edited) would silently read another data
  order: the resume check compares the corpus fingerprint saved with the checkpoint."""
  corpus_dir = tmp_path / 'corpus'
  corpus_dir.mkdir()
  for i in range(4):
    (corpus_dir / f'doc{i}.txt').write_text(f'Document {i}. ' + 'Some words of text. ' * 60)
  local = {'data.source': 'local', 'data.path': str(corpus_dir), 'data.val_fraction': 0.25,
           'train.steps': 2}
  workdir = tmp_path / 'run'
  loop.train(make_config(data_dir, **local), str(workdir))
  with open(corpus_dir / 'doc1.txt', 'a', encoding='utf-8') as f:
    f.write('One more sentence.')
  with pytest.raises(checkpoint.CheckpointMismatchError, match='the corpus changed since'):
    loop.train(make_config(data_dir, **dict(local, **{'train.steps': 4})), str(workdir))
  assert _checkpoint_entries(workdir) == ['2']
