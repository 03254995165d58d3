"""End to end through main.py: learning on real text, exact resumption, and refusals that protect a workdir."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.conftest import require_shared_data

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


# BLiMP paradigms decided by a local cue (anaphor gender and case, an NPI licensor, irregular
# participles, that vs wh, determiner-noun number). A tiny model learns such cues within a
# few hundred steps, while BLiMP as a whole stays near chance for it, so the whole-BLiMP check
# would only measure noise at this budget.
LOCAL_CUE_PARADIGMS = (
    'anaphor_gender_agreement', 'principle_A_case_1', 'sentential_negation_npi_licensor_present',
    'irregular_past_participle_verbs', 'wh_vs_that_no_gap', 'determiner_noun_agreement_1')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """{config name: workdir} of 300-step tiny runs on real text, trained once per module."""
  shared = require_shared_data()
  root = tmp_path_factory.mktemp('trained')
  runs = {name: root / name for name in ('baseline', 'byte_pool')}
  # Each prepares the corpus in its own data_dir: the two runs go at the same time.
  run_mains_together([(f'configs/{name}.py', workdir,
                       *local_data_flags(shared, root / f'data_{name}'),
                       '--config.train.steps=300', '--config.train.eval_every=150',
                       '--config.train.log_every=50', '--config.train.eval_batches=4')
                      for name, workdir in runs.items()])
  return runs


@pytest.mark.slow
@pytest.mark.parametrize('name', ['baseline', 'byte_pool'])
def test_tiny_preset_learns_real_text(trained, name):
  """300 steps of the tiny preset cut validation bits per byte by at least 40% from step 0."""
  val = read_metrics(trained[name], 'validation')
  assert [r['step'] for r in val] == [0, 150, 300]
  first, last = val[0]['bits_per_byte'], val[-1]['bits_per_byte']
  assert last < 0.6 * first, (first, last)
  assert val[1]['bits_per_byte'] > last
  assert (trained[name] / 'export' / 'config.json').is_file()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['baseline', 'byte_pool'])
def test_run_json_describes_the_finished_run(trained, name):
  info = json.loads((trained[name] / 'run.json').read_text())
  assert info['status'] == 'finished' and info['end_time'] and info['error'] is None
  assert info['config_file'] == f'configs/{name}.py' and info['config']['name'] == name
  assert info['config_docstring'].startswith('The ')
  assert info['steps_done'] == 300 and info['tokens_seen'] == 300 * info['tokens_per_step']
  val = read_metrics(trained[name], 'validation')[-1]
  assert info['final_validation']['bits_per_byte'] == pytest.approx(val['bits_per_byte'])
  assert info['params']['total'] > 0 and info['throughput']['targets_per_s'] > 0
  assert info['wall_time_s'] > 0 and 'commit' in info['git']
  assert all('time' in r for r in read_metrics(trained[name], 'validation'))


@pytest.mark.slow
def test_trained_model_beats_chance_on_local_cue_blimp(trained, shared_data, tmp_path):
  from stlm import export  # pylint: disable=g-import-not-at-top
  from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
  subset = tmp_path / 'blimp_subset'
  (subset / 'blimp').mkdir(parents=True)
  for paradigm in LOCAL_CUE_PARADIGMS:   # links, not copies: the data stays in ../shared
    (subset / 'blimp' / f'{paradigm}.jsonl').symlink_to(
        shared_data / 'benchmarks' / 'blimp' / f'{paradigm}.jsonl')
  res = zero_shot.run_benchmarks(export.load_export(str(trained['baseline'] / 'export')),
                                  ['blimp'], str(subset))['blimp']
  assert res['n'] == 200 * len(LOCAL_CUE_PARADIGMS)
  assert res['acc'] > res['chance'] + 3 * res['acc_stderr'], res['acc']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['baseline', 'byte_pool'])
def test_eval_cli_prints_the_table2_row(trained, shared_data, name):
  proc = subprocess.run(
      [sys.executable, '-m', 'stlm.eval', f'--checkpoint={trained[name] / "export"}',
       '--benchmarks=blimp,hellaswag,arc_easy,winogrande,mmlu', '--limit=20',
       f'--data_dir={shared_data / "benchmarks"}',
       f'--text={shared_data / "corpus" / "nltk" / "inaugural" / "1789-Washington.txt"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| Model | Parameters | BLiMP | HellaSwag | ARC-easy | WinoGrande | MMLU | Bits per byte |' \
      in proc.stdout
  row = [line for line in proc.stdout.splitlines() if line.startswith(f'| {name} |')]
  assert len(row) == 1, proc.stdout
  cells = [c.strip() for c in row[0].strip('|').split('|')]
  assert all(float(c) >= 0 for c in cells[2:]), row   # every benchmark and bits/byte scored
  results = json.loads((trained[name] / 'results.json').read_text())
  assert results['benchmarks']['mmlu']['n'] == 20


@pytest.mark.slow
@pytest.mark.parametrize('name', ['baseline', 'byte_pool'])
def test_generate_prints_text_from_the_export(trained, name):
  proc = subprocess.run(
      [sys.executable, '-m', 'stlm.generate', f'--checkpoint={trained[name] / "export"}',
       '--prompt=Once upon a time', '--max_bytes=40', '--seed=0'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith('Once upon a time') and len(proc.stdout) > len('Once upon a time')


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
