"""The optional W&B writer, offline: same scalars as metrics.jsonl, one run per workdir across
resumes, every step once, its transaction-log reader, and one-line errors."""

import json
import os
import pathlib
import sys
import time

import pytest

from configs import baseline
from stlm.config import errors
from stlm.config import validate
from stlm.train import metrics as metrics_lib
from stlm.train import wandb_writer
from tests.conftest import require_shared_data
from tests.main_runs import local_data_flags
from tests.main_runs import read_metrics
from tests.main_runs import run_main

pytest.importorskip('wandb')


def _config(**train):
  c = baseline.get_config('tiny')
  c.train.wandb_project = 'stlm-test'
  for k, v in train.items():
    c.train[k] = v
  return c


def _wait_until_written(workdir, run_id, timeout_s=60.0):
  """wandb's own service process writes the transaction log and may still be flushing it
  when finish() has returned: wait until every start's log holds its exit record."""
  deadline = time.time() + timeout_s
  paths = wandb_writer.transaction_logs(str(workdir), run_id)
  while time.time() < deadline:
    if all(any(r.WhichOneof('record_type') == 'exit' for r in wandb_writer.read_records(p))
           for p in paths):
      return
    time.sleep(0.2)


def _history(workdir, run_id):
  """Every history row of every start, in order of the starts."""
  _wait_until_written(workdir, run_id)
  return [row for path in wandb_writer.transaction_logs(str(workdir), run_id)
          for row in wandb_writer.read_history(path)]


def _exit_codes(workdir, run_id):
  _wait_until_written(workdir, run_id)
  codes = []
  for path in wandb_writer.transaction_logs(str(workdir), run_id):
    for record in wandb_writer.read_records(path):
      if record.WhichOneof('record_type') == 'exit':
        codes.append(record.exit.exit_code)
  return codes


def _write_steps(workdir, config, initial_step, steps):
  with metrics_lib.MetricsWriter(str(workdir), 10, initial_step, config=config,
                                 identity={'name': 'baseline', 'host': 'h'}) as w:
    for s in steps:
      w.write(s, 'train', {'loss': 10.0 - s, 'lr': 1e-3})
    return w.wandb_run_id


def test_off_by_default_imports_nothing_and_writes_no_wandb_files(tmp_path, monkeypatch):
  c = baseline.get_config('tiny')
  assert c.train.wandb_project == ''
  monkeypatch.setitem(sys.modules, 'wandb', None)   # an import would now raise
  assert wandb_writer.import_wandb(c) is None
  with metrics_lib.MetricsWriter(str(tmp_path), 10, 0, config=c) as w:
    w.write(1, 'train', {'loss': 1.0})
    assert w.wandb_run_id is None
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']


def test_a_missing_package_is_a_config_error_naming_the_key(monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)
  with pytest.raises(errors.ConfigError, match=r'train\.wandb_project.*pip install wandb'):
    wandb_writer.import_wandb(_config())


@pytest.mark.parametrize('key,value,match', [
    ('wandb_project', 'a/b', 'at most 128 characters'),
    ('wandb_project', 'x' * 129, 'at most 128 characters'),
    ('wandb_mode', 'disabled', 'wandb_mode'),
])
def test_bad_settings_are_refused_at_validation(key, value, match):
  with pytest.raises(errors.ConfigError, match=match):
    validate.validate(_config(**{key: value}))


def test_the_run_logs_what_metrics_jsonl_logs_with_config_and_identity(tmp_path):
  config = _config()
  run_id = _write_steps(tmp_path, config, 0, [1, 2, 3])
  assert (tmp_path / 'wandb_run_id').read_text().strip() == run_id
  rows = _history(tmp_path, run_id)
  assert [(r['_step'], r['train/loss'], r['train/lr']) for r in rows] == [
      (1, 9.0, 1e-3), (2, 8.0, 1e-3), (3, 7.0, 1e-3)]
  jsonl = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in jsonl] == [(r['_step'], r['train/loss']) for r in rows]
  (run_dir,) = {os.path.dirname(p) for p in wandb_writer.transaction_logs(str(tmp_path), run_id)}
  records = list(wandb_writer.read_records(os.path.join(run_dir, f'run-{run_id}.wandb')))
  (run_record,) = [r.run for r in records if r.WhichOneof('record_type') == 'run']
  assert run_record.project == 'stlm-test' and run_record.display_name == 'baseline:tiny'
  saved = {item.key: json.loads(item.value_json) for item in run_record.config.update}
  assert saved['train']['wandb_project'] == 'stlm-test'
  assert saved['run'] == {'name': 'baseline', 'host': 'h'}
  assert _exit_codes(tmp_path, run_id) == [0]


