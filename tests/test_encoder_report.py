"""Tests for stlm/experiments/encoder_report: slopes, findings and the table, on gap rows
whose effects are known by construction."""

import dataclasses
import math

import matplotlib.image
import pytest

from stlm.experiments import encoder_design as ed
from stlm.experiments import encoder_report as er

N_TEST = 400
WORD_OVERLAP = {'wikipedia': 0.9, 'lambada': 0.6}


def _design(**change):
  small = dict(wiki_bytes=(1000, 10_000, 100_000), overlap_bytes=100_000,
               corpora=('wikipedia', 'lambada'), finetune_rows=(250, 1000), task_rows=1000,
               tasks=('agnews', 'fewrel'), seeds=3)
  return dataclasses.replace(ed.Design.cpu(), **{**small, **change})


def _scores(correct):
  return [1] * correct + [0] * (N_TEST - correct)


def _rows(d, lift_per_decade):
  """Scratch gets 200 of 400 right; pretraining adds lift_per_decade items per decade of
  bytes above 100 (seed s adds s - 1 more), so the gap is known."""
  results = {}
  for arm, task, n in ed.cells(d):
    for s in range(d.seeds):
      extra = int(lift_per_decade * (math.log10(arm[1]) - 2)) + s - 1
      results[(arm, s, task, n)] = {'scores': _scores(200 + extra)}
      results[('scratch', s, task, n)] = {'scores': _scores(200)}
  manifests = {arm: {'bytes': arm[1], 'documents': 1} for arm in ed.arms(d)}
  overlaps = {(arm, t): {'token_occurrences': 1.0, 'word_occurrences': WORD_OVERLAP[arm[0]]}
              for arm in ed.arms(d) for t in d.tasks}
  return ed.gap_rows(d, results, manifests, overlaps)


def test_gap_rows_pair_each_arm_with_the_scratch_seeds():
  d = _design()
  rows = _rows(d, lift_per_decade=40)
  top = [r for r in rows if r['budget'] == 100_000 and r['corpus'] == 'wikipedia' and
         r['task'] == 'agnews' and r['rows'] == 1000][0]
  assert top['gap'] == pytest.approx(120 / N_TEST)          # 3 decades x 40 items
  assert top['per_seed'] == pytest.approx([119 / N_TEST, 120 / N_TEST, 121 / N_TEST])
  assert top['overlap_word_occurrences'] == 0.9


def test_slope_against_log_bytes_is_the_lift_per_decade():
  d = _design()
  fits = er.slopes(d, _rows(d, lift_per_decade=40))
  assert fits[('agnews', 'log10_bytes')]['slope'] == pytest.approx(40 / N_TEST)
  assert fits[('agnews', 'log10_bytes')]['points'] == 9
  # the overlap axis: lambada (overlap 0.6) and wikipedia (0.9) at the same budget, same gap
  assert fits[('agnews', 'word_overlap')]['slope'] == pytest.approx(0.0, abs=1e-12)
  assert fits[('agnews', 'log10_rows')]['slope'] == pytest.approx(0.0, abs=1e-12)


def test_findings_state_each_verdict_with_its_figure():
  d = _design()
  grows = er.findings(d, _rows(d, 40), er.slopes(d, _rows(d, 40)), None)
  assert grows[0].startswith('1. Pretrained beats scratch') and 'agnews: reproduced' in grows[0]
  assert 'agnews vs log10_bytes: reproduced: slope = +0.1000' in grows[1]
  assert grows[2] == '3. Committees: not run (--committee_size=0).'
  flat = er.findings(d, _rows(d, 0), er.slopes(d, _rows(d, 0)), None)
  assert 'agnews: not decidable at this scale' in flat[0]


def _committee(deep_gap, committee_gap):
  return {'task': 'agnews', 'rows': 1000, 'corpus': 'wikipedia', 'bytes': 100_000,
          'curve': [{'members': k, 'accuracy': 0.7, 'stderr': 0.01,
                     'latency_s_per_example': k * 1e-4} for k in (1, 2)],
          'deep': {'accuracy': 0.72, 'stderr': 0.01, 'latency_s_per_example': 5e-4,
                   'steps': 100, 'validation': [{'step': 50, 'loss': 5.0}]},
          'shallow_validation': [{'step': 50, 'loss': 5.5}],
          'deep_vs_member0': {'gap': deep_gap, 'se': 0.01},
          'committee_vs_deep': {'gap': committee_gap, 'se': 0.01}}


@pytest.mark.parametrize('deep_gap, committee_gap, verdict', [
    (0.005, 0.0, 'not decidable at this scale: BERT-6 does not beat one BERT-1 first'),
    (0.05, -0.03, 'not reproduced'),
    (0.05, -0.01, 'reproduced'),
])
def test_committee_finding_needs_the_deep_model_to_win_first(deep_gap, committee_gap, verdict):
  d = _design()
  rows = _rows(d, 40)
  third = er.findings(d, rows, er.slopes(d, rows), _committee(deep_gap, committee_gap))[2]
  assert third.startswith(f'3. A committee of 2 BERT-1 matches one BERT-6: {verdict}')


def test_table_and_plots(tmp_path):
  d = _design()
  rows = _rows(d, 40)
  fits = er.slopes(d, rows)
  comm = _committee(0.05, -0.01)
  text = er.table(d, rows, fits, comm, er.findings(d, rows, fits, comm))
  assert text.count('| agnews | wikipedia | 100,000 |') == 2          # 250 and 1000 rows
  assert '| committee of 2 BERT-1 | 0.7000 ± 0.0100 | 0.200 |' in text
  assert '| one BERT-6 (100 steps) | 0.7200 ± 0.0100 | 0.500 |' in text
  er.plots(d, rows, comm, tmp_path)
  for name in ('gap_vs_size.png', 'gap_vs_overlap.png', 'committee.png'):
    assert matplotlib.image.imread(tmp_path / name).shape[2] in (3, 4)
