"""End to end through main.py: the tiny presets learn real text, and the trained exports
evaluate, score BLiMP and generate."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.conftest import require_shared_data
from tests.main_runs import local_data_flags
from tests.main_runs import read_metrics
from tests.main_runs import run_mains_together


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