def test_a_resumed_start_continues_the_same_run_and_logs_every_step_once(tmp_path):
  config = _config()
  first = _write_steps(tmp_path, config, 0, [1, 2, 3, 4, 5])
  # Killed after step 5 with its newest checkpoint at 3: the next start logs 4..8 again.
  # Within the same second as the first start: wandb would name both directories alike.
  second = _write_steps(tmp_path, config, 3, [4, 5, 6, 7, 8])
  assert first == second
  assert len(wandb_writer.transaction_logs(str(tmp_path), first)) == 2
  rows = _history(tmp_path, first)
  assert [r['_step'] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
  assert wandb_writer.last_logged_step(str(tmp_path), first) == 8


def test_a_new_id_after_deleting_the_id_file(tmp_path):
  config = _config()
  first = _write_steps(tmp_path, config, 0, [1])
  (tmp_path / 'wandb_run_id').unlink()
  second = _write_steps(tmp_path, config, 0, [1])
  assert first != second
  assert [r['_step'] for r in _history(tmp_path, second)] == [1]


def test_an_exception_marks_the_run_failed(tmp_path):
  with pytest.raises(RuntimeError):
    with metrics_lib.MetricsWriter(str(tmp_path), 10, 0, config=_config()) as w:
      w.write(1, 'train', {'loss': 1.0})
      run_id = w.wandb_run_id
      raise RuntimeError('step failed')
  assert _exit_codes(tmp_path, run_id) == [1]


def test_the_reader_stops_at_a_cut_off_record(tmp_path):
  run_id = _write_steps(tmp_path, _config(), 0, list(range(1, 41)))
  _wait_until_written(tmp_path, run_id)
  (path,) = wandb_writer.transaction_logs(str(tmp_path), run_id)
  whole = wandb_writer.read_history(path)
  assert [r['_step'] for r in whole] == list(range(1, 41))
  data = pathlib.Path(path).read_bytes()
  # Cut inside the history records: a prefix of them is read, nothing after the cut.
  cut = tmp_path / 'cut.wandb'
  cut.write_bytes(data[:len(data) // 2])
  rows = wandb_writer.read_history(str(cut))
  assert rows == whole[:len(rows)] and len(rows) < len(whole)
  # A damaged byte inside a record ends the read there too (its CRC no longer matches).
  broken = bytearray(data)
  broken[len(data) // 2] ^= 0xFF
  cut.write_bytes(bytes(broken))
  rows = wandb_writer.read_history(str(cut))
  assert rows == whole[:len(rows)] and len(rows) < len(whole)
  cut.write_bytes(b'not a log at all')
  with pytest.raises(ValueError, match='not a W&B transaction log'):
    wandb_writer.read_history(str(cut))


@pytest.mark.slow
def test_training_with_wandb_offline_logs_the_jsonl_scalars(tmp_path):
  shared = require_shared_data()
  workdir = tmp_path / 'run'
  flags = [*local_data_flags(shared, tmp_path), '--config.train.steps=4',
           '--config.train.log_every=1', '--config.train.eval_every=2',
           '--config.train.warmup_steps=1',
           '--config.train.wandb_project=stlm-test']
  proc = run_main('configs/baseline.py', workdir, *flags)
  run_id = (workdir / 'wandb_run_id').read_text().strip()
  assert f'W&B: run {run_id} (offline)' in proc.stdout + proc.stderr
  rows = {r['_step']: r for r in _history(workdir, run_id)}
  for split, steps in (('train', [1, 2, 3, 4]), ('validation', [0, 2, 4])):
    logged = read_metrics(workdir, split)
    assert [r['step'] for r in logged] == steps
    for r in logged:
      assert rows[r['step']][f'{split}/loss'] == pytest.approx(r['loss'], rel=1e-6)
      assert rows[r['step']][f'{split}/bits_per_byte'] == pytest.approx(r['bits_per_byte'],
                                                                         rel=1e-6)
  assert sorted(s for s, r in rows.items() if 'train/loss' in r) == [1, 2, 3, 4]
