"""stlm.report on three synthesized runs (finished, crashed, running without benchmarks)."""

import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from stlm.report import collect
from stlm.report import plots
from stlm.report import populations
from stlm.report import render
from stlm.report import table
from tests.conftest import REPO_ROOT

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _config(name, kind='baseline', **model):
  m = dict(kind=kind, num_layers=2, hidden_dim=64, max_len=128, position='rope')
  m.update(model)
  return dict(name=name, preset='tiny', model=m,
              train=dict(batch_size=8, grad_accum=1, steps=300, lr=3e-3))


def _write_run(d: pathlib.Path, config, status, steps, bpb0, results=None, error=None):
  d.mkdir(parents=True)
  lines = []
  for s in steps:
    lines.append(dict(step=s, split='train', time=1000.0 + s, loss=5.0 - s / 100))
    lines.append(dict(step=s, split='validation', time=1000.5 + s,
                      loss=4.0 - s / 200, bits_per_byte=bpb0 - s / 300))
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines)
                                   + '{"step": 30, "spl')  # a line still being written
  info = dict(status=status, config=config, config_docstring=f'Why {config["name"]} exists.',
              config_file=f'configs/{config["name"]}.py', git=dict(commit='ab' * 20, dirty=True),
              params=dict(embedding=3216448, head=0, core=98624, total=3315072, tied=True),
              start_time='2026-01-01T00:00:00+00:00', wall_time_s=125.0, steps_done=steps[-1],
              total_steps=300, tokens_per_step=1024, tokens_seen=steps[-1] * 1024,
              final_validation=dict(step=steps[-1], loss=3.0, bits_per_byte=bpb0 - steps[-1] / 300),
              error=error)
  if results:
    (d / 'results.json').write_text(json.dumps(dict(benchmarks=results)))
    info['results'] = str(d / 'results.json')
  (d / 'run.json').write_text(json.dumps(info))


@pytest.fixture
def runs_dir(tmp_path):
  root = tmp_path / 'runs'
  bench = dict(
      blimp=dict(acc=0.55, acc_stderr=0.01, chance=0.5, main='acc', split='train'),
      arc_easy=dict(acc=0.3, acc_stderr=0.02, chance=0.25, main='acc', split='dev'),
      mmlu=dict(acc=0.24, acc_stderr=0.025, chance=0.25, main='acc', split='dev'))
  _write_run(root / 'a_byte_pool', _config('byte_pool', 'byte_pool', num_layers=4), 'running',
             [0, 10, 20], 9.0)
  _write_run(root / 'b_baseline', _config('baseline'), 'finished', [0, 100, 200, 300], 4.0,
             results=bench)
  _write_run(root / 'c_learned', _config('learned_pe', position='learned'), 'crashed',
             [0, 10], 4.2, error='FloatingPointError: loss became nan at step 12')
  return root


def test_table_diff_and_reference(runs_dir):
  runs = collect.scan(runs_dir)
  assert [r.name for r in runs] == ['a_byte_pool', 'b_baseline', 'c_learned']
  assert [r.status for r in runs] == ['running', 'finished', 'crashed']
  ref = table.pick_reference(runs)
  assert ref.name == 'b_baseline'  # the first baseline-kind run, not the first run
  md = table.markdown(runs).splitlines()
  assert md[0].startswith('| Run | Status | Model | Parameters')
  base = [c.strip() for c in md[3].strip('|').split('|')]
  assert base[:6] == ['b_baseline', 'finished', 'baseline:tiny (baseline)', '3.32M / 3.22M',
                      '307.20K', '3.000']
  assert base[6:11] == ['55.0 ± 1.0 (train)', '-', '30.0 ± 2.0 (dev)', '-', '24.0 ± 2.5 (dev)']
  assert md[2].split('|')[2].strip() == 'running (step 20/300)'
  assert md[4].split('|')[2].strip() == 'crashed'
  diff = table.config_diff(runs[2].config, ref.config)
  assert diff == [('model.position', 'rope', 'learned'), ('name', 'baseline', 'learned_pe')]
  assert table.pick_reference(runs, 'c_learned').name == 'c_learned'
  with pytest.raises(ValueError, match='no such run'):
    table.pick_reference(runs, 'nope')


