"""The comparison table: seeds pooled per (comparison, row), spreads, ratios, diagnostics."""

import pytest

from stlm.experiments import comparison_table as ct

COMMON = dict(params=1e6, embed_head=1e5, flops_per_target=1e7, targets_per_s=10.0,
              bytes_per_target=4.0, train_flops=2e15)
DIAG = dict(mean_y_cost=0.25, shuffled_y_cost=0.5, grad_ratio=0.0123,
            slot_bits_per_byte=dict(first=1.0, later=1.5, end_of_chunk=0.125))


def cells(line):
  return [c.strip() for c in line.strip('|').split('|')]


def test_seeds_pool_into_one_line_with_mean_and_half_range():
  results = [dict(COMMON, row='baseline', seed=0, bits_per_byte=2.0, diagnostics=None),
             dict(COMMON, row='baseline', seed=1, bits_per_byte=2.5, diagnostics=None),
             dict(COMMON, row='core_chunk', seed=0, bits_per_byte=2.25, diagnostics=DIAG),
             dict(COMMON, row='core_chunk', seed=1, bits_per_byte=2.75,
                  diagnostics=dict(DIAG, mean_y_cost=0.75))]
  lines = ct.table(results).splitlines()
  header = cells(lines[0])
  rows = [dict(zip(header, cells(line))) for line in lines[2:4]]
  assert len(lines) == 6 and lines[-1] == ct.DIAGNOSTICS_LEGEND   # no third data line
  base, byte_pool = rows
  assert base['seeds'] == '0,1' and base['held-out bits/byte'] == '2.2500 ± 0.2500'
  assert byte_pool['held-out bits/byte'] == '2.5000 ± 0.2500'
  assert byte_pool['vs baseline'] == f'{2.5 / 2.25:.3f}x'
  assert byte_pool['mean-y cost'] == '+0.5000 ± 0.2500'
  assert byte_pool['later bits'] == '1.5000 ± 0.0000'
  assert base['mean-y cost'] == '-'            # no core-output hook
  assert base['text bytes/s'] == '40' and base['train PFLOPs'] == '2.000'
  assert 'OOD bits/byte' not in header         # no run scored out-of-domain text


def test_each_comparison_has_its_own_baseline_ratio_and_ood_columns():
  results = [dict(COMMON, row='baseline', bits_per_byte=2.0, ood_bits_per_byte=3.0),
             dict(COMMON, row='v2', comparison='params', bits_per_byte=3.0,
                  ood_bits_per_byte=4.0, ood_diagnostics=DIAG),
             dict(COMMON, row='baseline', comparison='params', bits_per_byte=1.5)]
  lines = ct.table(results, diagnostics=False).splitlines()
  header = cells(lines[0])
  rows = [dict(zip(header, cells(line))) for line in lines[2:]]
  assert [r['comparison'] for r in rows] == ['core', 'params', 'params']
  assert rows[1]['vs baseline'] == '2.000x'       # against the params baseline, not core's
  assert rows[1]['OOD bits/byte'] == '4.0000' and rows[1]['OOD mean-y cost'] == '+0.2500'
  assert rows[2]['OOD bits/byte'] == '-'
  assert 'mean-y cost' not in header


def test_spread_cell_skips_missing_values():
  assert ct.spread_cell([None, None]) == '-'
  assert ct.spread_cell([1.0, None, 2.0]) == '1.5000 ± 0.5000'
  assert ct.spread_cell([0.5], '{:+.2f}') == '+0.50'


def test_plot_writes_a_png(tmp_path):
  pytest.importorskip('matplotlib')
  path = tmp_path / 'flops.png'
  ct.plot([dict(COMMON, row='baseline', bits_per_byte=2.0),
           dict(COMMON, row='v2', comparison='params', bits_per_byte=2.5, train_flops=4e15)],
          str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