def test_learning_curves_are_in_training_benchmarks_against_tokens_seen(runs_dir):
  run = collect.scan(runs_dir)[1]
  with open(run.path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('\n' + ''.join(json.dumps(r) + '\n' for r in (
        {'step': 0, 'split': 'benchmarks', 'blimp/acc': 0.5, 'blimp/acc_stderr': 0.05,
         'blimp/paradigm/adjunct_island/acc': 0.4, 'arc_easy/acc': 0.25, 'seconds': 3.0},
        {'step': 100, 'split': 'benchmarks', 'blimp/acc': 0.6, 'blimp/acc_stderr': 0.04,
         'arc_easy/acc': 0.3, 'arc_easy/acc_stderr': 0.02})))
  run = collect.scan(runs_dir)[1]
  curves = plots.learning_curves(run)
  assert sorted(curves) == ['arc_easy', 'blimp']   # paradigms are not curves of their own
  assert curves['blimp'] == [(0, 0.5, 0.05), (102400, 0.6, 0.04)]
  assert curves['arc_easy'][1] == (102400, 0.3, 0.02)
  assert curves['arc_easy'][0][:2] == (0, 0.25)
  assert plots.learning_curves(collect.scan(runs_dir)[0]) == {}


@pytest.mark.slow
def test_report_writes_html_markdown_and_pngs(runs_dir, tmp_path):
  out = tmp_path / 'report'
  runs = collect.scan(runs_dir)
  paths = render.write_report(runs, table.pick_reference(runs), str(out))
  html = (out / 'index.html').read_text()
  assert 'class="crashed"' in html and 'FloatingPointError' in html
  assert 'Why learned_pe exists.' in html and 'model.position: &#x27;rope&#x27; -&gt; ' in html
  md = (out / 'README.md').read_text()
  assert '| c_learned | crashed |' in md and "model.position: 'rope' -> 'learned'" in md
  assert len(paths['plots']) == len(plots.PLOTS)
  for p in paths['plots']:
    data = pathlib.Path(p).read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b'IHDR'
    width, height = struct.unpack('>II', data[16:24])
    assert width >= 400 and height >= 300 and len(data) > 10_000, (p, width, height)
    assert f'src="{pathlib.Path(p).name}"' in html


@pytest.mark.slow
def test_cli_on_runs_and_an_empty_directory(runs_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a directory of runs'):
    collect.scan(tmp_path / 'nothing')
  out = tmp_path / 'r'
  proc = subprocess.run([sys.executable, '-m', 'stlm.report', str(runs_dir), f'--out={out}'],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / 'index.html').is_file() and 'wrote' in proc.stdout


def _population(root, name, bpb_by_seed):
  for seed, bpb in bpb_by_seed.items():
    _write_run(root / name / 'members' / f'm{seed}_seed{seed}',
               dict(_config('baseline'), seed=seed), 'finished', [0, 10], bpb + 10 / 300)
  (root / name / 'population.json').write_text('{"members": []}')


def test_populations_mean_spread_and_paired_by_seed(tmp_path):
  root = tmp_path / 'runs'
  _population(root, 'adamw', {0: 3.0, 1: 3.2, 2: 3.1})
  _population(root, 'muon', {0: 2.9, 1: 3.15, 2: 2.95, 3: 3.5})
  _write_run(root / 'single', _config('baseline'), 'finished', [0, 10], 4.0)
  runs = collect.scan(root)
  assert 'adamw/members/m0_seed0' in [r.name for r in runs] and 'single' in [r.name for r in runs]
  pops = populations.find(runs)
  assert [(p.name, len(p.members)) for p in pops] == [('adamw', 3), ('muon', 4)]
  mean, sd, se = populations.spread(pops[0].values().values())
  assert (mean, sd, se) == pytest.approx((3.1, 0.1, 0.1 / 3 ** 0.5))
  c = populations.paired(pops[0], pops[1])
  assert c['seeds'] == [0, 1, 2]   # seed 3 has no partner
  d = [-0.1, -0.05, -0.15]
  assert c['mean'] == pytest.approx(-0.1)
  assert c['se'] == pytest.approx(np.std(d, ddof=1) / 3 ** 0.5)
  assert c['se'] < c['unpaired_se']   # the seeds' shared variance is gone
  md = populations.markdown(runs)
  assert '| adamw | 3 | 3.1000 | 0.1000 | 0.0577 | 0: 3.0000, 1: 3.2000, 2: 3.1000 |' in md
  assert '| adamw | muon | 3 | -0.1000 | 0.0289 |' in md
  assert populations.markdown([r for r in runs if r.name == 'single']) == ''


def test_artifact_size_view_of_exports_and_compressed_exports(tmp_path):
  """Every export under the folder, with its real sizes and the bits per byte of the
  results.json that stlm.eval wrote for it, as a table and a plot."""
  # pylint: disable=g-import-not-at-top
  from configs import baseline
  from stlm import compress
  from stlm.compress import artifact
  from stlm.report import artifacts
  from tests.test_cli_errors import SMALL, _save_zero_export
  root = tmp_path / 'runs'
  _save_zero_export(baseline, root / 'b' / 'export', **SMALL)
  compress.compress_export(str(root / 'b' / 'export'), str(root / 'b_int8' / 'export'),
                           compress.Settings(quantize='int8'))
  for run, bpb in (('b', 3.25), ('b_int8', 3.5)):
    (root / run / 'results.json').write_text(json.dumps(dict(
        checkpoint=f'/elsewhere/{run}/export', perplexity=dict(bits_per_byte=bpb))))
  found = artifacts.scan(root)
  assert [(a.name, a.label, a.bits_per_byte) for a in found] == [
      ('b/export', 'as trained', 3.25), ('b_int8/export', 'int8', 3.5)]
  for a in found:
    assert a.bytes == sum(artifact.files(str(root / a.name)).values())
    assert a.xz_bytes == len(artifact.tar_xz(str(root / a.name)))
  out = tmp_path / 'report'
  runs = collect.scan(root)
  paths = render.write_report(runs, table.pick_reference(runs), str(out), found)
  md = (out / 'README.md').read_text()
  assert '## Artifact size' in md and '| b_int8/export | int8 | 3.500 |' in md
  assert 'artifact_size.png' in [pathlib.Path(p).name for p in paths['plots']]
  assert (out / 'artifact_size.png').read_bytes()[:8] == PNG_SIGNATURE
  assert 'artifact_size.png' in (out / 'index.html').read_text()


def test_sft_runs_are_shown_beside_their_base_with_generative_scores(runs_dir):
  from stlm.report import sft as sft_report   # pylint: disable=g-import-not-at-top
  base_dir = runs_dir / 'b_baseline'
  (base_dir / 'export').mkdir()
  config = _config('sft')
  config['train']['init_from'] = str(base_dir / 'export')
  config['sft'] = dict(template='alpaca', loss_on='response')
  _write_run(runs_dir / 'd_sft', config, 'finished', [0, 300], 2.0, results=dict(
      gsm8k=dict(exact_match=0.0, exact_match_stderr=0.0, exact_match_flexible=0.01,
                 exact_match_flexible_stderr=0.005, main='exact_match', split='test'),
      lambada_gen=dict(acc=0.02, acc_stderr=0.01, main='acc', split='test'),
      blimp=dict(acc=0.56, acc_stderr=0.01, main='acc', split='train')))
  results = json.loads((runs_dir / 'd_sft' / 'results.json').read_text())
  results['instruct'] = dict(bits_per_byte=1.9)
  (runs_dir / 'd_sft' / 'results.json').write_text(json.dumps(results))
  runs = collect.scan(runs_dir)
  rows = sft_report.rows(runs)
  assert [r[:4] for r in rows] == [['b_baseline', '-', '-', '-'],
                                   ['d_sft', 'b_baseline', 'response', '1.9000']]
  assert rows[1][4:8] == ['0.0 ± 0.0 (test)', '1.0 ± 0.5 (test)', '2.0 ± 1.0 (test)',
                          '56.0 ± 1.0 (train)']
  assert '## Instruction tuning and generation' in sft_report.markdown(runs)
